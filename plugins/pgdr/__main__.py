"""``python -m pgdr`` and the ``pgdr`` command: the fast answers first (pgdr.fast), then the CLI."""

import sys


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        from pgdr.fast import answer

        code = answer(argv)  # archive_command / restore_command answered from local disk, before heavy imports
        if code is not None:
            return code
        from pgdr.cli import main
    except SystemExit:
        raise
    except BaseException:
        # As restore_command, a crash must stop recovery (exit > 125), never look like "not archived" (exit 1).
        if "wal-fetch" in argv:
            import traceback

            traceback.print_exc()
            return 200
        raise
    return main(argv, answered=True)


if __name__ == "__main__":
    sys.exit(run())
