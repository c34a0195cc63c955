import sys

from pgdr.walpush import answer_from_marker

if answer_from_marker(sys.argv[1:]):  # archive_command for a segment a batch archived: answer before heavy imports
    sys.exit(0)

from pgdr.cli import main  # noqa: E402

sys.exit(main())
