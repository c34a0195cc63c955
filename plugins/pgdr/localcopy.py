"""Full backups read straight from the data directory on the database host (``backup_method: local``).

Through pg_basebackup the server reads every file and sends it over a connection, and pg_basebackup
relays it again through a pipe: on a small host that costs as much CPU as compressing it. Here pgdr
reads the files itself, between ``pg_backup_start()`` and ``pg_backup_stop()`` on one session, as
pgBackRest does, and writes the very tar stream and backup_manifest pg_basebackup would: the same
exclusions, pg_control after every other file, the backup_label the server hands back, and (with
``backup_wal: embed``) the WAL from start to stop. Restore, verify, incrementals on top of it and
pg_combinebackup see no difference. Page checksums are not verified on the way (pg_basebackup's
server does that); incrementals still go through pg_basebackup, which knows the changed blocks.

Before a byte is read, pgdr proves the directory is the one the server it talks to runs in: pg_control
holds the server's system identifier, and a temporary table the server creates on pgdr's session appears
in it as a file (and is gone once dropped). Temporary relations are never replicated or copied, so a
standby's copy of the same cluster (same identifier, same path, same port, on this host or another) never
shows it, and is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from pgdr.errors import PgdrError, PostgresError
from pgdr.lsn import parse_lsn
from pgdr.postgres import ConnInfo, ServerInfo, connect, first_line
from pgdr.streams import CHUNK
from pgdr.tarstream import SPOOL_IN_MEMORY

log = logging.getLogger(__name__)

# What pg_basebackup leaves out (src/backend/backup/basebackup.c), at any depth.
EXCLUDED_DIR_CONTENTS = frozenset({"pg_stat_tmp", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial",
                                   "pg_snapshots", "pg_subtrans"})
EXCLUDED_FILES = frozenset({"postgresql.auto.conf.tmp", "current_logfiles.tmp", "backup_label", "tablespace_map",
                            "backup_manifest", "postmaster.pid", "postmaster.opts", ".DS_Store"})
EXCLUDED_PREFIXES = ("pg_internal.init", "pgsql_tmp")
RELATION = re.compile(r"(\d+)(?:_(fsm|vm|init))?(?:\.\d+)?")
TEMP_RELATION = re.compile(r"t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?")
BLOCK = 512
SMALL_FILE = 256 << 10  # read in one call, sent with its header in one piece
READ_HINT = "run pgdr as the server's user (or one in its group, with initdb --allow-group-access)"


class NotLocal(PgdrError):
    """The data directory here is not provably the connected server's: nothing was read."""


# ------------------------------------------------------------------------------------------------ tar

def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def tar_header(name: str, size: int, mode: int, mtime: float, kind: bytes, st=None) -> bytes:
    """A ustar header (a GNU long-name record first when the name is longer than 100 bytes; a size past
    8 GiB in base-256), as pgdr's TarParser and every tar read them; owner and group from ``st`` (as
    pg_basebackup's: a tar unpacked by hand belongs to the server's user)."""
    raw = name.encode("utf-8", "surrogateescape")
    head = b""
    if len(raw) > 100:
        head = tar_header("././@LongLink", len(raw) + 1, 0, 0, b"L") + _padded(raw + b"\0")
        raw = raw[:100]
    ids = (b"%07o\0%07o\0" % (st.st_uid if st is not None and st.st_uid < 8 ** 7 else 0,
                              st.st_gid if st is not None and st.st_gid < 8 ** 7 else 0))
    fields = (b"%07o\0" % (mode & 0o7777) + ids
              + (b"%011o\0" % size if size < 8 ** 11 else b"\x80" + size.to_bytes(11, "big"))
              + b"%011o\0" % max(0, min(int(mtime), 8 ** 11 - 1)))
    # The checksum counts its own field as 8 spaces, and "ustar\x0000" (which sums to 655).
    check = b"%06o\0 " % (sum(raw) + sum(fields) + 8 * 32 + kind[0] + 655)
    return head + raw + bytes(100 - len(raw)) + fields + check + kind + _TAR_GAP + b"ustar\x0000" + _TAR_TAIL


_TAR_GAP = bytes(257 - 157)  # linkname
_TAR_TAIL = bytes(BLOCK - 265)  # owner and group names, device numbers, prefix: empty


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


