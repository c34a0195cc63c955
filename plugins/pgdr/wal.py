"""The WAL archive: every completed segment, timeline history files, and the
newest partial segment, each stored once, compressed, with its SHA-256.

    <cluster>/wal/<TLI>/<SEGMENT>.<sha256>.<archived>.<ext>   a completed 16 MiB segment, and when it was
                                                     archived (older archives: without that time)
    <cluster>/wal/<TLI>/<SEGMENT>.partial.<ext>      the segment being written (streaming), replaced as it grows
    <cluster>/wal/<TLI>/<SEGMENT>.partial.json       how far that partial is known good (LSN, time)
    <cluster>/wal/history/<TLI>.history.<sha256>     timeline history

In an encrypted repository each object name ends in ``.enc`` and the object is
sealed (pgdr.crypto) with its own data key.

The SHA-256 (of the uncompressed content) is part of the object's name, so a
fetch verifies what it got without reading anything else, and a second push of
the same segment can tell "same content" (fine) from "different content"
(refused, loudly) with one listing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pgdr.compression import SUFFIX, compress_stream, decompress_stream
from pgdr.crypto import seal, unseal
from pgdr.errors import IntegrityError, ObjectNotFound, PgdrError, RepositoryError, UsageError
from pgdr.lsn import format_lsn, parse_lsn
from pgdr.prefetch import PREFETCH_DIR, TOOK, VERIFIED, Spool, remove_abandoned_claims
from pgdr.repository import Repository
from pgdr.results import JsonResult, iso, parse_iso, utcnow
from pgdr.storage import Storage
from pgdr.storage.file import fsync_dir

log = logging.getLogger(__name__)

SEGMENT = re.compile(r"^[0-9A-F]{24}$")
PROMOTED_PARTIAL = re.compile(r"^[0-9A-F]{24}\.partial$")  # the old timeline's last segment, after a promotion
HISTORY = re.compile(r"^[0-9A-F]{8}\.history$|^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")  # timeline / backup history
# <name>.<sha256>[.<archived-by time>][.<ext>][.enc]; the time (UTC, 20261125T140300Z) is when the segment
# was archived: every commit in it happened before it, so a target time after the newest one is unreachable.
ARCHIVED = re.compile(r"^(?P<name>.+)\.(?P<sha>[0-9a-f]{64})(?:\.(?P<at>\d{8}T\d{6}Z))?"
                      r"(?:\.(?P<ext>zst|lz4|gz))?(?P<enc>\.enc)?$")
ARCHIVED_AT = "%Y%m%dT%H%M%SZ"
ENC = ".enc"
CODEC_OF_EXT = {suffix.lstrip("."): codec for codec, suffix in SUFFIX.items() if suffix}  # "zst" -> "zstd"
SEG_SIZE = 16 * 1024 * 1024
XLOG_PAGE_MAGIC_OFFSET = 0
SYSID_OFFSET = 24  # XLogLongPageHeaderData.xlp_sysid
SEG_SIZE_OFFSET = 32


class WalNotFound(PgdrError):
    """Asked-for WAL is not in the archive (recovery treats this as 'end of WAL')."""

    kind = "wal_not_found"


def check_wal_name(name: str) -> str:
    if not (SEGMENT.fullmatch(name) or HISTORY.fullmatch(name) or PROMOTED_PARTIAL.fullmatch(name)):
        raise UsageError(f"{name!r} is not a WAL segment (24 hex digits), .partial segment, timeline history or "
                         "backup history file name")
    return name


def segment_name(tli: int, segno: int, seg_size: int = SEG_SIZE) -> str:
    per_log = 0x100000000 // seg_size
    return f"{tli:08X}{segno // per_log:08X}{segno % per_log:08X}"


def parse_segment(name: str, seg_size: int = SEG_SIZE) -> tuple[int, int]:
    """(timeline, segment number) of a segment file name."""
    per_log = 0x100000000 // seg_size
    return int(name[:8], 16), int(name[8:16], 16) * per_log + int(name[16:24], 16)


def segment_of(lsn: int, seg_size: int = SEG_SIZE) -> int:
    return lsn // seg_size


def segment_header(data: bytes) -> tuple[str, int]:
    """(system identifier, segment size) from a segment's first (long) page header."""
    if len(data) < 40:
        raise IntegrityError("WAL segment is too short to hold a page header")
    sysid, seg_size = struct.unpack_from("<QI", data, SYSID_OFFSET)
    return str(sysid), seg_size


def require_supported_segment_size(seg_size: int, where: str) -> None:
    """pgdr names, plans and archives WAL in 16 MiB segments: refuse any other size, clearly."""
    if seg_size != SEG_SIZE:
        raise PgdrError(
            f"{where}: wal_segment_size is {seg_size} bytes ({seg_size / 2**20:g} MiB); pgdr supports only 16 MiB WAL "
            "segments (the default of initdb --wal-segsize). Refusing rather than archive WAL it would name and "
            "replay wrongly")


