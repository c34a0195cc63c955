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

An acknowledgement counts only for the same cluster and configuration file (its
path and its device, inode, size and modification time: an edited configuration
is another one), and for the very file PostgreSQL asks about (device, inode,
size and modification time as the pusher read it). A pusher stops when its
configuration changes, after 10 minutes of work (the next call starts a fresh
one, with fresh credentials), on SIGTERM (once its uploads in flight are done),
when nothing was ready for 30 s, or when the server stops.

Anything unusual runs the full command, which archives in the calling process,
as it always could: no spool, a path outside pg_wal or a file the server is not
waiting on, ``--json``, ``--parallel 0``, a caller that is not the server's own
user, less than 64 MiB free beside pg_wal (archiving must go on when the disk
fills: that is when it frees space), and a postmaster running as PID 1 (a
container's init: a pusher left to it, were it killed, would look like a crashed
backend and restart the server).

The part that runs on every archive_command call imports only the standard library.
"""

from __future__ import annotations

import os
import sys
import time

from pgdr.fast import (announce, holder_identity, identity, is_wal_file_name, lock_exclusively, lock_holder, own_pg_wal,
                       parse, pgdr_command, postmaster_is_init, unlock)

SPOOL_DIR = ".pgdr-push"
LOCK = "pusher.lock"
LOG = "pusher.log"
DEFAULT_PARALLEL = 4
MAX_PARALLEL = 8  # each in flight holds at most one compressed segment: 8 stay far under 256 MB
DEFAULT_TIMEOUT = 60.0
MIN_FREE = 64 << 20  # below this, beside pg_wal, calls archive in their own process and write nothing there
MAX_AGE = 600.0  # a pusher hands over to a fresh one after this long (configuration, credentials, keys)
_ACK_MAGIC = "pgdr-push-ack 1"

def spool_of(path: str) -> str | None:
    """The push spool for a file PostgreSQL asks to archive: a file in pg_wal that the server marked ready
    (``archive_status/<NAME>.ready``), when the caller is pg_wal's owner (the server's user). None for
    anything else (a file copied elsewhere, a segment pushed by hand, root at the console): the pusher
    only archives what the server's queue holds, and only the server's user writes the spool."""
    pg_wal = own_pg_wal(path)
    if pg_wal is None or not os.path.exists(os.path.join(pg_wal, "archive_status", os.path.basename(path) + ".ready")):
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
        try:
            with open(tmp, "w") as f:
                f.write(self.text())
            os.replace(tmp, path)
        except OSError:
            _unlink(tmp)
            raise


def _read_text(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _unsafe_here(pg_wal: str) -> str | None:
    """Why the queue must not be used for this server now (None: it may)."""
    if postmaster_is_init(os.path.dirname(pg_wal)):
        return "the postmaster is PID 1"
    try:
        vfs = os.statvfs(pg_wal)
    except OSError as e:
        return str(e)
    if vfs.f_bavail * vfs.f_frsize < MIN_FREE:
        return "less than 64 MiB free beside pg_wal"
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
        holder = lock_holder(os.path.join(self.spool, LOCK))
        return None if holder is None else holder_identity(holder) or ""

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
            self.proc = subprocess.Popen([*pgdr_command(), *self.argv_prefix], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, close_fds=True,
                                         start_new_session=True, cwd=self.spool)


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
    if not 0 <= parallel <= MAX_PARALLEL or not 0 < timeout <= 3600:
        return None  # the same: a usage error, exit 2
    path = args.positionals[0]
    name = os.path.basename(path)
    spool = spool_of(path)
    if parallel == 0 or spool is None or not is_wal_file_name(name):
        return None
    pg_wal = os.path.dirname(spool)
    unsafe = _unsafe_here(pg_wal)
    if unsafe:
        if not args.quiet:
            print(f"pgdr: archiving {name} in this process ({unsafe})", file=sys.stderr)
        return None
    try:
        stamp = file_stamp(os.stat(path))
        os.makedirs(spool, mode=0o700, exist_ok=True)
    except OSError:
        return None  # the full command reports it
    who = identity(args.cluster, args.config)
    config = ["--config", os.path.abspath(args.config)] if args.config else []
    pusher = _Pusher(spool, [*config, "wal-push-queue", "--cluster", args.cluster, "--parallel", str(parallel),
                             "--identity", who, pg_wal])
    ok, error = os.path.join(spool, name + ".ok"), os.path.join(spool, name + ".error")
    deadline = time.monotonic() + timeout
    next_look, pause, other_since = 0.0, 0.001, None
    while True:
        ack = Ack.read(ok)
        if ack is not None and ack.who == who and ack.stamp == stamp:
            _unlink(ok)
            if not args.quiet:
                print(f"pgdr: {name} archived by the push queue ({ack.key})", file=sys.stderr)
            return 0
        message = _read_text(error)
        if message is not None:
            _unlink(error)
            print(f"pgdr: {name} was not archived: {message.strip()} (PostgreSQL will retry)", file=sys.stderr)
            return 1
        now = time.monotonic()
        if now >= next_look:  # is anyone working on it?
            next_look = now + 0.1
            running = pusher.running()
            if running and running != who:
                # Another configuration's pusher (or this one's before an edit): it stops within a second
                # when its configuration changed. One that stays is another cluster's or file's.
                other_since = other_since or now
                if now - other_since > 3:
                    print(f"pgdr: the push queue of {pg_wal} runs for another configuration ({running}); "
                          f"archiving {name} in this process", file=sys.stderr)
                    return None
            elif running is None and not pusher.starting():
                if pusher.starts >= 3:
                    print(f"pgdr: the WAL push queue keeps stopping (see {os.path.join(spool, LOG)}); archiving "
                          f"{name} in this process", file=sys.stderr)
                    return None
                try:
                    pusher.start()
                except OSError as e:
                    print(f"pgdr: cannot start the WAL push queue ({e}); archiving {name} in this process",
                          file=sys.stderr)
                    return None
        if now >= deadline:
            print(f"pgdr: {name} not archived by the push queue within {timeout:g} s (see "
                  f"{os.path.join(spool, LOG)}); PostgreSQL will retry", file=sys.stderr)
            return 1
        time.sleep(pause)
        pause = min(pause * 1.5, 0.003)  # an acknowledgement seen late holds up the archiver: look often


# ---- the pusher (imports what it needs: it starts once, not per segment)

def run_pusher(archive, pg_wal: str, parallel: int, who: str, current_identity=None, idle: float = 30.0,
               max_age: float = MAX_AGE) -> dict:
    """Archive every ready WAL file of the server owning ``pg_wal``, ``parallel`` in flight, acknowledging
    each in the spool once durable. Stops (its uploads in flight finished) when nothing was ready for
    ``idle`` seconds, after ``max_age`` seconds, when ``current_identity()`` (the configuration, read again
    every second) is no longer ``who``, on SIGTERM, when the server stopped, or when the spool is gone.
    One per spool: returns at once when another holds the lock."""
    import logging
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor

    log = logging.getLogger(__name__)
    spool = os.path.join(pg_wal, SPOOL_DIR)
    status = os.path.join(pg_wal, "archive_status")
    datadir = os.path.dirname(os.path.abspath(pg_wal))
    os.makedirs(spool, mode=0o700, exist_ok=True)
    lock_fd = lock_exclusively(os.path.join(spool, LOCK), 0.05)
    if lock_fd is None:
        return {"archived": 0, "failed": 0, "reason": "another pusher runs"}
    try:
        announce(lock_fd, who)
    except OSError:
        pass  # a full disk: calls see an unnamed pusher, which is fine
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *a: stop.set())
    wake = threading.Event()
    archive.cpu_slots = threading.BoundedSemaphore(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                   else os.cpu_count() or 1)
    in_flight: dict[str, object] = {}
    # name -> the file stamp this pusher acknowledged (its .ok waits for the call), or, once the call took
    # it, the time it was first seen taken: until PostgreSQL marks it done (.ready -> .done, a moment later)
    # it is not pushed again. Still ready a while later (the server crashed after the call returned, say):
    # pushed again, and found archived.
    acked: dict[str, str] = {}
    taken: dict[str, float] = {}
    backoff: dict[str, float] = {}  # name -> not before (its acknowledgement could not be written)
    archived = failed = 0
    started = last_work = last_rotation = last_config = time.monotonic()
    reason = "idle"
    log.info("push queue for %s: up to %d segments in flight", pg_wal, parallel)

    def one(name: str):
        """(True, stamp) archived and acknowledged; (False, None) failed and reported; (None, None) archived
        but the acknowledgement could not be written (a full disk): tried again later."""
        try:
            return _one(name)
        finally:
            wake.set()

    def _one(name: str):
        path = os.path.join(pg_wal, name)
        try:
            stamp = file_stamp(os.stat(path))

            def unchanged() -> None:
                if file_stamp(os.stat(path)) != stamp:
                    raise OSError(f"{name} changed while it was being archived; not stored")

            result = push_file(archive, path, spool, before_store=unchanged)
            unchanged()
        except Exception as e:  # noqa: BLE001 - reported to the archive_command call, which exits 1
            log.warning("could not archive %s: %s", name, e)
            try:
                tmp = os.path.join(spool, f".{name}.error")
                with open(tmp, "w") as f:
                    f.write(" ".join(str(e).split()) or type(e).__name__)
                os.replace(tmp, os.path.join(spool, name + ".error"))
            except OSError:
                backoff[name] = time.monotonic() + 5
            return False, None
        try:
            Ack(who, stamp, result.sha256, result.key).write(os.path.join(spool, name + ".ok"))
        except OSError as e:
            log.warning("archived %s, but cannot write its acknowledgement (%s); trying again in 5 s", name, e)
            backoff[name] = time.monotonic() + 5
            return None, None
        return True, stamp

    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="pgdr-push")
    poll = 0.02
    try:
        while True:
            now = time.monotonic()
            changed = False
            for name, fut in list(in_flight.items()):  # before listing: a finished push's answer is on disk
                if fut.done():
                    del in_flight[name]
                    changed = True
                    ok, stamp = fut.result()
                    if ok:
                        archived += 1
                        acked[name] = stamp
                    elif ok is False:
                        failed += 1
            try:
                ready = [f[:-6] for f in os.listdir(status) if f.endswith(".ready")]
                spooled = set(os.listdir(spool))
            except OSError:
                reason = "server gone"
                break
            ready_set = set(ready)
            for f in spooled:  # answers nobody will ask for any more, and leftovers of a crash
                base, _, ext = f.rpartition(".")
                if (ext in ("ok", "error", "pending") and base not in ready_set and base not in in_flight) or \
                        (".tmp" in f and _older_than(os.path.join(spool, f), 60)):
                    _unlink(os.path.join(spool, f))
            for d in (acked, taken, backoff):
                for name in [n for n in d if n not in ready_set]:
                    del d[name]
            waiting = False
            # Timeline history first, as PostgreSQL's archiver does, then oldest first.
            ready.sort(key=lambda n: (not n.endswith(".history"), n))
            for i, name in enumerate(ready):
                if name in in_flight or not is_wal_file_name(name) or name + ".error" in spooled:
                    continue
                if backoff.get(name, 0) > now:
                    waiting = True
                    continue
                if name + ".ok" in spooled:
                    if name in acked and (i >= 4 or _stamp_of(pg_wal, name) == acked[name]):
                        continue  # waiting for its call (the oldest few: still the very file acknowledged)
                    ack = Ack.read(os.path.join(spool, name + ".ok"))
                    if ack is not None and ack.who == who and ack.stamp == _stamp_of(pg_wal, name):
                        acked[name] = ack.stamp  # an earlier pusher's, for this very file
                        continue
                    if ack is not None:  # another configuration's, or for an earlier file of that name
                        _unlink(os.path.join(spool, name + ".ok"))
                    acked.pop(name, None)
                elif name in acked or name in taken:  # its call took the acknowledgement (maybe just now)
                    acked.pop(name, None)
                    first = taken.setdefault(name, now)
                    if now - first < 5:
                        continue
                    del taken[name]
                waiting = True
                if len(in_flight) >= parallel:
                    break
                in_flight[name] = pool.submit(one, name)
                changed = True
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
            if now - last_config > 1:
                last_config = now
                if current_identity is not None and current_identity() != who:
                    stop.set()
                    reason = "its configuration changed"
            if now - started > max_age and not stop.is_set():
                stop.set()
                reason = f"{max_age:g} s of work: a fresh pusher takes over"
            if stop.is_set():
                reason = reason if reason != "idle" else "stopped (SIGTERM)"
                break
            if now - last_rotation > 60:
                last_rotation = now
                _rotate_log(spool)
            poll = 0.02 if changed else min(poll * 2, 0.2)
            wake.wait(poll)
            wake.clear()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in in_flight.values():
            if fut.done() and not fut.cancelled() and fut.result()[0]:
                archived += 1
        unlock(lock_fd)
    log.info("push queue for %s stops (%s): %d archived, %d failed", pg_wal, reason, archived, failed)
    return {"archived": archived, "failed": failed, "reason": reason}


def _stamp_of(pg_wal: str, name: str) -> str | None:
    try:
        return file_stamp(os.stat(os.path.join(pg_wal, name)))
    except OSError:
        return None


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > seconds
    except OSError:
        return False


def push_file(archive, path: str, spool: str | None = None, before_store=None):
    """Archive one file PostgreSQL asked to archive, checked as ``wal-push`` checks it. With a spool, one
    process at a time pushes a given name (a flock on ``<NAME>.pending``), and the key is recorded there,
    fsynced, before the upload starts: a retry after a crash, or a second pusher, writes the same key or
    finds it archived — never a second copy of the same segment. ``before_store()`` runs once the content
    is read and may refuse it (raise) before anything is stored."""
    import fcntl
    import logging
    import re

    from pgdr.wal import SEGMENT, require_supported_segment_size, segment_size_of_file

    stamp = re.compile(r"\.\d{8}T\d{6}Z(?=\.|$)")  # the archive time in a segment's key
    name = os.path.basename(path)
    if SEGMENT.fullmatch(name):
        require_supported_segment_size(segment_size_of_file(path), path)
    pending = os.path.join(spool or "", name + ".pending")
    try:
        if spool is None or os.stat(os.path.dirname(spool)).st_uid != os.geteuid():
            raise PermissionError("not this user's spool")
        os.makedirs(spool, mode=0o700, exist_ok=True)
        fd = os.open(pending, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        # No spool, or not this user's (root pushing a segment by hand), or no room: then no pusher of this
        # user is at it either. Archived as ever; the repository refuses different content under one name.
        return archive.push(path, before_store=before_store)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)

        def choose(sha: str, key: str) -> str:
            known = os.pread(fd, 4096, 0).decode(errors="replace").split()
            if len(known) == 2 and known[0] == sha and stamp.sub("", known[1]) == stamp.sub("", key):
                return known[1]  # the same content, compression and encryption: the same object
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{sha} {key}\n".encode(), 0)
                os.fsync(fd)
            except OSError as e:  # a full disk must not stop archiving: only a retry's key is not recorded
                logging.getLogger(__name__).warning("cannot record the key of %s (%s)", name, e)
            return key

        result = archive.push(path, choose_key=choose, before_store=before_store)
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