# ------------------------------------------------------------------------------------------- manifest

class FileChecksum:
    """CRC32C (as pg_basebackup's --manifest-checksums=CRC32C) through google-crc32c; SHA256 where that
    library is missing (correct, slower)."""

    def __init__(self):
        crc = _crc32c()
        if crc is not None:
            self.algorithm, self._c = "CRC32C", crc.Checksum()
        else:
            self.algorithm, self._c = "SHA256", hashlib.sha256()

    def update(self, data) -> None:
        self._c.update(data)

    def hexdigest(self) -> str:
        if self.algorithm == "CRC32C":
            # PostgreSQL writes the CRC's bytes as they lie in memory: least significant first.
            return int.from_bytes(self._c.digest(), "big").to_bytes(4, "little").hex()
        return self._c.hexdigest()


def _crc32c():
    """google_crc32c when its compiled implementation is there (gigabytes a second); None otherwise: its
    pure-Python fallback does 3 MB/s, days per terabyte, and SHA256 (hashlib) is used instead."""
    try:
        import google_crc32c
    except ImportError:
        return None
    return google_crc32c if getattr(google_crc32c, "implementation", None) == "c" else None


PLAIN_NAME = re.compile(r"[A-Za-z0-9_./-]*")


def _json_string(text: str) -> str:
    return f'"{text}"' if PLAIN_NAME.fullmatch(text) else json.dumps(text, ensure_ascii=False)


class ManifestWriter:
    """backup_manifest, byte for byte in PostgreSQL's layout (backup_manifest.c): one line per file, the
    WAL range, and the SHA-256 of everything before its last line. Written to a temporary file as it goes
    (a cluster has up to millions of files), hashed on the way."""

    def __init__(self, pg_major: int, system_identifier: str):
        self.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        self.sha = hashlib.sha256()
        self.files = 0
        self._lines: list[str] = []
        if pg_major >= 17:
            self._write('{ "PostgreSQL-Backup-Manifest-Version": 2,\n'
                        f'"System-Identifier": {int(system_identifier)},\n"Files": [')
        else:
            self._write('{ "PostgreSQL-Backup-Manifest-Version": 1,\n"Files": [')

    def _write(self, text: str) -> None:
        self._lines.append(text)
        if len(self._lines) >= 1024:
            self._flush()

    def _flush(self) -> None:
        data = "".join(self._lines).encode("utf-8")
        self._lines.clear()
        self.sha.update(data)
        self.file.write(data)

    def add(self, path: str, size: int, mtime: float, checksum: FileChecksum) -> None:
        raw = path.encode("utf-8", "surrogateescape")
        try:
            name = f'"Path": {_json_string(raw.decode("utf-8"))}'
        except UnicodeDecodeError:
            name = f'"Encoded-Path": "{raw.hex()}"'
        when = time.strftime("%Y-%m-%d %H:%M:%S GMT", time.gmtime(mtime))
        self._write(f'{"," if self.files else ""}\n{{ {name}, "Size": {size}, "Last-Modified": "{when}", '
                    f'"Checksum-Algorithm": "{checksum.algorithm}", "Checksum": "{checksum.hexdigest()}" }}')
        self.files += 1

    def finish(self, timeline: int, start_lsn: str, end_lsn: str):
        """The whole document: (a file at its start, its size). The caller closes the file."""
        self._write("\n],\n" + '"WAL-Ranges": [\n'
                    f'{{ "Timeline": {timeline}, "Start-LSN": "{start_lsn}", "End-LSN": "{end_lsn}" }}' + "\n],\n")
        self._flush()
        self.file.write(b'"Manifest-Checksum": "' + self.sha.hexdigest().encode() + b'"}\n')
        size = self.file.tell()
        self.file.seek(0)
        return self.file, size


# -------------------------------------------------------------------------------------------- locality

PROBE_PATH = re.compile(r"base/\d+/t\d+_\d+")


def open_root(datadir: Path) -> int:
    """A descriptor of the data directory (which may be a symbolic link): proven, then read, through it alone,
    so swapping a component of its path in between changes nothing."""
    try:
        return os.open(str(datadir), DIR_OPEN & ~os.O_NOFOLLOW)
    except OSError as e:
        raise NotLocal(f"data directory {datadir}: cannot open it ({e.strerror}); {READ_HINT}") from None