def segment_size_of_file(path: str | os.PathLike) -> int:
    """The segment size a WAL segment file's first page header declares (reads 40 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(40)
    except OSError as e:
        raise PgdrError(f"cannot read {path}: {e.strerror}") from None
    return segment_header(head)[1]


@dataclass
class WalPushResult(JsonResult):
    cluster: str
    name: str
    status: str  # archived | already_archived
    size: int
    stored_size: int
    sha256: str
    key: str


@dataclass
class WalFetchResult(JsonResult):
    cluster: str
    name: str
    source: str  # segment | partial | history
    key: str
    size: int
    destination: str


@dataclass
class WalRange(JsonResult):
    timeline: int
    first: str
    last: str
    start_lsn: str
    end_lsn: str
    segments: int


@dataclass
class WalGap(JsonResult):
    timeline: int
    after: str | None
    missing_from: str
    missing_to: str
    reason: str


@dataclass
class WalCheckReport(JsonResult):
    cluster: str
    ok: bool
    ranges: list[WalRange] = field(default_factory=list)
    gaps: list[WalGap] = field(default_factory=list)
    history: list[str] = field(default_factory=list)
    newest_lsn: str | None = None
    partial: dict | None = None


class WalArchive:
    def __init__(self, storage: Storage, cluster: str, compression: str = "zstd", level: int = 3):
        self.storage = storage
        self.cluster = cluster
        self.compression = compression
        self.level = level
        self.repo = Repository(storage, cluster)
        self.prefix = f"{cluster}/wal/"
        self._checked_sysid: str | None = None
        # With several pushes in flight (the push queue): a semaphore of as many as there are cores, taken
        # while a file is hashed and compressed. More compressing threads than cores only fight over them;
        # the uploads (network waits) are not limited by it.
        self.cpu_slots = None

    # keys
    def _dir(self, name: str) -> str:
        return f"{self.prefix}history/" if HISTORY.fullmatch(name) else f"{self.prefix}{name[:8]}/"

    def _suffix(self, compression: str | None = None) -> str:
        return SUFFIX[compression or self.compression] + (ENC if self.storage.encrypt else "")

    def _pack(self, chunks, context: str):
        """The stored form of WAL content: compressed, then sealed with a fresh data key when encrypting."""
        return self._seal(compress_stream(chunks, self.compression, self.level), context)

    def _seal(self, compressed, context: str):
        return seal(compressed, self.storage.keyring.new_data_key(), context) if self.storage.encrypt else compressed

    def _unpack(self, key: str, context: str) -> bytes:
        return b"".join(self._unpack_stream(key, context))

    def _unpack_stream(self, key: str, context: str):
        """An archived object's content, decompressed (and unsealed), in pieces."""
        body = self.storage.get_stream(key)
        if key.endswith(ENC):
            body = unseal(body, self.storage.keyring, context, key)
            key = key[: -len(ENC)]
        elif self.storage.encrypt and not self.storage.accept_unencrypted:
            raise IntegrityError(f"{key} is not encrypted, but this repository's configuration requires encryption: "
                                 "refusing it (set encryption.accept_unencrypted: true for WAL archived before "
                                 "encryption was turned on)")
        comp = CODEC_OF_EXT.get(key.rsplit(".", 1)[-1], "none")
        return decompress_stream(body, comp, name=key)

    def find(self, name: str) -> list[str]:
        """Keys of the archived copies of a completed segment or history file (normally one)."""
        d = self._dir(name)
        out = []
        for obj in self.storage.list(d + name + "."):
            m = ARCHIVED.fullmatch(obj.key.rsplit("/", 1)[-1])
            if m and m.group("name") == name:
                out.append(obj.key)
        return out

    def _the_copy(self, name: str, keys: list[str]) -> str:
        """Which of ``keys``, the archived copies of ``name``, to read. Copies of the same content (a retry
        that lost its record, archived again) are one. Copies of different content — two servers archived
        this name at once into one repository, each finding nothing there first — are refused, never
        chosen between: which one a restore must follow is for an operator to decide."""
        contents = {self._parse_key(k)[1] for k in keys}
        if len(contents) > 1:
            raise IntegrityError(
                f"{name} is archived {len(contents)} times with DIFFERENT content ({', '.join(sorted(keys))}): two "
                "servers archived into this repository at once. Refusing to choose one: find out which server's "
                "history this restore must follow, and move the other copies out of the archive")
        return sorted(keys)[0]

    @staticmethod
    def _parse_key(key: str) -> tuple[str, str, str]:
        """(name, sha256, compression) from an archive key."""
        m = ARCHIVED.fullmatch(key.rsplit("/", 1)[-1])
        if not m:
            raise IntegrityError(f"{key} is not an archived WAL object name")
        comp = CODEC_OF_EXT.get(m.group("ext") or "", "none")
        return m.group("name"), m.group("sha"), comp

    # push
    def push(self, path: str | os.PathLike, name: str | None = None, system_identifier: str | None = None,
             choose_key=None, before_store=None) -> WalPushResult:
        """Archive a file; ``choose_key(sha256, key)`` may name the key a new upload goes to (the push queue's
        retry after a crash reuses the key it recorded, so the segment is never stored twice);
        ``before_store()``, called once the file is read, may refuse it (raise) before anything is stored."""
        path = Path(path)
        name = check_wal_name(name or path.name)
        # One read: hashed and compressed together; what is held is the compressed form, never the segment.
        with self.cpu_slots or contextlib.nullcontext():
            sha, size, head, compressed = self._compress_file(path)
        if SEGMENT.fullmatch(name):
            sysid, seg_size = segment_header(head)
            if size != seg_size:
                raise IntegrityError(f"{path} is {size} bytes; its header says segments are {seg_size}")
            self._check_identity(sysid)
        if before_store is not None:
            before_store()
        return self._store(name, sha, size, lambda: self._seal(iter(compressed), name), choose_key)

    def _compress_file(self, path: Path) -> tuple[str, int, bytes, list[bytes]]:
        """(SHA-256, size, first 40 bytes, compressed pieces) of a file, read once in 1 MiB pieces."""
        h = hashlib.sha256()
        size, head = 0, b""

        def pieces():
            nonlocal size, head
            try:
                with open(path, "rb") as f:
                    while block := f.read(_READ):
                        if not size:
                            head = block[:40]
                        h.update(block)
                        size += len(block)
                        yield block
            except OSError as e:
                raise PgdrError(f"cannot read {path}: {e.strerror}") from None

        compressed = list(compress_stream(pieces(), self.compression, self.level))
        return h.hexdigest(), size, head, compressed

    def _check_identity(self, sysid: str) -> None:
        if sysid == self._checked_sysid:
            return  # a long-lived pusher checks its cluster once
        known = self.repo.identity()
        if known is None:
            self.repo.check_identity(sysid, None)
        elif known.get("system_identifier") != sysid:
            raise RepositoryError(
                f"WAL from system identifier {sysid} refused: repository cluster '{self.cluster}' is "
                f"{known.get('system_identifier')}")
        self._checked_sysid = sysid

    def _push_bytes(self, name: str, data: bytes) -> WalPushResult:
        return self._store(name, hashlib.sha256(data).hexdigest(), len(data), lambda: self._pack(_slices(data), name))

    def _store(self, name: str, sha: str, size: int, stored_form, choose_key=None) -> WalPushResult:
        """Store content (``stored_form()`` yields it compressed, sealed when encrypting) as the archived copy
        of ``name``, unless it is there already."""
        existing = self.find(name)
        for key in existing:
            if self._parse_key(key)[1] == sha:
                self.storage.make_durable(key)  # listed is not yet durable (a writer killed before its fsync)
                log.info("%s is already archived with the same content; nothing to do", name)
                return WalPushResult(self.cluster, name, "already_archived", size, -1, sha, key)
        if existing:
            raise IntegrityError(
                f"{name} is already archived with DIFFERENT content ({existing[0]}); refusing to overwrite. "
                "Two servers may be archiving into one repository, or a restored cluster is pushing "
                "into the original's archive")
        stamp = f".{archive_stamp(utcnow())}" if SEGMENT.fullmatch(name) else ""
        key = f"{self._dir(name)}{name}.{sha}{stamp}{self._suffix()}"
        if choose_key is not None:
            key = choose_key(sha, key)
            if self._parse_key(key)[:2] != (name, sha) or not key.startswith(self._dir(name)):
                raise IntegrityError(f"{key} is not a key for {name} with SHA-256 {sha}")
        stored = self.storage.put_stream(key, stored_form(), lock=True)
        log.info("archived %s (%.1f MB -> %.1f MB)", name, size / 1e6, stored / 1e6)
        return WalPushResult(self.cluster, name, "archived", size, stored, sha, key)

    def push_partial(self, path: str | os.PathLike, safe_lsn: int) -> str:
        """Store the segment being streamed, known good up to ``safe_lsn``."""
        path = Path(path)
        return self.push_partial_bytes(path.name.removesuffix(".partial"), path.read_bytes(), safe_lsn)

    def push_segment(self, name: str, data: bytes, system_identifier: str | None = None) -> WalPushResult:
        """Archive a completed segment held in memory (streaming): checked as ``push`` checks a file."""
        if not SEGMENT.fullmatch(name):
            raise UsageError(f"{name!r} is not a WAL segment name")
        sysid, seg_size = segment_header(data)
        require_supported_segment_size(seg_size, name)
        if len(data) != seg_size:
            raise IntegrityError(f"{name}: {len(data)} bytes; its header says segments are {seg_size}")
        if system_identifier is not None and sysid != system_identifier:
            raise RepositoryError(f"{name} is WAL of system identifier {sysid}, not {system_identifier}")
        return self._push_bytes(name, data)

    def push_history(self, name: str, data: bytes) -> WalPushResult:
        """Archive a timeline history file held in memory (streaming)."""
        if not HISTORY.fullmatch(name):
            raise UsageError(f"{name!r} is not a timeline history file name")
        return self._push_bytes(name, data)

    def push_partial_bytes(self, name: str, data: bytes, safe_lsn: int) -> str:
        """Store the segment being streamed, held in memory, known good up to ``safe_lsn``."""
        if not SEGMENT.fullmatch(name):
            raise UsageError(f"{name!r} is not a WAL segment name")
        key = f"{self._dir(name)}{name}.partial{self._suffix()}"
        self.storage.put_stream(key, self._pack(_slices(data), name + ".partial"))  # replaced as it grows: never locked
        self.storage.put_bytes(f"{self._dir(name)}{name}.partial.json", json.dumps({
            "name": name, "safe_lsn": format_lsn(safe_lsn), "sha256": hashlib.sha256(data).hexdigest(),
            "uploaded_at": iso(utcnow())}).encode())
        return key

    @property
    def status_key(self) -> str:
        return f"{self.prefix}status.json"

    def note_progress(self, lsn: int) -> None:
        """Record how far the archive reaches and when: what lag in seconds is measured against."""
        self.storage.put_bytes(self.status_key, json.dumps(
            {"archived_lsn": format_lsn(lsn), "updated_at": iso(utcnow())}).encode())

    def progress(self) -> dict | None:
        try:
            return json.loads(self.storage.get_bytes(self.status_key))
        except (ObjectNotFound, ValueError):
            return None

    def remove_partial(self, name: str) -> None:
        for suffix in (".partial" + SUFFIX[self.compression], ".partial" + SUFFIX[self.compression] + ENC,
                       ".partial.json"):
            self.storage.delete(f"{self._dir(name)}{name}{suffix}")

    # fetch
    def read(self, name: str, allow_partial: bool = True) -> tuple[bytes, str, str]:
        """(content, source, key) of a segment or history file; verified."""
        check_wal_name(name)
        keys = self.find(name)
        if keys:
            key = self._the_copy(name, keys)
            _, sha, _ = self._parse_key(key)
            data = self._unpack(key, name)
            if hashlib.sha256(data).hexdigest() != sha:
                raise IntegrityError(f"{key}: content does not match the SHA-256 in its name")
            if SEGMENT.fullmatch(name):
                self._check_segment(name, data[:40], len(data), key)
            return data, "history" if HISTORY.fullmatch(name) else "segment", key
        if allow_partial and SEGMENT.fullmatch(name):
            found = self._read_partial(name)
            if found:
                return found
        raise WalNotFound(f"{name} is not in the archive of cluster '{self.cluster}'")

    def _read_partial(self, name: str, attempts: int = 3) -> tuple[bytes, str, str] | None:
        """The streamed partial of ``name``, verified; None when there is none. The streamer replaces it
        (data, then metadata) as it grows and removes it once the full segment is archived, so a
        mismatch is read again before it counts as damage."""
        meta_key = f"{self._dir(name)}{name}.partial.json"
        stem = f"{self._dir(name)}{name}.partial"
        problem = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(0.5 * attempt)
                keys = self.find(name)
                if keys:  # completed meanwhile
                    return self.read(name, allow_partial=False)
            try:
                meta = json.loads(self.storage.get_bytes(meta_key))
            except ObjectNotFound:
                return None
            except ValueError:
                problem = f"{meta_key} is not valid JSON"
                continue
            keys = [o.key for o in self.storage.list(stem)
                    if o.key[len(stem):] in {s + e for s in SUFFIX.values() for e in ("", ENC)}]
            if not keys:
                problem = f"{name}: partial segment metadata ({meta_key}) without its data"
                continue
            key = keys[0]
            try:
                data = self._unpack(key, name + ".partial")
            except ObjectNotFound:
                problem = f"{key} disappeared while being read"
                continue
            if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                problem = f"{key}: partial segment does not match its recorded SHA-256"
                continue
            return data, "partial", key
        raise IntegrityError(problem)

    def _check_segment(self, name: str, head: bytes, size: int, key: str) -> None:
        """A segment's size and first page header (``head``: its first 40 bytes) agree with its name."""
        _, seg_size = segment_header(head)
        if size != seg_size:
            raise IntegrityError(f"{key}: {size} bytes, but its header says {seg_size}")
        # The first page names its own position: a segment stored under the wrong name is caught here.
        # (Its timeline may be an ancestor's: a new timeline's first segment starts as a copy.)
        tli, pageaddr = struct.unpack_from("<IQ", head, 4)
        want_tli, segno = parse_segment(name, seg_size)
        if pageaddr != segno * seg_size or tli > want_tli:
            raise IntegrityError(f"{key}: holds WAL for timeline {tli} at {format_lsn(pageaddr)}, "
                                 f"not {name}")

    def restore_to(self, name: str, path: str | os.PathLike, allow_partial: bool = True,
                   sync: bool = True) -> tuple[str, str, str, int]:
        """Write ``name``'s content, verified, to ``path`` (a temporary name the caller renames into place;
        removed when anything fails): (source, key, SHA-256, size). Streamed: the segment is never held in
        memory whole. ``sync``: on disk (fdatasync) before it returns."""
        check_wal_name(name)
        keys = self.find(name)
        found = None
        if keys:  # looked up, and chosen, before anything is written (a refusal leaves no trace)
            key = self._the_copy(name, keys)
        else:
            found = self._read_partial(name) if allow_partial and SEGMENT.fullmatch(name) else None
            if not found:
                raise WalNotFound(f"{name} is not in the archive of cluster '{self.cluster}'")
        try:
            with open(path, "wb") as f:
                if keys:
                    _, sha, _ = self._parse_key(key)
                    h, size, head = hashlib.sha256(), 0, b""
                    for piece in self._unpack_stream(key, name):
                        if len(head) < 40:
                            head += bytes(piece[:40 - len(head)])
                        h.update(piece)
                        f.write(piece)
                        size += len(piece)
                    if h.hexdigest() != sha:
                        raise IntegrityError(f"{key}: content does not match the SHA-256 in its name")
                    if SEGMENT.fullmatch(name):
                        self._check_segment(name, head, size, key)
                    source = "history" if HISTORY.fullmatch(name) else "segment"
                else:
                    data, source, key = found
                    f.write(data)
                    sha, size = hashlib.sha256(data).hexdigest(), len(data)
                if sync:
                    f.flush()
                    os.fdatasync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return source, key, sha, size

    def fetch(self, name: str, dest: str | os.PathLike) -> WalFetchResult:
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.pgdr-{uuid.uuid4().hex[:8]}")
        source, key, _, size = self.restore_to(name, tmp)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        log.info("restored %s from %s (%s)", name, key, source)
        return WalFetchResult(self.cluster, name, source, key, size, str(dest))

    def result_for(self, name: str, dest) -> WalFetchResult:
        """The result of a fetch the prefetch spool answered (pgdr.prefetch)."""
        return WalFetchResult(self.cluster, name, "segment" if SEGMENT.fullmatch(name) else "history",
                              f"{PREFETCH_DIR}/{name}", Path(dest).stat().st_size, str(dest))

    # inventory
    def segment_keys(self) -> dict[str, list[str]]:
        """{segment name: its archive keys} of completed segments, sorted by name, from one listing."""
        out: dict[str, list[str]] = {}
        for obj in self.storage.list(self.prefix):
            base = obj.key.rsplit("/", 1)[-1]
            name = base[:24]
            if ".partial" in base or not SEGMENT.fullmatch(name) or obj.key.startswith(self.prefix + "history/"):
                continue
            out.setdefault(name, []).append(obj.key)
        return dict(sorted(out.items()))

    def segments(self) -> dict[int, list[tuple[int, str]]]:
        """{timeline: sorted [(segment number, name)]} of completed segments."""
        out: dict[int, list[tuple[int, str]]] = {}
        for name in self.segment_keys():
            tli, segno = parse_segment(name)
            out.setdefault(tli, []).append((segno, name))
        return {t: sorted(v) for t, v in sorted(out.items())}

    def partials(self) -> list[dict]:
        """The metadata of every stored partial segment, each with a usable ``safe_lsn`` (others are skipped)."""
        out = []
        for obj in self.storage.list(self.prefix):
            if obj.key.endswith(".partial.json"):
                try:
                    meta = json.loads(self.storage.get_bytes(obj.key))
                    if not SEGMENT.fullmatch(str(meta.get("name"))):
                        continue
                    parse_lsn(meta["safe_lsn"])
                except (ValueError, KeyError, TypeError, AttributeError, ObjectNotFound):
                    log.warning("ignoring unreadable partial segment metadata %s", obj.key)
                    continue
                out.append(meta)
        return out

    def partial_reach(self, tli: int, partials: list[dict] | None = None) -> dict[int, int]:
        """{segment number: LSN its partial is known good up to} on ``tli``.

        A partial counts only up to its safe LSN, never as a whole segment; a safe LSN
        outside its own segment is not trusted beyond the segment's end."""
        out: dict[int, int] = {}
        for p in self.partials() if partials is None else partials:
            p_tli, segno = parse_segment(p["name"])
            if p_tli != tli:
                continue
            safe = min(max(parse_lsn(p["safe_lsn"]), segno * SEG_SIZE), (segno + 1) * SEG_SIZE)
            out[segno] = max(safe, out.get(segno, 0))
        return out

    def history_files(self) -> list[str]:
        names = {self._parse_key(o.key)[0] for o in self.storage.list(self.prefix + "history/")}
        return sorted(n for n in names if n.endswith(".history"))

    def newest_lsn(self, tli: int | None = None) -> int | None:
        """The newest LSN safely in the archive (on ``tli`` when given): the end of the newest
        segment, or a newer partial's safe LSN."""
        segs, partials = self.segments(), self.partials()
        ends = [(items[-1][0] + 1) * SEG_SIZE for t, items in segs.items() if items and (tli is None or t == tli)]
        for t in {parse_segment(p["name"])[0] for p in partials}:
            if tli is None or t == tli:
                ends += self.partial_reach(t, partials).values()
        return max(ends, default=None)

    def archived_by(self, tli: int) -> tuple[int, datetime] | None:
        """(end LSN, time) of the newest WAL archived on ``tli``, the time an upper bound of every commit
        time in it (when it was archived; a streamed partial's upload time for its safe LSN). None when the
        newest completed segment predates recorded archive times."""
        keys = {n: k for n, k in self.segment_keys().items() if n[:8] == f"{tli:08X}"}
        best = None
        if keys:
            name = max(keys)
            m = ARCHIVED.fullmatch(keys[name][0].rsplit("/", 1)[-1])
            end = (parse_segment(name)[1] + 1) * SEG_SIZE
            best = (end, parse_archived_at(m.group("at"))) if m and m.group("at") else (end, None)
        for p in self.partials():
            if p.get("name", "")[:8] != f"{tli:08X}" or not p.get("uploaded_at"):
                continue
            lsn = parse_lsn(p["safe_lsn"])
            if best is None or lsn > best[0]:
                best = (lsn, parse_iso(p["uploaded_at"]))
        return best if best and best[1] else None

    def check(self, from_lsn: int | None = None, from_tli: int | None = None,
              until_lsn: int | None = None, until_tli: int | None = None, until_what: str = "the newest backup") \
            -> WalCheckReport:
        """Archived ranges per timeline, and every gap from ``from_lsn`` (oldest backup start) on.

        ``until_lsn`` (the newest backup's end): an archive that does not reach it is a gap too,
        so backups with no WAL archived after them are never ``ok``. A partial segment counts
        only up to its safe LSN."""
        segs = self.segments()
        partials = self.partials()
        ranges, gaps = [], []
        for tli, items in segs.items():
            run_start = prev = None
            for segno, name in items:
                if prev is not None and segno != prev[0] + 1:
                    ranges.append(_range(tli, run_start, prev))
                    gaps.append(WalGap(tli, prev[1], segment_name(tli, prev[0] + 1), segment_name(tli, segno - 1),
                                       "segments missing between two archived ones"))
                    run_start = (segno, name)
                if run_start is None:
                    run_start = (segno, name)
                prev = (segno, name)
            if prev is not None:
                ranges.append(_range(tli, run_start, prev))
                reach = self.partial_reach(tli, partials)
                newer = [s for s in reach if s > prev[0] + 1]
                if newer:
                    gaps.append(WalGap(tli, prev[1], segment_name(tli, prev[0] + 1), segment_name(tli, min(newer) - 1),
                                       "segments missing before the partial segment being streamed"))
        if from_lsn is not None:
            tli = from_tli or 1
            first_needed = segment_of(from_lsn)
            have = [s for s, _ in segs.get(tli, [])] + list(self.partial_reach(tli, partials))
            if have and min(have) > first_needed:
                gaps.insert(0, WalGap(tli, None, segment_name(tli, first_needed), segment_name(tli, min(have) - 1),
                                      "the oldest backup needs WAL that is not archived"))
            elif not have and until_lsn is None:
                gaps.insert(0, WalGap(tli, None, segment_name(tli, first_needed), segment_name(tli, first_needed),
                                      "no WAL is archived since the oldest backup: is WAL capture running?"))
        if until_lsn is not None:
            tli = until_tli or from_tli or 1
            reach = self.newest_lsn(tli)
            if reach is None or reach < until_lsn:
                first = segment_of(reach) if reach is not None else segment_of(from_lsn or until_lsn)
                last = segs.get(tli, [])[-1][1] if segs.get(tli) else None
                gaps.append(WalGap(
                    tli, last, segment_name(tli, first), segment_name(tli, segment_of(max(until_lsn - 1, 0))),
                    (f"the archive ends at LSN {format_lsn(reach)}" if reach is not None
                     else f"no WAL is archived on timeline {tli}")
                    + f", before the end of {until_what} (LSN {format_lsn(until_lsn)}): is WAL capture running?"))
        newest = self.newest_lsn()
        partial = max(partials, key=lambda p: parse_lsn(p["safe_lsn"]), default=None)
        return WalCheckReport(cluster=self.cluster, ok=not gaps, ranges=ranges, gaps=gaps,
                              history=self.history_files(), newest_lsn=format_lsn(newest) if newest else None,
                              partial=partial)

    def timeline_history(self, tli: int) -> list[tuple[int, int]]:
        """[(timeline, switch LSN), …] of ``tli``'s ancestors, oldest first (empty for timeline 1)."""
        if tli <= 1:
            return []
        try:
            text, _, _ = self.read(f"{tli:08X}.history", allow_partial=False)
        except WalNotFound:
            raise WalNotFound(f"timeline {tli} has no history file in the archive") from None
        out = []
        for line in text.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                out.append((int(parts[0]), parse_lsn(parts[1])))
        return out

    def newest_timeline(self) -> int:
        tlis = list(self.segments()) + [int(h[:8], 16) for h in self.history_files()]
        return max(tlis, default=1)

    def missing_on_path(self, from_tli: int, to_tli: int, start_lsn: int, end_lsn: int) -> list[str]:
        """Segments needed to replay from start_lsn on from_tli, across switches, to end_lsn on to_tli."""
        if to_tli == from_tli:
            return self.missing_between(from_tli, start_lsn, end_lsn)
        history = self.timeline_history(to_tli)
        switches = {t: lsn for t, lsn in history}
        if from_tli not in switches:
            raise WalNotFound(f"timeline {to_tli} does not descend from timeline {from_tli}")
        missing, lsn = [], start_lsn
        path = [t for t, _ in history if t >= from_tli] + [to_tli]
        for t in path:
            stop = switches.get(t, end_lsn)
            if stop > lsn:
                # The segment holding a switch point is read from the newer timeline.
                last = stop if t == to_tli else segment_of(stop) * SEG_SIZE
                if last > lsn:
                    missing += self.missing_between(t, lsn, last)
                lsn = stop
            if lsn >= end_lsn:
                break
        return missing

    def missing_between(self, tli: int, start_lsn: int, end_lsn: int) -> list[str]:
        """Segment names on ``tli`` needed to replay from start_lsn to end_lsn that are not archived."""
        have = {s for s, _ in self.segments().get(tli, [])}
        reach = self.partial_reach(tli)  # a partial covers its segment only up to its safe LSN
        return [segment_name(tli, s) for s in range(segment_of(start_lsn), segment_of(max(end_lsn - 1, start_lsn)) + 1)
                if s not in have and reach.get(s, -1) < min(end_lsn, (s + 1) * SEG_SIZE)]


