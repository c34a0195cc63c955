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
import time


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


def sha256_hex(data: bytes) -> str:
    """SHA-256 of a few bytes from the interpreter's own implementation: hashlib loads OpenSSL first, a third
    of a restore_command call's start-up. (For whole files hashlib's is several times faster: use it there.)"""
    try:
        from _sha2 import sha256  # Python 3.12+
    except ImportError:
        try:
            from _sha256 import sha256  # Python 3.11
        except ImportError:
            from hashlib import sha256
    return sha256(data).hexdigest()


def pgdr_command(*flags: str) -> list[str]:
    """How PostgreSQL and pgdr's background processes run pgdr: this installation's own ``pgdr/__main__.py``
    by its path, after the interpreter's ``flags`` (never ``-m pgdr``, which would first look in the working
    directory)."""
    return [sys.executable, *flags, os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py")]


def postmaster_is_init(datadir: str) -> bool:
    """The server in ``datadir`` runs as PID 1 (a container's init). Every orphan is then its child, and the
    postmaster takes a child it does not know that exits other than with 0 or 1 for a crashed backend: it
    restarts every session. No process pgdr leaves running in the background may outlive its caller there."""
    try:
        with open(os.path.join(datadir, "postmaster.pid"), "rb") as f:  # bytes: a damaged file must not raise
            return f.readline().strip() == b"1"
    except OSError:
        return False


_HEX = frozenset("0123456789ABCDEF")


def is_segment(name: str) -> bool:
    return len(name) == 24 and _HEX.issuperset(name)


def is_wal_file_name(name: str) -> bool:
    """A name archive_command or restore_command is called with: a segment, ``.partial``, timeline or backup
    history (no regex: this runs on every call)."""
    seg, _, rest = name.partition(".")
    if is_segment(seg):
        return rest in ("", "partial") or (len(rest) == 15 and _HEX.issuperset(rest[:8]) and rest[8:] == ".backup")
    return len(seg) == 8 and _HEX.issuperset(seg) and rest == "history"


def own_pg_wal(path: str | os.PathLike) -> str | None:
    """The pg_wal directory holding ``path`` when it is one (so named) that this user owns: the server's own
    archive_command or restore_command. None for a file anywhere else, or root at the console working in a
    server's pg_wal: no background process of pgdr's is started or trusted for those."""
    pg_wal = os.path.dirname(os.path.abspath(path))
    try:
        if os.path.basename(pg_wal) != "pg_wal" or os.stat(pg_wal).st_uid != os.geteuid():
            return None
    except OSError:
        return None
    return pg_wal


# ---- the lock file of a background process (the pusher, the prefetcher): flock()ed while it runs, holding
# "pid\nidentity\n" (identity: the configuration it serves)

def lock_holder(path: str) -> str | None:
    """What the process holding ``path``'s flock wrote in it ("" while it starts), None when none holds it
    (a shared flock tried and released at once)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    finally:
        os.close(fd)
    return None


def holder_identity(holder: str | None) -> str | None:
    """The identity in a lock holder's text; None while it is not written yet (or nobody holds the lock)."""
    lines = (holder or "").split("\n")
    return lines[1] if len(lines) > 2 else None


def lock_exclusively(path: str, wait: float) -> int | None:
    """Take ``path``'s flock (the file created 0600, never through a link) and empty it: the descriptor, or
    None when another process still holds it after ``wait`` seconds (a caller testing it holds it for a
    moment, so one refusal is not the answer)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.01)
    os.ftruncate(fd, 0)
    return fd


def announce(fd: int, who: str) -> None:
    """Write this process and the configuration it serves into the lock it holds."""
    os.pwrite(fd, f"{os.getpid()}\n{who}\n".encode(), 0)


def unlock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)


def answer(argv: list[str]) -> int | None:
    """The exit status of this call when it can be answered from local disk, else None."""
    if "wal-push" in argv:
        from pgdr.walpush import answer_push

        return answer_push(argv)
    if "wal-fetch" in argv:
        from pgdr.prefetch import answer_fetch

        return answer_fetch(argv)
    return None
