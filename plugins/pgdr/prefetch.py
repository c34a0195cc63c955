"""The WAL prefetch spool: restore_command at the speed of a rename, not of one interpreter's imports per file.

PostgreSQL's startup process runs ``restore_command`` once per WAL file, one
after another, and replays nothing while it waits. pgdr's answer is
pgBackRest's asynchronous archive-get: one long-lived **prefetcher** per
recovery (``pgdr.wal.run_prefetcher``, one interpreter, one repository client)
keeps the next segments downloaded, verified and written out to disk in a spool,
several in flight, and answers what the spool lacks. Each ``pgdr wal-fetch``
call (the restore_command) only asks the spool, from this module, before
anything heavy is imported (``pgdr.fast``):

- a copy of the asked file is there, left by a prefetcher of the same cluster
  and configuration file that is running now: unless the prefetcher recorded
  it as checked and nothing wrote to it since (``mark_verified``), its SHA-256
  is checked against the one in its name; it is renamed into place (``%p``, in
  pg_wal: no copy) and the call exits 0;
- otherwise the call asks the prefetcher for it (starting one when none runs)
  and waits: for the copy (exit 0 as above), or for "not in the archive" from a
  lookup the prefetcher began after the call asked (exit 1: as fresh as the
  call's own lookup would have been).

Anything else — another configuration's prefetcher, a copy whose content does
not match its name, a prefetcher that failed to fetch the file (damage, an
unreachable repository: it never says why on the call's behalf), one that does
not answer or does not start, a streamed partial segment, ``--json``,
``--prefetch 0`` — returns None, and the full command runs: it fetches the file
itself and keeps wal-fetch's exit codes (0 restored, 1 only "not in the
archive", 200 any other failure).

The spool, ``pg_wal/.pgdr-prefetch/`` (in pg_wal, so a copy is renamed into
place; the server's user owns it; base backups skip pg_wal):

    prefetcher.lock   flock()ed by the running prefetcher: "pid\\nidentity\\n" (free: none runs)
    prefetcher.log    the prefetcher's own log
    want              "NAME NONCE": the file a call waits for, or "NAME -": the file PostgreSQL took last;
                      the prefetcher keeps the segments after NAME ready
    answer            "NONCE missing|defer|error MESSAGE": the prefetcher's answer to request NONCE
    NAME.SHA256       a verified copy of NAME, its content already on disk (fdatasync), so the server's own
                      fsync of the restored segment has nothing left to write
    .NAME.SHA256.verified  "inode size mtime_ns" of that copy when its prefetcher checked it
    .NAME.tmp         a copy being written

A call claims a copy by renaming it into pg_wal as ``.DEST.pgdr-claim-PID`` (DEST: the name PostgreSQL asked for,
RECOVERYXLOG) before checking it and renaming it to DEST. A call killed between the two renames leaves its
claim behind, 16 MiB: each prefetcher, as it starts, removes the claims of calls no longer running.

This module imports only the standard library.
"""

from __future__ import annotations

import os
import sys
import time

from pgdr.fast import (announce, holder_identity, identity, is_segment, is_wal_file_name, lock_exclusively, lock_holder,
                       own_pg_wal, parse, pgdr_command, postmaster_is_init, sha256_hex, unlock)

PREFETCH_DIR = ".pgdr-prefetch"
LOCK = "prefetcher.lock"
LOG = "prefetcher.log"
WANT = "want"
ANSWER = "answer"
VERIFIED = ".verified"  # ".NAME.SHA256.verified": how the prefetcher left a copy it checked
TOOK = "-"  # the nonce of a want that asks for nothing: PostgreSQL took NAME
DEFAULT_COUNT = 8
MAX_COUNT = 64
SEG_SIZE = 16 * 1024 * 1024
WAIT = 60.0  # how long a call waits for the prefetcher before fetching itself
_SHA_HEX = frozenset("0123456789abcdef")
CLAIM = ".pgdr-claim-"  # ".DEST.pgdr-claim-PID": the copy a call claimed, in pg_wal (Spool.take); never the
# ".DEST.pgdr-HEX" of the full command's own download (WalArchive.fetch), which may be all digits


def spool_of(dest: str | os.PathLike) -> str:
    """Where prefetched files wait: beside the file PostgreSQL asked for (inside pg_wal)."""
    return os.path.join(os.path.dirname(os.path.abspath(dest)), PREFETCH_DIR)


