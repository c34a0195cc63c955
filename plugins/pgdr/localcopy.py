"""Full backups read straight from the data directory on the database host (``backup_method: local``).

Through pg_basebackup the server reads every file and sends it over a connection, and pg_basebackup
relays it again through a pipe: on a small host that costs as much CPU as compressing it. Here pgdr
reads the files itself, between ``pg_backup_start()`` and ``pg_backup_stop()`` on one session, as
pgBackRest does, and writes the very tar stream and backup_manifest pg_basebackup would: the same
exclusions, pg_control after every other file, the backup_label the server hands back, and (with
``backup_wal: embed``) the WAL from start to stop. Restore, verify, incrementals on top of it and
pg_combinebackup see no difference. Page checksums are not verified on the way (pg_basebackup's
server does that); incrementals still go through pg_basebackup, which knows the changed blocks.

Before a byte is read, pgdr proves the directory is the one the server it talks to runs in: the
postmaster named in its postmaster.pid is the parent of this session's backend process and listens on
the same port, and pg_control holds the server's system identifier. A standby's copy of the same
cluster (same system identifier, files that may lag the primary's) is refused, on this host or another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import Iterator

from pgdr.errors import PgdrError, PostgresError
from pgdr.lsn import parse_lsn
from pgdr.postgres import ConnInfo, ServerInfo, connect
from pgdr.streams import CHUNK

log = logging.getLogger(__name__)

# What pg_basebackup leaves out (src/backend/backup/basebackup.c), at any depth.
EXCLUDED_DIR_CONTENTS = frozenset({"pg_stat_tmp", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial",
                                   "pg_snapshots", "pg_subtrans"})
EXCLUDED_FILES = frozenset({"postgresql.auto.conf.tmp", "current_logfiles.tmp", "backup_label", "tablespace_map",
                            "backup_manifest", "postmaster.pid", "postmaster.opts"})
EXCLUDED_PREFIXES = ("pg_internal.init", "pgsql_tmp")
RELATION = re.compile(r"(\d+)(?:_(fsm|vm|init))?(?:\.\d+)?")
TEMP_RELATION = re.compile(r"t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?")
WAL_SEGMENT = re.compile(r"[0-9A-F]{24}")
BLOCK = 512
XLOG_PAGE_MAGIC_OFFSET = 8  # XLogPageHeaderData: magic u16, info u16, tli u32, pageaddr u64


class NotLocal(PgdrError):
    """The data directory here is not provably the connected server's: nothing was read."""


# ------------------------------------------------------------------------------------------------ tar

def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def tar_header(name: str, size: int, mode: int, mtime: int, kind: bytes) -> bytes:
    """A ustar header (a GNU long-name record first when the name is longer than 100 bytes; a size past
    8 GiB in base-256), as pgdr's TarParser and every tar read them."""
    raw = name.encode("utf-8", "surrogateescape")
    head = b""
    if len(raw) > 100:
        head = tar_header("././@LongLink", len(raw) + 1, 0, 0, b"L") + _padded(raw + b"\0")
        raw = raw[:100]
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = _octal(mode & 0o7777, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12) if size < 8 ** 11 else b"\x80" + size.to_bytes(11, "big")
    h[136:148] = _octal(max(0, min(int(mtime), 8 ** 11 - 1)), 12)
    h[148:156] = b" " * 8
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return head + bytes(h)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


# ------------------------------------------------------------------------------------------- manifest

class FileChecksum:
    """CRC32C (as pg_basebackup's --manifest-checksums=CRC32C) through google-crc32c; SHA256 where that
    library is missing (correct, slower)."""

    def __init__(self):
        try:
            import google_crc32c

            self.algorithm = "CRC32C"
            self._c = google_crc32c.Checksum()
        except ImportError:
            self.algorithm = "SHA256"
            self._c = hashlib.sha256()

    def update(self, data) -> None:
        self._c.update(data)

    def hexdigest(self) -> str:
        if self.algorithm == "CRC32C":
            # PostgreSQL writes the CRC's bytes as they lie in memory: least significant first.
            return int.from_bytes(self._c.digest(), "big").to_bytes(4, "little").hex()
        return self._c.hexdigest()


