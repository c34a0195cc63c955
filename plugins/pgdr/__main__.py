"""``python -m pgdr`` and the ``pgdr`` command: the fast answers first (pgdr.fast), then the CLI.

restore_command runs this file itself with ``python -S`` (pgdr.recovery): no runpy, no site-packages until
the CLI needs them — a quarter of each call's CPU when the prefetch spool answers (pgdr.prefetch)."""

import sys

if __name__ == "__main__" and not __package__:  # run as a file: pgdr is the directory holding it
    import os

    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        from pgdr.fast import answer

        code = answer(argv)  # archive_command / restore_command answered from local disk, before heavy imports
        if code is not None:
            return code
        if sys.flags.no_site:  # python -S: the CLI needs site-packages (libraries, an editable install)
            import site

            site.main()
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