_READ = 1 << 20


def _slices(data: bytes):
    """Content held in memory, handed on in 1 MiB views (the compressor's output stays small too)."""
    with memoryview(data) as view:
        for i in range(0, len(data), _READ):
            yield view[i:i + _READ]


def archive_stamp(now: datetime) -> str:
    """``now`` rounded UP to the second: still an upper bound of every commit time before it."""
    now = now.astimezone(timezone.utc)
    if now.microsecond:
        now = now.replace(microsecond=0) + timedelta(seconds=1)
    return now.strftime(ARCHIVED_AT)


def parse_archived_at(text: str) -> datetime:
    return datetime.strptime(text, ARCHIVED_AT).replace(tzinfo=timezone.utc)


def _range(tli, first, last) -> WalRange:
    return WalRange(tli, first[1], last[1], format_lsn(first[0] * SEG_SIZE), format_lsn((last[0] + 1) * SEG_SIZE),
                    last[0] - first[0] + 1)


# One prefetcher per recovery: the other end of the spool pgdr.prefetch describes. It keeps the ``count``
# segments after the one PostgreSQL wants (or took last) downloaded, verified and on disk (fdatasync: the
# server's own fsync of each restored segment then finds nothing to write), ``workers`` in flight, and
# answers the request of the call waiting now first (its own worker; while it waits, one window download at
# most competes with it). A "not in the archive" answer comes only from a lookup begun after the request was
# seen. It removes what PostgreSQL has passed, and stops when nobody asked for anything for ``idle`` seconds
# (5 once the server has left recovery), the spool is gone, or the server stopped. Its failures are only
# logged and answered "error": the call then fetches the file itself, with wal-fetch's exit codes.