def _json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class ManifestWriter:
    """backup_manifest, byte for byte in PostgreSQL's layout (backup_manifest.c): one line per file, the
    WAL range, and the SHA-256 of everything before its last line."""

    def __init__(self, pg_major: int, system_identifier: str):
        if pg_major >= 17:
            head = ('{ "PostgreSQL-Backup-Manifest-Version": 2,\n'
                    f'"System-Identifier": {int(system_identifier)},\n"Files": [')
        else:
            head = '{ "PostgreSQL-Backup-Manifest-Version": 1,\n"Files": ['
        self.parts = [head]  # joined once at the end: a cluster has hundreds of thousands of files

    def add(self, path: str, size: int, mtime: float, checksum: FileChecksum) -> None:
        raw = path.encode("utf-8", "surrogateescape")
        try:
            name = f'"Path": {_json_string(raw.decode("utf-8"))}'
        except UnicodeDecodeError:
            name = f'"Encoded-Path": "{raw.hex()}"'
        when = time.strftime("%Y-%m-%d %H:%M:%S GMT", time.gmtime(mtime))
        self.parts.append(f'{"," if len(self.parts) > 1 else ""}\n{{ {name}, "Size": {size}, "Last-Modified": '
                          f'"{when}", "Checksum-Algorithm": "{checksum.algorithm}", "Checksum": '
                          f'"{checksum.hexdigest()}" }}')

    def finish(self, timeline: int, start_lsn: str, end_lsn: str) -> bytes:
        body = ("".join(self.parts) + "\n],\n" + '"WAL-Ranges": [\n'
                f'{{ "Timeline": {timeline}, "Start-LSN": "{start_lsn}", "End-LSN": "{end_lsn}" }}' + "\n],\n")
        data = body.encode("utf-8")
        return data + b'"Manifest-Checksum": "' + hashlib.sha256(data).hexdigest().encode() + b'"}\n'


# -------------------------------------------------------------------------------------------- locality

