"""The push queue: archive_command at the speed of the repository, not of one interpreter per segment.

PostgreSQL's archiver runs ``archive_command`` once per segment, one after
another, and marks a segment archived only when the command exits 0. pgdr's
answer is pgBackRest's asynchronous archiving: one long-lived **pusher** per
server archives every segment PostgreSQL has marked ready
(``pg_wal/archive_status/*.ready``), several in flight, and acknowledges each
one in a spool only after its upload returned (file: fsync and rename; S3: the
PUT completed). Each ``pgdr wal-push`` call (the archive_command) only waits for
its own segment's acknowledgement and exits 0; it starts the pusher when none
runs. So PostgreSQL still learns of each segment in order, and only once it is
durable; the work behind it overlaps.

The spool, ``pg_wal/.pgdr-push/`` (in pg_wal: the server's user can write it and
base backups skip it):

    pusher.lock        flock()ed by the one running pusher; free means none runs
    pusher.log         the pusher's own log (what it archived, what failed)
    <NAME>.ok          acknowledgement: archived, durable (see Ack)
    <NAME>.error       the pusher could not archive NAME: the next call reports it (exit 1) and removes it,
                       PostgreSQL retries, the pusher tries again
    <NAME>.pending     the key an upload of NAME is going to: a retry after a crash writes the same key, so a
                       segment is never stored twice (pgdr.wal)

An acknowledgement counts only for the same cluster and configuration file, and
for the very file PostgreSQL asks about (device, inode, size and modification
time as the pusher read it). Anything else — no spool, a path outside pg_wal,
``--json``, ``--parallel 0`` — runs the full command, which archives in the
calling process, as it always could.

The part that runs on every archive_command call imports only the standard library.
"""

from __future__ import annotations

import os
import sys
import time

from pgdr.fast import identity, parse

SPOOL_DIR = ".pgdr-push"
LOCK = "pusher.lock"
LOG = "pusher.log"
DEFAULT_PARALLEL = 4
MAX_PARALLEL = 8  # each in flight holds at most one compressed segment: 8 stay far under 256 MB
DEFAULT_TIMEOUT = 60.0
_ACK_MAGIC = "pgdr-push-ack 1"
_HEX = frozenset("0123456789ABCDEF")


def is_wal_file_name(name: str) -> bool:
    """A name archive_command is called with: a segment, ``.partial``, timeline or backup history (no regex:
    this runs on every call)."""
    seg, _, rest = name.partition(".")
    if len(seg) == 24 and _HEX.issuperset(seg):
        return rest in ("", "partial") or (len(rest) == 15 and _HEX.issuperset(rest[:8]) and rest[8:] == ".backup")
    return len(seg) == 8 and _HEX.issuperset(seg) and rest == "history"


def spool_of(path: str) -> str | None:
    """The push spool for a file PostgreSQL asks to archive: a file in pg_wal that the server marked ready
    (``archive_status/<NAME>.ready``). None for anything else (a file copied elsewhere, a segment pushed by
    hand that the server is not waiting on): the pusher only archives what the server's queue holds."""
    pg_wal = os.path.dirname(os.path.abspath(path))
    ready = os.path.join(pg_wal, "archive_status", os.path.basename(path) + ".ready")
    if os.path.basename(pg_wal) != "pg_wal" or not os.path.exists(ready):
        return None
    return os.path.join(pg_wal, SPOOL_DIR)


def file_stamp(st: os.stat_result) -> str:
    return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}"


class Ack:
    """``<NAME>.ok``: who archived (identity), which file (stamp), its SHA-256 and where it went."""

    def __init__(self, who: str, stamp: str, sha256: str, key: str):
        self.who, self.stamp, self.sha256, self.key = who, stamp, sha256, key

    def text(self) -> str:
        return "\n".join((_ACK_MAGIC, self.who, self.stamp, self.sha256, self.key)) + "\n"

    @classmethod
    def read(cls, path: str) -> "Ack | None":
        try:
            with open(path) as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError):
            return None
        if len(lines) < 5 or lines[0] != _ACK_MAGIC:
            return None
        return cls(*lines[1:5])

    def write(self, path: str) -> None:
        # Not fsynced: an acknowledgement lost in a crash only means the segment is looked up again, and the
        # repository says "already archived". Written only after the upload returned.
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.text())
        os.replace(tmp, path)


