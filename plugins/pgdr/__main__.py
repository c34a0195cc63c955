import sys

try:
    from pgdr.walpush import answer_from_marker

    if answer_from_marker(sys.argv[1:]):  # archive_command for a segment a batch archived: answer before heavy imports
        sys.exit(0)

    from pgdr.cli import main
except SystemExit:
    raise
except BaseException:
    # As restore_command, a crash must stop recovery (exit > 125), never look like "not archived" (exit 1).
    if "wal-fetch" in sys.argv[1:]:
        import traceback

        traceback.print_exc()
        sys.exit(200)
    raise

sys.exit(main())