def run_prefetcher(archive: "WalArchive", directory: Path, count: int = 8, who: str = "", idle: float = 60.0,
                   workers: int = 4, poll: float = 0.01, after: str | None = None) -> dict:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    spool = Spool(directory)
    if not spool.made_and_own():
        raise PgdrError(f"{directory} is not a directory of this user's that only it may write: no prefetch "
                        "spool there")
    lock = spool.hold(who)
    if lock is None:
        return {"prefetched": [], "reason": "another prefetcher serves this spool"}
    if after and spool.read_want() is None:
        spool.want(after)
    datadir = directory.absolute().parent.parent  # <datadir>/pg_wal/.pgdr-prefetch
    of_a_server = (datadir / "PG_VERSION").exists()
    try:
        for name in remove_abandoned_claims(directory.absolute().parent) if directory.name == PREFETCH_DIR else ():
            log.warning("removed %s from pg_wal: a copy claimed by a wal-fetch that was killed before it "
                        "finished", name)
    except OSError as e:
        log.warning("could not look for copies abandoned in pg_wal by killed wal-fetch calls: %s", e)
    wake = threading.Event()
    in_flight: dict[str, object] = {}
    retry_at: dict[str, float] = {}  # not archived yet, or failed: looked up again after a pause
    fetched: list[str] = []
    delivered: set[str] = set()  # copies written: once gone, taken (not fetched again unless asked for)
    request = None  # [name, nonce, seen at, answered]: what the call waiting now asked for
    # The first segment to keep ready: after the one wanted last; before any is wanted (the server asks for
    # timeline history files first), the backup's start segment, from the data directory's backup_label.
    first = _label_start(datadir)
    last_want, last_change = None, time.monotonic()
    workers = max(1, min(workers, count))

    def one(name: str, asked: bool) -> tuple[str, float, str, bool]:
        """(outcome, when the lookup began, message, ``asked``: the request's own lookup, not a read-ahead)."""
        began = time.monotonic()
        tmp = directory / f".{name}.tmp"
        try:
            source, _, sha, _ = archive.restore_to(name, tmp, allow_partial=asked, sync=True)
            if source == "partial":  # the streamed segment grows: never kept, the call fetches it itself
                tmp.unlink(missing_ok=True)
                return "defer", began, "", asked
            spool.mark_verified(f"{name}.{sha}", tmp)
            os.replace(tmp, directory / f"{name}.{sha}")
            return "ok", began, "", asked
        except WalNotFound:
            return "missing", began, "", asked
        except Exception as e:  # noqa: BLE001 - answered "error": the call fetches it itself and says why
            if directory.is_dir():
                log.warning("prefetch of %s failed (wal-fetch fetches it itself): %s", name, e)
            return "error", began, str(e), asked
        finally:
            wake.set()

    pool = ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix="pgdr-prefetch")
    reason = "idle"
    try:
        while True:
            now = time.monotonic()
            if not directory.is_dir():
                reason = "spool removed"
                break
            if of_a_server and not (datadir / "postmaster.pid").exists():
                reason = "server stopped"
                break
            if of_a_server and now - last_change > 5 and \
                    not any((datadir / f).exists() for f in ("recovery.signal", "standby.signal")):
                # PostgreSQL removed its signal file when recovery ended (its last few history lookups follow).
                reason = "recovery ended"
                break
            if not spool.still_held_by(lock):
                reason = "its spool was removed and made anew (another prefetcher serves it)"
                break
            want = spool.read_want()
            if want != last_want:
                last_want, last_change = want, now
                # Seen after it was read: a lookup that began later began after the call asked.
                request = [want[0], want[1], time.monotonic(), False] if want and want[1] != TOOK else None
            elif now - last_change > idle:
                break
            for name, fut in list(in_flight.items()):
                if not fut.done():
                    continue
                del in_flight[name]
                outcome, began, message, asked = fut.result()
                if outcome == "ok":
                    fetched.append(name)
                    delivered.add(name)
                    retry_at.pop(name, None)
                else:
                    retry_at[name] = now + 1.0
                if request and request[0] == name and not request[3]:
                    if outcome == "missing" and (began < request[2] or not asked):
                        # Looked up before the call asked, or as a read-ahead (which passes over a streamed
                        # partial segment): only the request's own lookup may say "not archived".
                        continue
                    if outcome != "ok":  # (ok: the copy is in the spool, the call takes it)
                        spool.answer(request[1], who, outcome, message)
                    request[3] = True
            if want and SEGMENT.fullmatch(want[0]):
                first = segment_name(*_next_segment(want[0]))  # a request's own segment is its own business
            copies = spool.copies()
            if request and not request[3] and request[0] not in in_flight and request[0] not in copies:
                in_flight[request[0]] = pool.submit(one, request[0], True)
            if first:
                # Passed (or taken), another timeline's, a history nobody waits for: never asked for again.
                for name, entry in copies.items():
                    if name not in in_flight and (not request or name != request[0]) and \
                            (not SEGMENT.fullmatch(name) or name[:8] != first[:8] or name < first):
                        (directory / entry).unlink(missing_ok=True)
                        (directory / f".{entry}{VERIFIED}").unlink(missing_ok=True)
                delivered = {n for n in delivered if n[:8] == first[:8] and n >= first}
                tli, segno = parse_segment(first)
                busy = sum(1 for n in in_flight if not request or n != request[0])
                limit = 1 if request and not request[3] else workers  # what a call waits for comes first
                for i in range(count):
                    if busy >= limit:
                        break
                    name = segment_name(tli, segno + i)
                    if name in in_flight or name in copies or name in delivered or retry_at.get(name, 0) > now:
                        continue
                    in_flight[name] = pool.submit(one, name, False)
                    busy += 1
            wake.wait(poll)
            wake.clear()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        spool.clear()  # nobody asks any more: what is left would only take space in pg_wal
        spool.release(lock)
    log.info("prefetcher for %s stops (%s): %d segments prefetched", directory, reason, len(fetched))
    return {"prefetched": fetched, "reason": "spool removed" if not directory.is_dir() else reason}


def _next_segment(name: str) -> tuple[int, int]:
    tli, segno = parse_segment(name)
    return tli, segno + 1


def _label_start(datadir: Path) -> str | None:
    """The segment a restored data directory's recovery starts from: ``backup_label``'s START WAL LOCATION."""
    try:
        text = (datadir / "backup_label").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"^START WAL LOCATION: .*\(file ([0-9A-F]{24})\)$", text, re.M)
    return m.group(1) if m else None