def _read_text(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


class _Pusher:
    """The running pusher, as a wal-push call sees it: started by this call, alive, or gone."""

    def __init__(self, spool: str, argv_prefix: list[str]):
        self.spool = spool
        self.argv_prefix = argv_prefix
        self.proc = None
        self.starts = 0

    def running(self) -> str | None:
        """The identity of the pusher holding the lock ("" before it wrote it), None when none does (a test
        of the flock, released at once)."""
        import fcntl

        try:
            fd = os.open(os.path.join(self.spool, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lines = os.pread(fd, 4096, 0).decode(errors="replace").split("\n")
            return lines[1] if len(lines) > 1 else ""
        finally:
            os.close(fd)  # closing drops our flock, if we got it
        return None

    def starting(self) -> bool:
        """The pusher this call started is still loading (not holding the lock yet)."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        import subprocess

        self.starts += 1
        log = os.path.join(self.spool, LOG)
        try:
            if os.path.getsize(log) > 4 << 20:
                os.replace(log, log + ".1")
        except OSError:
            pass
        with open(log, "ab", opener=lambda p, flags: os.open(p, flags, 0o600)) as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pgdr", *self.argv_prefix], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, close_fds=True,
                                         start_new_session=True)


def answer_push(argv: list[str]) -> int | None:
    """pgdr.fast's hook for ``wal-push``: wait for the pusher to acknowledge this file (0), report what it
    could not archive (1), or None for the full command (which archives in this process)."""
    args = parse(argv, "wal-push", frozenset({"--parallel", "--batch", "--timeout"}))
    if args is None or len(args.positionals) != 1:
        return None
    try:
        parallel = int(args.options.get("--parallel", args.options.get("--batch", DEFAULT_PARALLEL)))
        timeout = float(args.options.get("--timeout", DEFAULT_TIMEOUT))
    except ValueError:
        return None  # the full command says what is wrong
    path = args.positionals[0]
    name = os.path.basename(path)
    spool = spool_of(path)
    if parallel <= 0 or spool is None or not is_wal_file_name(name) or not 0 < timeout <= 3600:
        return None
    try:
        stamp = file_stamp(os.stat(path))
        if os.stat(os.path.dirname(spool)).st_uid != os.geteuid():
            return None  # not the server's own user (root pushing by hand): the queue is the server's
        os.makedirs(spool, mode=0o700, exist_ok=True)
    except OSError:
        return None  # the full command reports it
    who = identity(args.cluster, args.config)
    config = ["--config", os.path.abspath(args.config)] if args.config else []
    pusher = _Pusher(spool, [*config, "wal-push-queue", "--cluster", args.cluster,
                             "--parallel", str(min(parallel, MAX_PARALLEL)), os.path.dirname(spool)])
    ok, error = os.path.join(spool, name + ".ok"), os.path.join(spool, name + ".error")
    deadline = time.monotonic() + timeout
    next_look, pause = 0.0, 0.001
    while True:
        ack = Ack.read(ok)
        if ack is not None and ack.who == who and ack.stamp == stamp:
            try:
                os.unlink(ok)
            except OSError:
                pass
            if not args.quiet:
                print(f"pgdr: {name} archived by the push queue ({ack.key})", file=sys.stderr)
            return 0
        message = _read_text(error)
        if message is not None:
            try:
                os.unlink(error)
            except OSError:
                pass
            print(f"pgdr: {name} was not archived: {message.strip()} (PostgreSQL will retry)", file=sys.stderr)
            return 1
        now = time.monotonic()
        if now >= next_look:  # is anyone working on it?
            next_look = now + 0.1
            running = pusher.running()
            if running and running != who:
                print(f"pgdr: the push queue of {os.path.dirname(spool)} runs for another configuration "
                      f"({running}); archiving {name} in this process", file=sys.stderr)
                return None
            if running is None and not pusher.starting():
                if pusher.starts >= 3:
                    print(f"pgdr: the WAL push queue keeps stopping (see {os.path.join(spool, LOG)}); archiving "
                          f"{name} in this process", file=sys.stderr)
                    return None
                pusher.start()
        if now >= deadline:
            print(f"pgdr: {name} not archived by the push queue within {timeout:g} s (see "
                  f"{os.path.join(spool, LOG)}); PostgreSQL will retry", file=sys.stderr)
            return 1
        time.sleep(pause)
        pause = min(pause * 1.5, 0.01)


# ---- the pusher (imports what it needs: it starts once, not per segment)

def run_pusher(archive, pg_wal: str, parallel: int, who: str, idle: float = 30.0, poll: float = 0.02) -> dict:
    """Archive every ready WAL file of the server owning ``pg_wal``, ``parallel`` in flight, acknowledging
    each in the spool once durable. Runs until nothing was ready for ``idle`` seconds, the server stopped,
    or the spool is gone. One per spool: returns at once when another holds the lock."""
    import fcntl
    import logging
    import threading
    from concurrent.futures import ThreadPoolExecutor

    log = logging.getLogger(__name__)
    spool = os.path.join(pg_wal, SPOOL_DIR)
    status = os.path.join(pg_wal, "archive_status")
    datadir = os.path.dirname(os.path.abspath(pg_wal))
    os.makedirs(spool, mode=0o700, exist_ok=True)
    lock_fd = os.open(os.path.join(spool, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)
        return {"archived": 0, "failed": 0, "reason": "another pusher runs"}
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n{who}\n".encode())
    wake = threading.Event()
    archive.cpu_slots = threading.BoundedSemaphore(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                   else os.cpu_count() or 1)
    in_flight: dict[str, object] = {}
    archived = failed = 0
    last_work = last_rotation = time.monotonic()
    reason = "idle"
    log.info("push queue for %s: up to %d segments in flight", pg_wal, parallel)

    def one(name: str) -> bool:
        try:
            path = os.path.join(pg_wal, name)
            st = os.stat(path)
            result = push_file(archive, path, spool)
            after = os.stat(path)
            if file_stamp(after) != file_stamp(st):
                raise OSError(f"{name} changed while it was archived")
            Ack(who, file_stamp(st), result.sha256, result.key).write(os.path.join(spool, name + ".ok"))
            return True
        except Exception as e:  # noqa: BLE001 - reported to the archive_command call, which exits 1
            log.warning("could not archive %s: %s", name, e)
            try:
                tmp = os.path.join(spool, f".{name}.error")
                with open(tmp, "w") as f:
                    f.write(" ".join(str(e).split()) or type(e).__name__)
                os.replace(tmp, os.path.join(spool, name + ".error"))
            except OSError:
                pass
            return False
        finally:
            wake.set()

    # name -> when its acknowledgement was first seen taken by its archive_command call; until PostgreSQL
    # marks it done (.ready -> .done, a moment later) it is not pushed again. Still ready a while later
    # (the server crashed after the call returned, say): pushed again, and found archived.
    acknowledged: dict[str, float] = {}
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="pgdr-push")
    try:
        while True:
            now = time.monotonic()
            for name, fut in list(in_flight.items()):  # before listing: a finished push's answer is on disk
                if fut.done():
                    del in_flight[name]
                    if fut.result():
                        archived += 1
                        acknowledged[name] = float("inf")
                    else:
                        failed += 1
            try:
                ready = [f[:-6] for f in os.listdir(status) if f.endswith(".ready")]
                spooled = set(os.listdir(spool))
            except OSError:
                reason = "server gone"
                break
            ready_set = set(ready)
            for f in spooled:  # answers nobody will ask for any more
                base, _, ext = f.rpartition(".")
                if ext in ("ok", "error", "pending") and base not in ready_set and base not in in_flight:
                    _unlink(os.path.join(spool, f))
            for name in [n for n in acknowledged if n not in ready_set]:
                del acknowledged[name]
            waiting = False
            # Timeline history first, as PostgreSQL's archiver does, then oldest first.
            for name in sorted(ready, key=lambda n: (not n.endswith(".history"), n)):
                if name in in_flight or not is_wal_file_name(name) or name + ".error" in spooled:
                    continue
                ack = Ack.read(os.path.join(spool, name + ".ok")) if name + ".ok" in spooled else None
                if ack is not None and ack.who == who:
                    continue  # waiting for its archive_command call
                if ack is not None:
                    _unlink(os.path.join(spool, name + ".ok"))  # another configuration's: not ours to trust
                elif name in acknowledged:  # (its acknowledgement may have been taken since the listing)
                    if acknowledged[name] == float("inf"):
                        acknowledged[name] = now  # taken just now
                    if now - acknowledged[name] < 5:
                        continue
                    del acknowledged[name]
                waiting = True
                if len(in_flight) < parallel:
                    in_flight[name] = pool.submit(one, name)
            if in_flight or waiting:
                last_work = now
            elif not os.path.exists(os.path.join(datadir, "postmaster.pid")):
                reason = "server stopped"
                break
            elif now - last_work > idle:
                break
            if not os.path.isdir(spool):
                reason = "spool removed"
                break
            if now - last_rotation > 60:
                last_rotation = now
                _rotate_log(spool)
            wake.wait(poll)
            wake.clear()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in in_flight.values():
            if fut.done() and not fut.cancelled():
                archived += 1 if fut.result() else 0
        os.close(lock_fd)
    log.info("push queue for %s stops (%s): %d archived, %d failed", pg_wal, reason, archived, failed)
    return {"archived": archived, "failed": failed, "reason": reason}


def push_file(archive, path: str, spool: str | None = None):
    """Archive one file PostgreSQL asked to archive, checked as ``wal-push`` checks it. With a spool, one
    process at a time pushes a given name (a flock on ``<NAME>.pending``), and the key is recorded there,
    fsynced, before the upload starts: a retry after a crash, or a second pusher, writes the same key or
    finds it archived — never a second copy of the same segment."""
    import fcntl
    import re

    from pgdr.wal import SEGMENT, require_supported_segment_size, segment_size_of_file

    stamp = re.compile(r"\.\d{8}T\d{6}Z(?=\.|$)")  # the archive time in a segment's key
    name = os.path.basename(path)
    if SEGMENT.fullmatch(name):
        require_supported_segment_size(segment_size_of_file(path), path)
    pending = os.path.join(spool or "", name + ".pending")
    try:
        if spool is None:
            raise FileNotFoundError("no spool")
        os.makedirs(spool, mode=0o700, exist_ok=True)
        fd = os.open(pending, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        # No spool, or one this user cannot write (root pushing a segment by hand): then no pusher of this
        # user is at it either. Archived as ever; the repository refuses different content under one name.
        return archive.push(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)

        def choose(sha: str, key: str) -> str:
            known = os.pread(fd, 4096, 0).decode(errors="replace").split()
            if len(known) == 2 and known[0] == sha and stamp.sub("", known[1]) == stamp.sub("", key):
                return known[1]  # the same content, compression and encryption: the same object
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{sha} {key}\n".encode(), 0)
            os.fsync(fd)
            return key

        result = archive.push(path, choose_key=choose)
        _unlink(pending)
        return result
    finally:
        os.close(fd)


def _rotate_log(spool: str, limit: int = 4 << 20) -> None:
    """A busy pusher never idles out: keep its log (its stderr, when that is the spool's log) bounded."""
    log = os.path.join(spool, LOG)
    try:
        st, err = os.stat(log), os.fstat(2)
        if (st.st_dev, st.st_ino) != (err.st_dev, err.st_ino) or st.st_size <= limit:
            return
        os.replace(log, log + ".1")
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