def prove_local(datadir: Path, backend_pid: int, port: int, system_identifier: str) -> None:
    """NotLocal unless ``datadir`` is the data directory of the server whose backend ``backend_pid`` serves
    this session: its postmaster.pid names that backend's parent and the server's port, and its pg_control
    holds the server's system identifier."""
    where = f"data directory {datadir}"
    try:
        pidfile = (datadir / "postmaster.pid").read_bytes().decode("ascii").split("\n")
        owner, port_line = int(pidfile[0]), int(pidfile[3])
    except FileNotFoundError:
        raise NotLocal(f"{where} is not here, or no server runs in it (no postmaster.pid)") from None
    except PermissionError:
        raise NotLocal(f"{where}: permission denied reading postmaster.pid; run pgdr as the server's user (or "
                       "one in its group, with initdb --allow-group-access)") from None
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as e:
        raise NotLocal(f"{where}: unreadable postmaster.pid ({e})") from None
    try:
        ppid = int(Path(f"/proc/{backend_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        raise NotLocal(f"{where}: the server's backend process {backend_pid} is not on this host (or not in this "
                       "PID namespace); local reads need pgdr beside the server") from None
    if ppid != owner or port_line != port:
        raise NotLocal(f"{where} belongs to the postmaster {owner} on port {port_line}, not to the server this "
                       f"session reached (backend {backend_pid}, parent {ppid}, port {port}): refusing to read it")
    try:
        with open(datadir / "global" / "pg_control", "rb") as f:
            ident = int.from_bytes(f.read(8), "little")
    except OSError as e:
        raise NotLocal(f"{where}: cannot read global/pg_control ({e.strerror})") from None
    if str(ident) != str(system_identifier):
        raise NotLocal(f"{where} holds system {ident}, the server reports {system_identifier}: refusing to read it")


# ---------------------------------------------------------------------------------------------- the copy

class LocalCopy:
    """One full backup read from the data directory: ``chunks()`` yields its tar stream, backup_manifest last.
    ``open`` proves locality first (NotLocal) and answers None for a standby (pg_basebackup takes those)."""

    def __init__(self, conn: ConnInfo, info: ServerInfo, label: str, checkpoint: str, embed_wal: bool):
        self.conn, self.info, self.label = conn, info, label
        self.fast = checkpoint == "fast"
        self.embed_wal = embed_wal
        self.datadir: Path | None = None
        self.files = 0
        self.bytes = 0

    @classmethod
    def open(cls, conn: ConnInfo, info: ServerInfo, label: str, checkpoint: str, embed_wal: bool) -> "LocalCopy | None":
        if info.major < 15:
            raise PgdrError(f"backup_method local needs PostgreSQL 15 or newer (pg_backup_start); this server is "
                            f"{info.version}: use backup_method pg_basebackup")
        copy = cls(conn, info, label, checkpoint, embed_wal)
        with connect(conn) as c:
            try:
                pid, port, datadir, standby, ident = c.execute(
                    "select pg_backend_pid(), current_setting('port')::int, current_setting('data_directory'), "
                    "pg_is_in_recovery(), (select system_identifier::text from pg_control_system())").fetchone()
            except Exception as e:  # psycopg's errors: no privilege to read data_directory, mostly
                raise PostgresError(f"cannot ask {conn.describe()} where its data directory is: "
                                    f"{str(e).strip()}") from None
            if standby:
                return None
            copy.datadir = Path(datadir)
            prove_local(copy.datadir, pid, port, ident)
        return copy

    def unreadable(self) -> str | None:
        """The first directory or file of the data directory this process cannot read (None: all readable), as
        pgdr check asks before a backup would fail on it."""
        for root, dirs, files in os.walk(self.datadir, onerror=None):
            if not os.access(root, os.R_OK | os.X_OK):
                return root
            for name in files:
                if name not in EXCLUDED_FILES and not os.access(os.path.join(root, name), os.R_OK):
                    return os.path.join(root, name)
        return None

    def chunks(self) -> Iterator[bytes]:
        """The tar stream, in pieces of about CHUNK bytes. The backup starts on the first piece asked for and
        ends (pg_backup_stop) before the last; closing the iterator early closes the session, which aborts it."""
        import psycopg

        c = connect(self.conn)
        out = _Coalesce()
        try:
            try:
                start_lsn = c.execute("select pg_backup_start(%s, %s)::text",
                                      (f"pgdr {self.label}", self.fast)).fetchone()[0]
                log.info("backup %s: reading %s directly (pg_backup_start at %s)", self.label, self.datadir, start_lsn)
                # The first proof was on another session: prove it again on the one that holds the backup.
                pid, port = c.execute("select pg_backend_pid(), current_setting('port')::int").fetchone()
                prove_local(self.datadir, pid, port, self.info.system_identifier)
            except psycopg.Error as e:
                raise PostgresError(f"pg_backup_start on {self.conn.describe()} failed: {str(e).strip()}") from None
            manifest = ManifestWriter(self.info.major, self.info.system_identifier)
            yield from self._walk(out, manifest, "", self.datadir)
            yield from self._file(out, manifest, "global/pg_control", self.datadir / "global" / "pg_control",
                                  missing_ok=False)
            try:
                stop_lsn, labelfile, spcmap = c.execute(
                    "select lsn::text, labelfile, spcmapfile from pg_backup_stop(false)").fetchone()
            except psycopg.Error as e:
                raise PostgresError(f"pg_backup_stop on {self.conn.describe()} failed: {str(e).strip()}") from None
        finally:
            c.close()
        if spcmap and spcmap.strip():
            raise PgdrError("the server reported tablespaces at pg_backup_stop; pgdr does not back them up")
        timeline, label_start = _label_facts(labelfile)
        if parse_lsn(label_start) != parse_lsn(start_lsn):
            raise PgdrError(f"backup_label starts at {label_start}, pg_backup_start said {start_lsn}")
        now = time.time()
        yield from out.add(self._member("backup_label", labelfile.encode(), now, manifest))
        if self.embed_wal:
            yield from self._wal(out, manifest, timeline, start_lsn, stop_lsn)
        doc = manifest.finish(timeline, start_lsn, stop_lsn)
        yield from out.add(tar_header("backup_manifest", len(doc), 0o600, int(now), b"0") + _padded(doc))
        yield from out.add(b"\0" * (2 * BLOCK))
        yield from out.flush()
        log.info("backup %s: read %d files, %.1f MB, from %s; pg_backup_stop at %s", self.label, self.files,
                 self.bytes / 1e6, self.datadir, stop_lsn)

    # -- the walk, as basebackup.c's sendDir

    def _walk(self, out, manifest, rel: str, path: Path) -> Iterator[bytes]:
        parent = rel.rstrip("/")
        db_dir = parent.startswith("base/") and parent.count("/") == 1 and parent[5:].isdigit()
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except FileNotFoundError:
            return  # a database dropped during the backup: its WAL says so
        names = {e.name for e in entries}
        for e in entries:
            name = e.name
            child = f"{rel}{name}"
            if name in EXCLUDED_FILES or name.startswith(EXCLUDED_PREFIXES):
                continue
            if db_dir:
                m = RELATION.fullmatch(name)
                if m and m.group(2) != "init" and f"{m.group(1)}_init" in names:
                    continue  # an unlogged relation: only its init fork is kept (recovery resets it)
                if TEMP_RELATION.fullmatch(name):
                    continue
            if child == "global/pg_control":
                continue  # after everything else
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if name in EXCLUDED_DIR_CONTENTS or child == "pg_wal":
                yield from out.add(tar_header(child + "/", 0, _dir_mode(e, st), st.st_mtime, b"5"))
                if child == "pg_wal":
                    for sub in ("archive_status", "summaries") if self.info.major >= 17 else ("archive_status",):
                        yield from out.add(tar_header(f"pg_wal/{sub}/", 0, 0o700, st.st_mtime, b"5"))
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from out.add(tar_header(child + "/", 0, st.st_mode, st.st_mtime, b"5"))
                yield from self._walk(out, manifest, child + "/", Path(e.path))
            elif stat.S_ISREG(st.st_mode):
                yield from self._file(out, manifest, child, Path(e.path), st=st)
            else:
                log.warning("backup %s: skipping %s in the data directory: not a file or a directory (as "
                            "pg_basebackup does)", self.label, child)

    def _file(self, out, manifest, rel: str, path: Path, st=None, missing_ok=True) -> Iterator[bytes]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if missing_ok:
                return  # dropped during the backup: replaying its WAL drops it again
            raise PgdrError(f"{path} is missing") from None
        except OSError as e:
            raise PgdrError(f"cannot read {path}: {e.strerror}") from None
        try:
            st = st or os.fstat(fd)
            size = st.st_size  # what the header promises: a file that grows is cut here, WAL has the rest
            checksum = FileChecksum()
            yield from out.add(tar_header(rel, size, st.st_mode, st.st_mtime, b"0"))
            done = 0
            while done < size:
                data = os.read(fd, min(CHUNK, size - done))
                if not data:
                    # Truncated while read: zeros to the size promised, as pg_basebackup; WAL replay truncates it.
                    data = bytes(min(CHUNK, size - done))
                checksum.update(data)
                done += len(data)
                yield from out.add(data)
            yield from out.add(b"\0" * (-size % BLOCK))
        except OSError as e:
            raise PgdrError(f"cannot read {path}: {e.strerror}") from None
        finally:
            os.close(fd)
        manifest.add(rel, size, st.st_mtime, checksum)
        self.files += 1
        self.bytes += size

    def _member(self, name: str, data: bytes, mtime: float, manifest) -> bytes:
        checksum = FileChecksum()
        checksum.update(data)
        manifest.add(name, len(data), mtime, checksum)
        return tar_header(name, len(data), 0o600, int(mtime), b"0") + _padded(data)

    def _wal(self, out, manifest, timeline: int, start_lsn: str, stop_lsn: str) -> Iterator[bytes]:
        """The WAL from start to stop, from pg_wal (backup_wal: embed), each segment checked to be the one its
        name says (a recycled file holds an older address); and the timeline history files."""
        seg = self.info.wal_segment_size
        first, last = parse_lsn(start_lsn) // seg, (parse_lsn(stop_lsn) - 1) // seg
        per_id = 0x100000000 // seg
        wal = self.datadir / "pg_wal"
        for n in range(first, last + 1):
            name = f"{timeline:08X}{n // per_id:08X}{n % per_id:08X}"
            try:
                with open(wal / name, "rb") as f:
                    head = f.read(24)
                    if len(head) < 24 or int.from_bytes(head[8:16], "little") != n * seg:
                        raise PgdrError(f"pg_wal/{name} does not hold segment {name} (a recycled file?); "
                                        "the backup cannot embed its WAL")
                    f.seek(0)
                    data = f.read(seg + 1)
            except FileNotFoundError:
                raise PgdrError(f"WAL segment {name} was removed before the backup could copy it: raise "
                                "wal_keep_size, or use backup_wal: archive") from None
            if len(data) != seg:
                raise PgdrError(f"pg_wal/{name} has {len(data)} bytes, not {seg}")
            yield from out.add(tar_header(f"pg_wal/{name}", seg, 0o600, int(time.time()), b"0"))
            yield from out.add(data)
            yield from out.add(self._done(name, manifest))
        for e in sorted(os.scandir(wal), key=lambda e: e.name):
            if e.name.endswith(".history") and e.is_file(follow_symlinks=False):
                data = Path(e.path).read_bytes()
                yield from out.add(tar_header(f"pg_wal/{e.name}", len(data), 0o600, int(time.time()), b"0")
                                   + _padded(data))
                yield from out.add(self._done(e.name, manifest))

    def _done(self, name: str, manifest) -> bytes:
        """Marked archived, as pg_basebackup marks the WAL it embeds: a server started from the backup must not
        archive it again (and it is in the manifest, as pg_basebackup's are)."""
        return self._member(f"pg_wal/archive_status/{name}.done", b"", time.time(), manifest)


def _dir_mode(entry, st) -> int:
    return st.st_mode if stat.S_ISDIR(st.st_mode) else 0o700  # a linked pg_wal is written as a directory


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

