"""Answers for PostgreSQL's archive_command and restore_command that need nothing heavy.

PostgreSQL runs ``pgdr wal-push`` once per segment and ``pgdr wal-fetch`` once
per file, one after another: every millisecond of interpreter start is paid per
16 MiB of WAL. ``answer`` runs first, before the CLI, the configuration or any
storage library is imported, and answers the calls whose answer is already on
local disk (a segment the push queue archived, a segment the prefetcher
downloaded). It returns None for anything else, and the full command runs:
that path is always correct, this one is only faster.

This module and the ones it calls import only the standard library.
"""

from __future__ import annotations

import os
import sys


class FastArgs:
    """A plain ``[--config C] [-q] COMMAND --cluster X [--opt V]... POSITIONAL...`` command line."""

    def __init__(self, command: str, cluster: str, config: str | None, quiet: bool, options: dict, positionals: list):
        self.command = command
        self.cluster = cluster
        self.config = config
        self.quiet = quiet
        self.options = options
        self.positionals = positionals


def parse(argv: list[str], command: str, valued: frozenset[str] = frozenset()) -> FastArgs | None:
    """``argv`` read as ``command`` with the options named in ``valued`` (each taking one value); None for
    anything else: a flag this parser does not know (``--json``, ``--help``), a missing value or cluster."""
    cluster = config = None
    quiet = False
    options: dict[str, str] = {}
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        name, eq, value = a.partition("=")
        if name in ("--config", "--cluster") or name in valued:
            if not eq:
                value = next(it, None)
                if value is None:
                    return None
            if name == "--config":
                config = value
            elif name == "--cluster":
                cluster = value
            else:
                options[name] = value
        elif a in ("-q", "--quiet"):
            quiet = True
        elif a.startswith("-"):
            return None
        else:
            rest.append(a)
    if not rest or rest[0] != command or not cluster:
        return None
    return FastArgs(command, cluster, config, quiet, options, rest[1:])


SYSTEM_CONFIG = "/etc/pgdr/pgdr.yaml"  # a database host's or worker's config, after `pip install .`
CHECKOUT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))),
                               "include", "pgdr.yaml")


def config_file(explicit: str | None) -> str:
    """The configuration file a command reads (pgdr.config.config_path: its rules), chosen with the standard
    library alone."""
    chosen = explicit or os.environ.get("PGDR_CONFIG")
    if chosen:
        return chosen
    for candidate in (SYSTEM_CONFIG, CHECKOUT_CONFIG):
        if os.path.isfile(candidate):
            return candidate
    return SYSTEM_CONFIG


def identity(cluster: str, config: str | None) -> str:
    """Who is asking: the cluster and the configuration file it reads (named, or found in the default
    places), as it is now (its path, device, inode, size and modification time: an edited file is another
    configuration). An answer left for another is ignored."""
    path = os.path.abspath(config_file(config))
    try:
        st = os.stat(path)
        version = f"{st.st_dev}.{st.st_ino}.{st.st_size}.{st.st_mtime_ns}"
    except OSError:
        version = "?"
    return f"{cluster}|{path}|{version}"


def pgdr_command() -> list[str]:
    """How a background pgdr process is started: this installation's own ``pgdr/__main__.py`` by its path
    (never ``-m pgdr``, which would first look in the working directory)."""
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py")]


def postmaster_is_init(datadir: str) -> bool:
    """The server in ``datadir`` runs as PID 1 (a container's init). Every orphan is then its child, and the
    postmaster takes a child it does not know that exits other than with 0 or 1 for a crashed backend: it
    restarts every session. No process pgdr leaves running in the background may outlive its caller there."""
    try:
        with open(os.path.join(datadir, "postmaster.pid")) as f:
            return f.readline().strip() == "1"
    except OSError:
        return False


def answer(argv: list[str]) -> int | None:
    """The exit status of this call when it can be answered from local disk, else None."""
    if "wal-push" in argv:
        from pgdr.walpush import answer_push

        return answer_push(argv)
    if "wal-fetch" in argv:
        from pgdr.prefetch import answer_fetch

        return answer_fetch(argv)
    return None
