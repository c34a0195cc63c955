import sys

try:
    from pgdr.cli import main
except BaseException:
    # As restore_command, a crash must stop recovery (exit > 125), never look like "not archived" (exit 1).
    if "wal-fetch" in sys.argv[1:]:
        import traceback

        traceback.print_exc()
        sys.exit(200)
    raise

sys.exit(main())