def own_spool(dest: str | os.PathLike) -> "Spool | None":
    """The spool a call restoring into ``dest`` may use (created if missing), or None: the call fetches just
    what it was asked for. Only the server's own restore_command gets one: ``dest`` in a directory named
    pg_wal that this user owns, the spool in it a real directory (not a link) of this user's that nobody
    else may write. A file restored by hand elsewhere, or by root into a server's pg_wal, starts no
    prefetcher and takes nothing from a spool someone else could have filled."""
    pg_wal = own_pg_wal(dest)
    if pg_wal is None:
        return None
    spool = Spool(os.path.join(pg_wal, PREFETCH_DIR))
    return spool if spool.made_and_own() else None


def sha256_file(path: str) -> tuple[str, int]:
    """(SHA-256, size) of a file, read through one mapping (no copy into Python)."""
    import hashlib  # OpenSSL's: several times the interpreter's own speed, and 4 ms to load, so only here
    import mmap

    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return h.hexdigest(), size


class SpoolDamaged(Exception):
    """A copy in the spool does not match the SHA-256 in its name (it was removed)."""


class PrefetchDeclined(Exception):
    """No prefetcher may run for this server (why, in the message)."""


class Spool:
    def __init__(self, path: str | os.PathLike):
        self.path = str(path)

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name)

    def make(self) -> None:
        """Create the spool (not its parent: a spool whose pg_wal is gone serves nobody)."""
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            pass

    def made_and_own(self) -> bool:
        """Created if missing; True when it is a real directory (not a link) of this user's that nobody else
        may write."""
        import stat

        try:
            self.make()
            st = os.lstat(self.path)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077

    # -- the prefetcher's lock: who serves this spool
    def holder(self) -> str | None:
        """The running prefetcher's "pid\\nidentity\\n" ("" while it starts), None when none runs."""
        return lock_holder(self._p(LOCK))

    who_of = staticmethod(holder_identity)

    def hold(self, who: str, wait: float = 2.0) -> int | None:
        """Become this spool's prefetcher: the lock's descriptor, or None when another one runs. What an
        earlier prefetcher left (of this configuration or another) is removed before ``who`` is written."""
        self.make()
        fd = lock_exclusively(self._p(LOCK), wait)
        if fd is not None:
            self.clear()
            announce(fd, who)
        return fd

    release = staticmethod(unlock)

    # -- copies
    def copies(self) -> dict[str, str]:
        """{file name: its copy's name in the spool} (one listing)."""
        out = {}
        try:
            entries = os.listdir(self.path)
        except OSError:
            return out
        for entry in entries:
            name, _, sha = entry.rpartition(".")
            if len(sha) == 64 and _SHA_HEX.issuperset(sha) and not name.startswith("."):
                out[name] = entry
        return out

    def copy_of(self, name: str) -> str | None:
        """The spool's copy of ``name`` (``NAME.SHA256``), if any."""
        return self.copies().get(name)

    def clear(self) -> None:
        """Remove every copy, partly written copy and answer (not the want: a call may be waiting)."""
        try:
            entries = os.listdir(self.path)
        except OSError:
            return
        copies = set(self.copies().values())
        for entry in entries:
            if entry in copies or entry == ANSWER or (entry.startswith(".") and entry.endswith((".tmp", VERIFIED))):
                _unlink(self._p(entry))

    def take(self, name: str, dest: str, who: str) -> str | None:
        """Move the spool's copy of ``name`` to ``dest`` (a rename) once its content matches the SHA-256 in
        its name; its SHA-256, or None when there is no copy a running prefetcher of ``who`` left.
        SpoolDamaged when the copy does not match (it is removed)."""
        before = self.holder()
        if not before or self.who_of(before) != who:
            return None
        entry = self.copy_of(name)
        if entry is None:
            return None
        sha = entry[len(name) + 1:]
        dest = os.path.abspath(dest)
        # Claimed first (a rename to a name only this call uses): the prefetcher's clean-up cannot remove it
        # while it is checked, and nothing else renames it.
        tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}{CLAIM}{os.getpid()}")
        try:
            os.rename(self._p(entry), tmp)
        except FileNotFoundError:
            return None
        try:
            st = os.lstat(tmp)
            if not _plain_file_of_ours(st):
                raise SpoolDamaged(f"the prefetched copy of {name} is not a plain file of this user's: removed")
            if self._verified(entry) == (st.st_ino, st.st_size, st.st_mtime_ns):
                digest, size = sha, st.st_size  # not written since the prefetcher checked it: not read again
            else:
                digest, size = sha256_file(tmp)
            if digest != sha or (is_segment(name) and size != SEG_SIZE):
                raise SpoolDamaged(f"the prefetched copy of {name} does not match its SHA-256 ({size} bytes): "
                                   "removed")
            if self.holder() != before:
                _unlink(tmp)  # the prefetcher changed meanwhile: what it left is not known to be who's
                return None
            os.replace(tmp, dest)
        except BaseException:
            _unlink(tmp)
            raise
        return sha

    def mark_verified(self, entry: str, path: str | os.PathLike) -> None:
        """Record the copy at ``path``, about to be renamed to ``entry``, as its prefetcher checked it
        (SHA-256 against the archive, on disk): its inode, size and modification time, which the rename
        keeps. Written before the copy appears, so no call finds the copy without it. A call that finds it
        so renames it in without reading 16 MiB again (a SHA-256 in the server's startup process, between
        two segments' replay); a copy written to since, in any way, no longer matches and is checked in
        full."""
        st = os.lstat(path)
        _write(self._p(f".{entry}{VERIFIED}"), f"{st.st_ino} {st.st_size} {st.st_mtime_ns}\n")

    def _verified(self, entry: str) -> tuple[int, int, int] | None:
        path = self._p(f".{entry}{VERIFIED}")
        try:
            with open(path) as f:
                parts = f.read(100).split()
            return (int(parts[0]), int(parts[1]), int(parts[2])) if len(parts) == 3 else None
        except (OSError, ValueError):
            return None
        finally:
            _unlink(path)

    # -- requests and answers
    def want(self, name: str, nonce: str = TOOK) -> None:
        """Tell the prefetcher which file is wanted (``nonce``: a call waits for it) or was taken last."""
        self.make()
        _write(self._p(WANT), f"{name} {nonce}\n")

    def read_want(self) -> tuple[str, str] | None:
        try:
            with open(self._p(WANT)) as f:
                parts = f.read(200).split()
        except (OSError, UnicodeDecodeError):
            return None
        return (parts[0], parts[1]) if len(parts) == 2 else None

    def answer(self, nonce: str, who: str, status: str, message: str = "") -> None:
        """The prefetcher's answer to request ``nonce``, signed with whose prefetcher gave it."""
        _write(self._p(ANSWER), f"{nonce} {_tag(who)} {status} {' '.join(message.split())}\n")

    def read_answer(self, nonce: str, who: str) -> tuple[str, str] | None:
        """(status, message) of the answer to ``nonce`` from a prefetcher of ``who``; None for any other."""
        try:
            with open(self._p(ANSWER), errors="replace") as f:
                parts = f.read(4096).rstrip("\n").split(" ", 3)
        except OSError:
            return None
        if len(parts) < 3 or parts[0] != nonce or parts[1] != _tag(who):
            return None
        return parts[2], parts[3] if len(parts) > 3 else ""

    def still_held_by(self, fd: int) -> bool:
        """The lock held through ``fd`` is still this spool's lock file (not one removed with an earlier
        spool, while a new one took its place)."""
        try:
            held, now = os.fstat(fd), os.lstat(self._p(LOCK))
        except OSError:
            return False
        return held.st_nlink > 0 and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)

    def note_once(self, name: str) -> bool:
        """True the first time ``name`` is noted in this spool (a marker file created exclusively)."""
        try:
            self.make()
            os.close(os.open(self._p("." + name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return True
        except FileExistsError:
            return False
        except OSError:
            return True

    # -- the prefetcher
    def under_init(self) -> bool:
        """The server recovering into this pg_wal runs as PID 1 (see pgdr.fast.postmaster_is_init)."""
        return postmaster_is_init(os.path.dirname(os.path.dirname(self.path)))

    def start_prefetcher(self, cluster: str, config: str | None, after: str, count: int):
        """Start a detached ``pgdr wal-prefetch`` for this spool (no shell); its stderr goes to the spool's log.
        It exits at once when another prefetcher holds the spool."""
        import subprocess

        if self.under_init():
            raise PrefetchDeclined("the postmaster is PID 1: a background prefetcher would be its orphan; each "
                                   "file is fetched by its own call")
        cmd = [*pgdr_command(), *(["--config", os.path.abspath(config)] if config else []), "-q",
               "wal-prefetch", "--cluster", cluster, after, self.path, "--count", str(count), "--follow"]
        self.make()
        with open(self._p(LOG), "ab", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW, 0o600)) as log:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                    close_fds=True, start_new_session=True, cwd=self.path)


def remove_abandoned_claims(pg_wal: str | os.PathLike) -> list[str]:
    """Remove from ``pg_wal`` the copies claimed by calls no longer running (killed between their two renames,
    see Spool.take): plain files of this user's named ``.DEST.pgdr-claim-PID`` whose process is gone. A claim
    whose PID runs (that call, or a process that took its number) is left alone; so is everything, when
    ``pg_wal`` is not a pg_wal directory of this user's. The names removed."""
    removed = []
    if own_pg_wal(os.path.join(pg_wal, PREFETCH_DIR)) is None:
        return removed
    with os.scandir(pg_wal) as entries:
        for entry in entries:
            head, sep, pid = entry.name.rpartition(CLAIM)
            if not sep or not head.startswith(".") or len(head) < 2 or not pid.isdigit() or not pid.isascii():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # running
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError, ValueError):
                continue  # another user's process runs with that number; or no process could have it
            try:
                if _plain_file_of_ours(entry.stat(follow_symlinks=False)):
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except OSError:
                pass
    return removed