def _server_identifier(datadir: Path, root: int) -> int:
    """The system identifier in a data directory's global/pg_control (its first 8 bytes, in the host's order)."""
    try:
        parent = os.open("global", DIR_OPEN, dir_fd=root)
        try:
            fd = os.open("pg_control", FILE_OPEN, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            return int.from_bytes(os.read(fd, 8), sys.byteorder)
        finally:
            os.close(fd)
    except OSError as e:
        raise NotLocal(f"data directory {datadir}: cannot read global/pg_control ({e.strerror}); {READ_HINT}") \
            from None


def _exists(datadir: Path, root: int, rel: str) -> bool:
    """Whether ``rel`` is in the data directory, every directory on the way opened without following a link,
    as the walk opens them: the proof sees what the copy reads (a linked database directory, which the walk
    would skip, is refused)."""
    *dirs, leaf = rel.split("/")
    opened: list[int] = []
    try:
        at = root
        for name in dirs:
            at = os.open(name, DIR_OPEN, dir_fd=at)
            opened.append(at)
        os.stat(leaf, dir_fd=at, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    except PermissionError:
        raise NotLocal(f"data directory {datadir}: permission denied looking into {Path(rel).parent}; "
                       f"{READ_HINT}") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotLocal(f"data directory {datadir}: {Path(rel).parent} is a symbolic link, which a local copy "
                           "does not follow (nor does pg_basebackup): use backup_method pg_basebackup, or "
                           "move the database back into the data directory") from None
        raise NotLocal(f"data directory {datadir}: cannot look into {Path(rel).parent} ({e.strerror})") from None
    finally:
        for fd in opened:
            os.close(fd)


def prove_local(c, datadir: Path, system_identifier: str, root: int | None = None) -> None:
    """NotLocal unless ``datadir`` (through ``root``, its descriptor, when given) is the data directory of the
    server on session ``c``: its pg_control holds the server's system identifier, and a temporary table created
    on ``c`` appears in it as a file and is gone once dropped. A temporary relation is never replicated and
    never copied: a standby's or another host's copy of the cluster (same identifier, same path, same port,
    PIDs that may well coincide) never shows it."""
    if root is None:
        root = open_root(datadir)
        try:
            return prove_local(c, datadir, system_identifier, root)
        finally:
            os.close(root)
    import psycopg

    where = f"data directory {datadir}"
    ident = _server_identifier(datadir, root)
    if str(ident) != str(system_identifier):
        raise NotLocal(f"{where} holds system {ident}, the server reports {system_identifier}: refusing to read it")
    table = f"pgdr_probe_{secrets.token_hex(6)}"  # pgdr's own name: hex digits only
    try:
        c.execute(f"create temporary table {table} (x int)")
        try:
            rel = c.execute("select pg_relation_filepath(%s::regclass)", (f"pg_temp.{table}",)).fetchone()[0]
            appeared = PROBE_PATH.fullmatch(rel or "") is not None and _exists(datadir, root, rel)
        finally:
            c.execute(f"drop table pg_temp.{table}")
    except psycopg.Error as e:
        raise NotLocal(f"{where}: cannot prove it is the server's: creating a temporary table failed "
                       f"({str(e).strip()}); the role needs the TEMPORARY privilege on its database") from None
    if not PROBE_PATH.fullmatch(rel or ""):
        raise NotLocal(f"{where}: the server put a temporary table at {rel!r}, not in its data directory (is the "
                       "connected database in another tablespace?): cannot prove the directory is the server's")
    if not appeared or _exists(datadir, root, rel):
        raise NotLocal(f"{where} is not the connected server's: a temporary table it created "
                       f"({rel}) did not appear {'and vanish ' if appeared else ''}there (a standby's or another "
                       "host's copy of the cluster, or pgdr in a container with its own copy): refusing to read it")


# ---------------------------------------------------------------------------------------------- the copy

DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO put there never blocks
HISTORY = re.compile(r"[0-9A-F]{8}\.history")


class LocalCopy:
    """One full backup read from the data directory: ``chunks()`` yields its tar stream, backup_manifest last.
    ``open`` proves locality first (NotLocal) and answers None for a standby (pg_basebackup takes those)."""

    def __init__(self, conn: ConnInfo, info: ServerInfo, cluster: str, label: str, checkpoint: str, embed_wal: bool):
        self.conn, self.info, self.cluster, self.label = conn, info, cluster, label
        self.fast = checkpoint == "fast"
        self.embed_wal = embed_wal
        self.datadir: Path | None = None
        self.files = 0
        self.bytes = 0
        self.watcher = CopyWatcher()
        self._manifest: ManifestWriter | None = None  # until handed over to the watcher
        self.root_stat: os.stat_result | None = None  # the data directory's: owner and mode for pgdr's members

    @classmethod
    def open(cls, conn: ConnInfo, info: ServerInfo, cluster: str, label: str, checkpoint: str,
             embed_wal: bool) -> "LocalCopy | None":
        if info.major < 15:
            raise PgdrError(f"backup_method local needs PostgreSQL 15 or newer (pg_backup_start); this server is "
                            f"{info.version}: use backup_method pg_basebackup")
        copy = cls(conn, info, cluster, label, checkpoint, embed_wal)
        with _session(conn) as c:
            try:
                datadir, standby, ident = c.execute(
                    "select current_setting('data_directory'), pg_is_in_recovery(), "
                    "(select system_identifier::text from pg_control_system())").fetchone()
            except Exception as e:  # psycopg's errors: no privilege to read data_directory, mostly
                raise PostgresError(f"cannot ask {conn.describe()} where its data directory is: "
                                    f"{str(e).strip()}") from None
            if standby:
                return None
            copy.datadir = Path(datadir)
            prove_local(c, copy.datadir, ident)
        return copy

    def unreadable(self) -> str | None:
        """The first directory or file of the data directory this process cannot read (None: all readable), as
        pgdr check asks before a backup would fail on it."""
        failed: list[str] = []
        for root, dirs, files in os.walk(self.datadir, onerror=lambda e: failed.append(e.filename)):
            if failed:
                return failed[0]
            if not os.access(root, os.R_OK | os.X_OK):
                return root
            for name in files:
                if name not in EXCLUDED_FILES and not os.access(os.path.join(root, name), os.R_OK):
                    return os.path.join(root, name)
        return failed[0] if failed else None

    def chunks(self) -> Iterator[bytes]:
        """The tar stream, in pieces of about CHUNK bytes. The backup starts on the first piece asked for and
        ends (pg_backup_stop) before the last; closing the iterator early closes the session, which aborts it."""
        try:
            yield from self._copy(_session(self.conn), _Coalesce())
        except BaseException:
            if self._manifest is not None:  # not handed over: released now, not whenever it is collected
                self._manifest.file.close()
                self._manifest = None
            raise

    def _copy(self, c, out: "_Coalesce") -> Iterator[bytes]:
        import psycopg

        root = None
        try:
            root = open_root(self.datadir)  # before the proof: what is proven is what is read
            self.root_stat = os.fstat(root)
            if self.embed_wal:
                self._reserve_wal(c)
            try:
                start_lsn = c.execute("select pg_backup_start(%s, %s)::text",
                                      (f"pgdr {self.cluster} {self.label}", self.fast)).fetchone()[0]
                standby, ident = c.execute("select pg_is_in_recovery(), "
                                           "(select system_identifier::text from pg_control_system())").fetchone()
            except psycopg.Error as e:
                raise PostgresError(f"pg_backup_start on {self.conn.describe()} failed: {str(e).strip()}") from None
            if standby or ident != self.info.system_identifier:
                raise PgdrError(f"the backup's session reached {'a standby' if standby else f'system {ident}'}, not "
                                f"the primary of system {self.info.system_identifier} (a DSN naming several hosts?)")
            # The first proof was on another session: prove it again on the one that holds the backup.
            prove_local(c, self.datadir, self.info.system_identifier, root)
            log.info("backup %s: reading %s directly (pg_backup_start at %s)", self.label, self.datadir, start_lsn)
            manifest = self._manifest = ManifestWriter(self.info.major, self.info.system_identifier)
            yield from self._walk(out, manifest, "", root)
            global_fd = _open_dir(root, "global", self.datadir / "global")
            try:
                yield from self._file(out, manifest, "global/pg_control", global_fd, "pg_control", missing_ok=False)
            finally:
                os.close(global_fd)
            try:
                spaces = c.execute("select count(*) from pg_tablespace where spcname not in "
                                   "('pg_default', 'pg_global')").fetchone()[0]
                stop_lsn, labelfile, spcmap = c.execute(
                    "select lsn::text, labelfile, spcmapfile from pg_backup_stop(false)").fetchone()
            except psycopg.Error as e:
                raise PostgresError(f"pg_backup_stop on {self.conn.describe()} failed: {str(e).strip()}") from None
            if spaces or (spcmap and spcmap.strip()):
                raise PgdrError("a tablespace was created during the backup; pgdr does not back up tablespaces "
                                "outside the data directory and refuses rather than take an incomplete backup")
            timeline, label_start = _label_facts(labelfile)
            if parse_lsn(label_start) != parse_lsn(start_lsn):
                raise PgdrError(f"backup_label starts at {label_start}, pg_backup_start said {start_lsn}")
            now = time.time()
            yield from out.add(self._member("backup_label", labelfile.encode(), now, manifest))
            if self.embed_wal:  # before the session ends: its slot holds this WAL until then
                yield from self._wal(out, manifest, root, timeline, start_lsn, stop_lsn)
        finally:
            c.close()
            if root is not None:
                os.close(root)
        doc, size = manifest.finish(timeline, start_lsn, stop_lsn)
        yield from out.add(self._header("backup_manifest", size, 0o600, int(now), b"0"))
        for piece in iter(lambda: doc.read(CHUNK), b""):
            yield from out.add(piece)
        yield from out.add(b"\0" * (-size % BLOCK))
        yield from out.add(b"\0" * (2 * BLOCK))
        yield from out.flush()
        doc.seek(0)
        self._manifest = None
        self.watcher.hand_over("backup_manifest", doc)
        log.info("backup %s: read %d files, %.1f MB, from %s; pg_backup_stop at %s", self.label, self.files,
                 self.bytes / 1e6, self.datadir, stop_lsn)

    # -- the walk, as basebackup.c's sendDir: every directory and file opened from its parent's descriptor,
    # never through a symbolic link, so nothing outside the data directory is ever read, whoever swaps what.

    def _walk(self, out, manifest, rel: str, dir_fd: int) -> Iterator[bytes]:
        parent = rel.rstrip("/")
        db_dir = parent.startswith("base/") and parent.count("/") == 1 and parent[5:].isdigit()
        try:
            with os.scandir(dir_fd) as listing:
                # A regular file (as the directory entry says) is opened and fstat'ed by _file: no stat here.
                entries = sorted((e.name, e.is_file(follow_symlinks=False)) for e in listing)
        except OSError as e:
            raise PgdrError(f"cannot list {self.datadir / parent}: {e.strerror}") from None
        present = {name for name, _ in entries}
        for name, regular in entries:
            child = f"{rel}{name}"
            if name in EXCLUDED_FILES or name.startswith(EXCLUDED_PREFIXES):
                continue
            if db_dir:
                m = RELATION.fullmatch(name)
                if m and m.group(2) != "init" and f"{m.group(1)}_init" in present:
                    continue  # an unlogged relation: only its init fork is kept (recovery resets it)
                if TEMP_RELATION.fullmatch(name):
                    continue
            if child == "global/pg_control":
                continue  # after everything else
            if regular and parent != "pg_tblspc" and name not in EXCLUDED_DIR_CONTENTS and child != "pg_wal":
                yield from self._file(out, manifest, child, dir_fd, name)  # as the S_ISREG branch below
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # dropped during the backup
            except OSError as e:
                raise PgdrError(f"cannot read {self.datadir / child}: {e.strerror}") from None
            if name in EXCLUDED_DIR_CONTENTS or child == "pg_wal":
                # A linked pg_wal: a directory, with the data directory's mode.
                mode = st.st_mode if stat.S_ISDIR(st.st_mode) else self.root_stat.st_mode
                yield from out.add(self._header(child + "/", 0, mode, st.st_mtime, b"5", st))
                if child == "pg_wal":
                    for sub in ("archive_status", "summaries") if self.info.major >= 17 else ("archive_status",):
                        yield from out.add(self._header(f"pg_wal/{sub}/", 0, mode, st.st_mtime, b"5", st))
                continue
            if parent == "pg_tblspc":
                raise PgdrError(f"{self.datadir / child}: a tablespace appeared during the backup; pgdr does not "
                                "back up tablespaces and refuses rather than take an incomplete backup")
            if stat.S_ISDIR(st.st_mode):
                try:
                    sub = _open_dir(dir_fd, name, self.datadir / child)
                except FileNotFoundError:
                    continue
                try:
                    yield from out.add(self._header(child + "/", 0, st.st_mode, st.st_mtime, b"5", st))
                    yield from self._walk(out, manifest, child + "/", sub)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                yield from self._file(out, manifest, child, dir_fd, name)
            elif child.startswith(("base/", "global/")):
                # pg_basebackup skips it with a warning: a database or relation that would be missing.
                raise PgdrError(f"{self.datadir / child} is a symbolic link or a special file where PostgreSQL "
                                "keeps relations; refusing rather than take a backup without what it holds")
            else:
                log.warning("backup %s: skipping %s in the data directory: not a file or a directory (as "
                            "pg_basebackup does)", self.label, child)

    def _file(self, out, manifest, rel: str, dir_fd: int, name: str, missing_ok=True) -> Iterator[bytes]:
        try:
            fd = os.open(name, FILE_OPEN, dir_fd=dir_fd)
        except FileNotFoundError:
            if missing_ok:
                return  # dropped during the backup: replaying its WAL drops it again
            raise PgdrError(f"{self.datadir / rel} is missing") from None
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped for a link since it was listed: never followed
                raise PgdrError(f"{self.datadir / rel} became a symbolic link during the backup; refusing to "
                                "follow it") from None
            raise PgdrError(f"cannot read {self.datadir / rel}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PgdrError(f"{self.datadir / rel} is no longer a regular file; refusing it")
            size = st.st_size  # what the header promises: a file that grows is cut here, WAL has the rest
            checksum = FileChecksum()
            header = self._header(rel, size, st.st_mode, st.st_mtime, b"0", st)
            if size < SMALL_FILE:  # header, contents and padding in one piece
                data = _read_small(fd, size)
                checksum.update(data)
                yield from out.add(header + data + bytes(-size % BLOCK))
            else:
                yield from out.add(header)
                done = 0
                while done < size:
                    data = os.read(fd, min(CHUNK, size - done))
                    if not data:
                        # Truncated while read: zeros to the size promised, as pg_basebackup; WAL replay
                        # truncates it.
                        data = bytes(min(CHUNK, size - done))
                    checksum.update(data)
                    done += len(data)
                    yield from out.add(data)
                yield from out.add(bytes(-size % BLOCK))
        except OSError as e:
            raise PgdrError(f"cannot read {self.datadir / rel}: {e.strerror}") from None
        finally:
            os.close(fd)
        manifest.add(rel, size, st.st_mtime, checksum)
        self.files += 1
        self.bytes += size

    @property
    def members(self) -> int:
        return self.watcher.members

    def _header(self, name: str, size: int, mode: int, mtime: float, kind: bytes, st=None) -> bytes:
        """A member's header; one pgdr writes itself (backup_label, WAL, backup_manifest) belongs to the data
        directory's owner, the server's user, as pg_basebackup's do."""
        self.watcher.members += 1
        return tar_header(name, size, mode, mtime, kind, st or self.root_stat)

    def _member(self, name: str, data: bytes, mtime: float, manifest) -> bytes:
        checksum = FileChecksum()
        checksum.update(data)
        manifest.add(name, len(data), mtime, checksum)
        return self._header(name, len(data), 0o600, int(mtime), b"0") + _padded(data)

    def wal_hold(self) -> str | None:
        """Why no temporary replication slot can hold a backup's WAL (None: one can): the role lacks
        REPLICATION, or every slot max_replication_slots allows is taken."""
        if not self.info.can_replicate:
            return "this role lacks REPLICATION"
        try:
            with connect(self.conn) as c:
                free = c.execute("select current_setting('max_replication_slots')::int - "
                                 "(select count(*) from pg_replication_slots)").fetchone()[0]
        except PgdrError as e:
            return f"cannot count the free replication slots ({e})"
        except Exception as e:  # psycopg's errors
            return f"cannot count the free replication slots ({first_line(e)})"
        return None if free > 0 else "every replication slot (max_replication_slots) is taken"

    def _reserve_wal(self, c) -> None:
        """A temporary replication slot on the backup's session, holding the WAL from before pg_backup_start
        until the session ends (as pg_basebackup -X stream holds it): on a busy server a long copy would
        otherwise see the start segment recycled before it is embedded, and fail. Dropped by the server
        when the session ends, however it ends. Without the REPLICATION attribute or a free slot, the backup
        goes on unprotected (it fails cleanly if a segment is gone) and says so."""
        import psycopg

        name = f"pgdr_{os.getpid()}_{secrets.token_hex(4)}"
        try:
            c.execute("select pg_create_physical_replication_slot(%s, true, true)", (name,))
        except psycopg.Error as e:
            log.warning("backup %s: cannot hold the backup's WAL with a temporary replication slot (%s); a long "
                        "copy on a busy server may lose its start segment and fail: grant the backup role "
                        "REPLICATION, or keep a free slot (max_replication_slots)", self.label, first_line(e))

    def _wal(self, out, manifest, root: int, timeline: int, start_lsn: str, stop_lsn: str) -> Iterator[bytes]:
        """The WAL from start to stop, from pg_wal (backup_wal: embed), and the timeline history files. Each
        segment's first page must carry its own address and the server's system identifier, and its name must
        still be the file read once read: the server only ever recycles a segment into a name ahead of the
        one it writes, so a past segment's name holds that segment or nothing, unless it was renamed away
        (and rewritten) while read, which the name no longer pointing at the file read shows."""
        seg = self.info.wal_segment_size
        start, stop = parse_lsn(start_lsn), parse_lsn(stop_lsn)
        first, last = start // seg, (stop - 1) // seg
        per_id = 0x100000000 // seg
        wal = _open_dir(root, "pg_wal", self.datadir / "pg_wal", follow=True)
        try:
            for n in range(first, last + 1):
                name = f"{timeline:08X}{n // per_id:08X}{n % per_id:08X}"
                data = self._segment(wal, name, n * seg)
                yield from out.add(self._header(f"pg_wal/{name}", seg, 0o600, int(time.time()), b"0"))
                yield from out.add(data)
                yield from out.add(self._done(name, manifest))
            for name in sorted(os.listdir(wal)):
                if HISTORY.fullmatch(name):
                    copied = self.files
                    yield from self._file(out, manifest, f"pg_wal/{name}", wal, name)
                    if self.files > copied:  # not removed meanwhile
                        yield from out.add(self._done(name, manifest))
        except OSError as e:
            raise PgdrError(f"cannot read {self.datadir / 'pg_wal'}: {e.strerror}") from None
        finally:
            os.close(wal)

    def _segment(self, wal: int, name: str, address: int) -> bytes:
        """Segment ``name``, read whole. Only its first page's address is checked, not every page's: after a
        WAL switch (archive_timeout, pg_switch_wal, another backup starting) the rest of a segment is zeros,
        with no page headers, and recovery never reads it."""
        seg = self.info.wal_segment_size
        where = f"{self.datadir / 'pg_wal' / name}"
        try:
            fd = os.open(name, FILE_OPEN, dir_fd=wal)
        except FileNotFoundError:
            raise PgdrError(f"WAL segment {name} was removed before the backup could copy it: grant the backup "
                            "role REPLICATION (pgdr then holds the WAL with a temporary slot), raise wal_keep_size, "
                            "or use backup_wal: archive") from None
        try:
            before = os.fstat(fd)
            data = b"".join(iter(lambda: os.read(fd, CHUNK), b""))
            try:
                after = os.stat(name, dir_fd=wal, follow_symlinks=False)
            except FileNotFoundError:
                after = None
        finally:
            os.close(fd)
        if after is None or (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino):
            raise PgdrError(f"{where} was removed or recycled while it was read; the backup cannot embed its WAL")
        if len(data) != seg:
            raise PgdrError(f"{where} has {len(data)} bytes, not {seg}")
        if int.from_bytes(data[24:32], sys.byteorder) != int(self.info.system_identifier):
            raise PgdrError(f"{where} belongs to another system (its first page names system "
                            f"{int.from_bytes(data[24:32], sys.byteorder)})")
        if int.from_bytes(data[8:16], sys.byteorder) != address:
            raise PgdrError(f"{where} does not begin with its own address (a recycled file?); the backup cannot "
                            "embed its WAL")
        return data

    def _done(self, name: str, manifest) -> bytes:
        """Marked archived, as pg_basebackup marks the WAL it embeds: a server started from the backup must not
        archive it again (and it is in the manifest, as pg_basebackup's are)."""
        return self._member(f"pg_wal/archive_status/{name}.done", b"", time.time(), manifest)


class CopyWatcher:
    """What store_tar's TarWatcher learns from a tar stream, told by the local copy that wrote it: its member
    count, and its backup_manifest (``spooled``, once the stream has ended). Parsing pgdr's own stream back, a
    header per file on the thread that compresses, would only repeat what the copy knows."""

    def __init__(self):
        self.members = 0
        self.spooled: dict = {}
        self._closed = False

    def feed(self, data) -> None:
        pass

    def hand_over(self, name: str, f) -> None:
        if self._closed:  # the backup already ended (failed) while the copy finished
            f.close()
        else:
            self.spooled[name] = f

    def close(self) -> None:
        self._closed = True
        for f in self.spooled.values():
            f.close()
        self.spooled.clear()


def _session(conn: ConnInfo):
    """A session that stays up through a long copy: no server-side timeouts, TCP keepalives."""
    c = connect(conn, keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=6)
    try:
        c.execute("set idle_session_timeout = 0")
        c.execute("set idle_in_transaction_session_timeout = 0")
        c.execute("set statement_timeout = 0")
        # The server notices a vanished pgdr within minutes (over TCP), and drops the backup and its slot.
        c.execute("set tcp_keepalives_idle = 60")
        c.execute("set tcp_keepalives_interval = 10")
        c.execute("set tcp_keepalives_count = 6")
        # The proof's temporary table: in the data directory, writable, whatever the role's defaults say.
        c.execute("set temp_tablespaces = ''")
        c.execute("set default_transaction_read_only = off")
    except Exception:
        c.close()
        raise
    return c


def _read_small(fd: int, size: int) -> bytes:
    """A small file's ``size`` bytes; zeros for what was truncated while it was read, as pg_basebackup."""
    data = os.read(fd, size) if size else b""
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            return data + bytes(size - len(data))
        data += more
    return data


def _open_dir(dir_fd: int | None, name: str, shown: Path, follow: bool = False) -> int:
    """A descriptor of directory ``name`` in ``dir_fd``; never through a symbolic link unless ``follow`` (the data
    directory itself and pg_wal, which PostgreSQL allows to be links)."""
    try:
        return os.open(name, DIR_OPEN & ~os.O_NOFOLLOW if follow else DIR_OPEN, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PgdrError(f"{shown} became a symbolic link or a file during the backup; refusing to follow it") \
                from None
        raise PgdrError(f"cannot read {shown}: {e.strerror}") from None


def _label_facts(labelfile: str) -> tuple[int, str]:
    """START TIMELINE and START WAL LOCATION of a backup_label."""
    tli = re.search(r"^START TIMELINE: (\d+)$", labelfile, re.M)
    start = re.search(r"^START WAL LOCATION: ([0-9A-Fa-f]+/[0-9A-Fa-f]+) ", labelfile, re.M)
    if not tli or not start:
        raise PgdrError(f"pg_backup_stop returned a backup_label pgdr cannot read: {labelfile[:200]!r}")
    return int(tli.group(1)), start.group(1)


class _Coalesce:
    """Gathers headers and small files into pieces of about CHUNK bytes; a full-size read passes untouched."""

    def __init__(self):
        self.buf = bytearray()

    def add(self, data) -> Iterator[bytes]:
        if not self.buf and len(data) >= CHUNK:
            yield data
            return
        self.buf += data
        if len(self.buf) >= CHUNK:
            yield bytes(self.buf)
            self.buf.clear()

    def flush(self) -> Iterator[bytes]:
        if self.buf:
            yield bytes(self.buf)
            self.buf.clear()