def _tag(who: str) -> str:
    return sha256_hex(who.encode())[:16]


def _plain_file_of_ours(st: os.stat_result) -> bool:
    import stat

    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1


def _write(path: str, text: str) -> None:
    """Replace a small file at once (a reader never sees half of it)."""
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---- pgdr.fast's answer for ``wal-fetch`` (restore_command)

_asked = False  # pgdr.fast.answer may be called twice in one process (launcher, then CLI): ask the spool once


def answer_fetch(argv: list[str]) -> int | None:
    """0: the file is in place, from the spool; 1: the prefetcher looked it up after this call asked, and it is
    not in the archive; None: the full command runs (see the module's docstring)."""
    global _asked
    if _asked:
        return None
    _asked = True
    args = parse(argv, "wal-fetch", frozenset({"--prefetch"}))
    if args is None or len(args.positionals) != 2:
        return None
    name, dest = args.positionals
    try:
        count = int(args.options.get("--prefetch", DEFAULT_COUNT))
    except ValueError:
        return None  # the full command says what is wrong
    if count <= 0 or not is_wal_file_name(name):
        return None
    try:
        return _answer(args, name, dest, min(count, MAX_COUNT))
    except SpoolDamaged as e:
        print(f"pgdr: {e}; fetching {name} from the archive", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - the spool is only a shortcut: the full command fetches and reports
        print(f"pgdr: the prefetch spool could not answer for {name} ({type(e).__name__}: {e}); fetching it "
              "from the archive", file=sys.stderr)
    return None


def _answer(args, name: str, dest: str, count: int) -> int | None:
    spool = own_spool(dest)
    if spool is None:
        return None  # not the server's own restore_command (see own_spool): the full command fetches
    who = identity(args.cluster, args.config)
    holder = spool.holder()
    if holder is not None and spool.who_of(holder) not in (who, None):
        return None  # the spool is served for another cluster or configuration file: nothing of it is used
    if holder and spool.take(name, dest, who):
        return _restored(spool, args, name)
    if holder is None and spool.under_init():
        return None  # no prefetcher may start here: the full command fetches (and says why once)
    nonce = os.urandom(8).hex()
    spool.want(name, nonce)
    proc = spool.start_prefetcher(args.cluster, args.config, name, count) if holder is None else None
    deadline = time.monotonic() + WAIT
    next_look, pause = 0.0, 0.0005
    while True:
        if spool.take(name, dest, who):
            return _restored(spool, args, name)
        answered = spool.read_answer(nonce, who)
        if answered is not None:
            if answered[0] == "missing":
                print(f"pgdr: {name} is not in the archive of cluster '{args.cluster}'", file=sys.stderr)
                return 1
            return None  # defer (a streamed partial segment) or error: the full command fetches and reports
        now = time.monotonic()
        if now >= next_look:
            next_look = now + 0.05
            holder = spool.holder()
            if holder is None and (proc is None or proc.poll() is not None):
                return None  # no prefetcher: it stopped, or could not start (the full command says why)
            if holder and spool.who_of(holder) not in (who, None):
                return None
        if now >= deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.004)


def _restored(spool: Spool, args, name: str) -> int:
    spool.want(name)
    if not args.quiet:
        print(f"pgdr: restored {name} from the prefetch spool", file=sys.stderr)
    return 0
