"""Incremental backups (PostgreSQL 17+): chains, and applying one in place.

``pg_basebackup --incremental=<parent's backup_manifest>`` sends, for each
relation file changed since the parent, ``INCREMENTAL.<name>`` instead of
``<name>``: a header (magic ``0xd3ae1f0d``, block count, truncation block
length, the segment-relative block numbers, zero padding to a block boundary
when there are blocks) and then those blocks. Every other file is sent whole.

A chain restores without staging its members: the full is unpacked into the
target, then each incremental's tar stream is applied in place, in order,
straight from the repository (:class:`ChainApplier`), with the semantics of
PostgreSQL's own ``pg_combinebackup`` (src/bin/pg_combinebackup/reconstruct.c):

- a whole file replaces the target's;
- for ``INCREMENTAL.<name>``: blocks at or past the truncation length are
  dropped, the listed blocks are written at their offsets, the file ends at
  ``max(truncation length, highest block + 1)`` blocks (a hole reads as zeros,
  as pg_combinebackup zero-fills a block no backup holds);
- every file and directory of the target that the incremental's tar does not
  hold is removed (a dropped table, WAL of an earlier member);
- ``backup_label`` loses its ``INCREMENTAL FROM`` lines (PostgreSQL refuses to
  start from an incremental's label).

Disk use stays at the restored cluster's size plus nothing. Afterwards the
newest member's ``backup_manifest`` is rewritten as pg_combinebackup would:
reconstructed files under their own names with their sizes (and no checksum:
no backup holds the reconstructed file whole; every block of it was checked
as stored), every whole file with PostgreSQL's checksum, so
``pg_verifybackup`` proves the file set (nothing missing, nothing extra),
sizes, the checksums of whole files and the WAL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Iterator

from pgdr.errors import BackupNotFound, IntegrityError, PgdrError
from pgdr.labels import chain_full, is_incremental
from pgdr.manifest import BackupManifest
from pgdr.repository import Repository
from pgdr.tarstream import TarExtractor, check_kind, member_parts

log = logging.getLogger(__name__)

MAGIC = 0xD3AE1F0D
PREFIX = "INCREMENTAL."
BLCKSZ = 8192
RELSEG_SIZE = 131072  # blocks per relation segment file (1 GB of 8 kB blocks)
MAX_CHAIN = 1000
LABEL_DROP = ("INCREMENTAL FROM LSN:", "INCREMENTAL FROM TLI:")
_HEAD_LE, _HEAD_BE = struct.Struct("<III"), struct.Struct(">III")  # magic, block count, truncation length


# ----------------------------------------------------------------------------------------------- chains

def chain_of(repo: Repository, m: BackupManifest, backups: dict[str, BackupManifest] | None = None
             ) -> list[BackupManifest]:
    """The chain a backup restores from, full first, ``m`` last; every link checked.

    Raises IntegrityError naming the member that is missing or does not fit, before anything is written.
    """
    chain = [m]
    seen = {m.label}
    while chain[-1].type == "incr":
        child = chain[-1]
        parent_label = child.parent
        if not parent_label or child.full != chain_full(child.label) or not is_incremental(child.label):
            raise IntegrityError(f"backup {child.label} is an incremental whose manifest does not name its chain "
                                 f"consistently (parent {child.parent!r}, full {child.full!r}): refusing it")
        if parent_label in seen or len(chain) > MAX_CHAIN:
            raise IntegrityError(f"backup {child.label}: its chain loops or is longer than {MAX_CHAIN}")
        try:
            parent = backups[parent_label] if backups is not None else repo.manifest(parent_label)
        except (KeyError, BackupNotFound):
            raise IntegrityError(
                f"backup {m.label} needs {parent_label} (the parent of {child.label} in the chain from "
                f"{child.full}), which is missing from the repository: the chain cannot be restored; "
                "nothing was written") from None
        if parent.status != "ok":
            raise IntegrityError(f"backup {m.label} needs {parent_label}, which has status {parent.status!r}: "
                                 "the chain cannot be restored; nothing was written")
        if chain_full(parent.label) != child.full:
            raise IntegrityError(f"backup {child.label} names parent {parent_label}, which is not in its chain "
                                 f"from {child.full}: refusing it")
        if parent.system_identifier != child.system_identifier or parent.pg_major != child.pg_major:
            raise IntegrityError(f"backup {child.label} and its parent {parent_label} are of different clusters "
                                 "or PostgreSQL versions: refusing the chain")
        if _lsn(parent.stop_lsn) > _lsn(child.start_lsn):
            raise IntegrityError(f"backup {child.label} starts at {child.start_lsn}, before its parent "
                                 f"{parent_label} ended ({parent.stop_lsn}): refusing the chain")
        if parent.encryption != child.encryption and bool(parent.encryption) != bool(child.encryption):
            log.info("chain of %s mixes encrypted and unencrypted members", m.label)
        seen.add(parent_label)
        chain.append(parent)
    if chain[-1].type == "incr" or chain[-1].parent:
        raise IntegrityError(f"backup {m.label}: the chain does not start at a full backup")
    return list(reversed(chain))


def dependents(backups: list[BackupManifest]) -> dict[str, list[str]]:
    """label -> the labels of the incrementals whose direct parent it is."""
    out: dict[str, list[str]] = {}
    for b in backups:
        if b.parent:
            out.setdefault(b.parent, []).append(b.label)
    return out


def _lsn(text: str) -> int:
    from pgdr.lsn import parse_lsn

    return parse_lsn(text)


# ------------------------------------------------------------------------------------------ applying

class _IncrementalFile:
    """Applies one ``INCREMENTAL.<name>`` member's bytes to an open file, as they stream by.

    Blocks are written straight from the stream's pieces, a run of consecutive block numbers in one
    ``pwrite`` (an incremental lists them in order: a changed range is one write, not one per 8 kB block);
    only a block split between two pieces is copied aside (the tar's 512-byte alignment splits one at almost
    every piece). ``parent`` is the applier's descriptor of the
    member's directory, open until the member ends."""

    def __init__(self, name: str, parent: int, leaf: str, size: int, known: int | None = None):
        self.name, self.size = name, size
        self.parent, self.leaf = parent, leaf  # the target file is opened once its header says why
        self.known = known  # the length this restore gave the file, when the applier knows it
        self.fd: int | None = None
        self.unchanged = False  # no block, same length: the target file is left as it is, never opened
        self.buf = bytearray()  # the header until it is whole, then a block split between two pieces
        self.order = "<"  # the header's byte order: little-endian, or big-endian (">") from a big-endian server
        self.blocks: list[int] | None = None
        self.header_len = 0
        self.index = 0  # next block to write
        self.got = 0
        self.truncation = 0

    def _fail(self, why: str) -> IntegrityError:
        return IntegrityError(f"incremental file {self.name!r} {why}; refusing it (the backup is damaged or was "
                              "tampered with)")

    def feed(self, chunk) -> None:
        self.got += len(chunk)
        if self.got > self.size:
            raise self._fail("is longer than its tar header says")
        if self.blocks is None:
            self.buf += chunk
            if not self._header() or not self.buf:  # most: a header and nothing else (no changed block)
                return
            chunk, self.buf = self.buf, bytearray()  # what followed the header
        with memoryview(chunk) as view:
            if self.buf:  # a block split between the previous piece and this one: complete it, copying only it
                need = BLCKSZ - len(self.buf)
                self.buf += view[:need]
                if len(self.buf) < BLCKSZ:
                    return
                block, self.buf = self.buf, bytearray()
                self._write(memoryview(block))
                view = view[need:]
            self._write(view)

    def _write(self, view: memoryview) -> None:
        """Every whole block in ``view`` to its offset; a partial one at the end waits for the next piece."""
        blocks, pos = self.blocks, 0
        whole = min(len(view) // BLCKSZ, len(blocks) - self.index)
        while whole:
            first = blocks[self.index]
            run = 1
            while run < whole and blocks[self.index + run] == first + run:
                run += 1
            end = pos + run * BLCKSZ
            offset = first * BLCKSZ
            while pos < end:  # a regular file takes it whole; a short write is continued, never dropped
                n = os.pwrite(self.fd, view[pos:end], offset)
                pos += n
                offset += n
            self.index += run
            whole -= run
        if pos < len(view):
            if self.index == len(blocks):
                raise self._fail("holds more bytes than its blocks")
            self.buf += view[pos:]

    def _header(self) -> bool:
        if len(self.buf) < 12:
            return False
        magic, count, self.truncation = _HEAD_LE.unpack_from(self.buf)
        if magic != MAGIC:
            magic_be, count, self.truncation = _HEAD_BE.unpack_from(self.buf)
            if magic_be != MAGIC:
                raise self._fail(f"does not start with the incremental magic (found {magic:#x})")
            self.order = ">"
        if count > RELSEG_SIZE or self.truncation > RELSEG_SIZE:
            raise self._fail(f"claims {count} blocks and a truncation length of {self.truncation} blocks, more "
                             f"than a relation segment holds ({RELSEG_SIZE})")
        raw = 12 + 4 * count
        header = raw if count == 0 or raw % BLCKSZ == 0 else raw + BLCKSZ - raw % BLCKSZ
        if self.size != header + count * BLCKSZ:
            raise self._fail(f"is {self.size} bytes, but its header ({count} blocks of {BLCKSZ}) makes "
                             f"{header + count * BLCKSZ}")
        if len(self.buf) < header:
            return False
        blocks = list(struct.unpack_from(f"{self.order}{count}I", self.buf, 12)) if count else []
        if count and (max(blocks) >= RELSEG_SIZE or len(set(blocks)) != len(blocks)):
            raise self._fail("lists a block number twice or past the end of a relation segment")
        if header > raw and any(self.buf[raw:header]):
            raise self._fail("has a non-zero header padding")
        del self.buf[:header]
        self.blocks = blocks
        self.header_len = header
        if not blocks:  # most relation files of an incremental: unchanged since the parent
            if self.known is not None:  # a regular file this restore wrote, of this length: no need to look
                self.unchanged = self.known == self.truncation * BLCKSZ
            else:
                try:
                    st = os.stat(self.leaf, dir_fd=self.parent, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                self.unchanged = (st is not None and stat.S_ISREG(st.st_mode)
                                  and st.st_size == self.truncation * BLCKSZ)
            if self.unchanged:
                return True
        self.fd = os.open(self.leaf, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=self.parent)
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"tar member {self.name!r}: its file in the target is not a regular file")
        # Blocks at or past the truncation length were truncated away since the parent: drop them first.
        if st.st_size > self.truncation * BLCKSZ:
            os.ftruncate(self.fd, self.truncation * BLCKSZ)
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def finish(self) -> int:
        """The file's final length, once every byte arrived."""
        if self.blocks is None or self.index != len(self.blocks) or self.got != self.size:
            raise self._fail("ends early")
        length = max(self.truncation, max(self.blocks) + 1 if self.blocks else 0) * BLCKSZ
        if self.unchanged:
            return length
        if os.fstat(self.fd).st_size != length:  # most relation files of an incremental have not changed size
            os.ftruncate(self.fd, length)  # never shorter than what was written; extends with zeros
        return length


class ChainApplier(TarExtractor):
    """Applies the tar stream of an incremental on top of the restored state of its parent in ``root``.

    The extractor's rules hold (paths walked from the root without following links; only regular files and
    directories); unlike it, a member may replace the file the parent left there.
    """

    def __init__(self, root: Path, base: bool = False, skip_wal: bool = False, lengths: dict[str, int] | None = None):
        super().__init__(root)
        self.base = base  # the chain's full: unpacked into an empty target, holds no INCREMENTAL. file
        self.skip_wal = skip_wal  # not the chain's last member: its WAL is never used (the last one's is)
        # Optional path -> length of every regular file the chain's members wrote so far, kept up to date by
        # each: an unchanged relation is then recognised without a stat. restore_chain passes none (a map of
        # every file is what kept a chain's memory growing); without it the file is stat'ed.
        self.lengths = lengths
        self._skip = False
        # Paths (relative) of the whole files this member holds, and of the files it rebuilds from INCREMENTAL.
        # ones (their lengths are on the disk): no per-file map, a chain of a million files in bounded memory.
        self.files: set[str] = set()
        self.rebuilt_paths: set[str] = set()
        self.dirs: set[str] = set()
        self._inc: _IncrementalFile | None = None
        self._label: bytearray | None = None
        self._label_parent: int | None = None

    def member(self, name, kind, size, mode, linkname):
        parts = member_parts(name)
        check_kind(name, kind, linkname)
        if kind == b"5":
            super().member(name, kind, size, mode, linkname)
            self.dirs.add("/".join(parts))
            return
        leaf = parts[-1]
        incremental = leaf.startswith(PREFIX)
        if incremental and self.base:
            raise IntegrityError(f"tar member {name!r}: a full backup holds no incremental file; refusing it")
        if self.skip_wal and parts[0] == "pg_wal":
            self._skip = True  # like pg_combinebackup: only the newest member's WAL goes into the result
            return
        if incremental:
            leaf = leaf[len(PREFIX):]
            if not leaf or leaf in (".", ".."):
                raise IntegrityError(f"tar member {name!r} names no file; refusing it")
        path = "/".join(parts[:-1] + [leaf])
        if path in self.files or path in self.rebuilt_paths or path in self.dirs:
            raise IntegrityError(f"tar member {name!r} names a path that an earlier member already created; "
                                 "refusing it (the backup is damaged or was tampered with)")
        (self.rebuilt_paths if incremental else self.files).add(path)
        parent = self._open_dir(name, parts[:-1])
        if incremental:
            self._inc = _IncrementalFile(name, parent, leaf, size,
                                         self.lengths.get(path) if self.lengths is not None else None)
            self._inc_path = path
            return
        if path == "backup_label":
            self._unlink(name, leaf, parent)
            self._label = bytearray()
            self._label_parent = os.dup(parent)
            self._label_mode = mode
            return
        perm = (mode & 0o640) | 0o600 if mode else 0o600
        # The chain's full goes into an empty target: every file is new (O_EXCL refuses a second member of
        # one name), nothing to look up or unlink first.
        self._fd = None if self.base else self._rewrite(leaf, parent, perm, size)
        if self._fd is None:
            if not self.base:
                self._unlink(name, leaf, parent)
            try:
                self._fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                   perm, dir_fd=parent)
            except FileExistsError:
                raise IntegrityError(f"tar member {name!r} names a path that already exists in the target; "
                                     "refusing it") from None
        if self.lengths is not None:
            self.lengths[path] = size

    @staticmethod
    def _rewrite(leaf: str, parent: int, perm: int, size: int) -> int | None:
        """The parent's copy of a whole file, to be overwritten from its start with the member's ``size`` bytes
        (cut to that length first when longer): creating a file costs a journal transaction (~1 ms here),
        overwriting one does not, and an incremental holds hundreds of small whole files. Only a plain
        regular file with one name qualifies (no link followed, no FIFO waited on); None for anything else,
        which is unlinked and created anew."""
        try:
            fd = os.open(leaf, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
        except OSError:
            return None  # missing, a link, a directory, a FIFO without a reader…
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            return None
        if st.st_size > size:
            os.ftruncate(fd, size)
        if stat.S_IMODE(st.st_mode) != perm:
            os.fchmod(fd, perm)
        return fd

    @staticmethod
    def _unlink(name: str, leaf: str, parent: int) -> None:
        try:
            os.unlink(leaf, dir_fd=parent)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise IntegrityError(f"tar member {name!r} is a file where the parent backup has a directory; "
                                 "refusing it") from None

    def data(self, chunk):
        if self._skip:
            return
        if self._inc is not None:
            self._inc.feed(chunk)
        elif self._label is not None:
            self._label += chunk
            if len(self._label) > 1 << 20:
                raise IntegrityError("backup_label is larger than 1 MiB; refusing it")
        else:
            super().data(chunk)

    def member_end(self):
        if self._skip:
            self._skip = False
            return
        if self._inc is not None:
            inc, self._inc = self._inc, None
            try:
                length = inc.finish()
            finally:
                inc.close()
            if self.lengths is not None:
                self.lengths[self._inc_path] = length
            return
        if self._label is not None:
            text, self._label = bytes(self._label), None
            parent, self._label_parent = self._label_parent, None
            try:
                fd = os.open("backup_label", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=parent)
                try:
                    os.write(fd, strip_incremental_lines(text))
                finally:
                    os.close(fd)
            finally:
                os.close(parent)
            return
        super().member_end()

    @property
    def rebuilt(self) -> int:
        """How many files this member rebuilt from INCREMENTAL. ones (all of them, once it was applied)."""
        return len(self.rebuilt_paths)

    def release(self) -> None:
        if self._inc is not None:
            self._inc.close()
            self._inc = None
        if self._label_parent is not None:
            os.close(self._label_parent)
            self._label_parent = None
            self._label = None
        super().release()

    def prune(self) -> int:
        """Remove every file and directory under the root that this member does not hold. Returns the count."""
        removed = 0
        root = str(self.root)
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            rel_dir = os.path.relpath(dirpath, root)
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                if rel not in self.files and rel not in self.rebuilt_paths:
                    os.unlink(os.path.join(dirpath, name))
                    if self.lengths is not None:
                        self.lengths.pop(rel, None)
                    removed += 1
            for name in dirnames:
                full = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not os.path.islink(full) and rel not in self.dirs and not os.listdir(full):
                    os.rmdir(full)
                    removed += 1
        return removed


def strip_incremental_lines(text: bytes) -> bytes:
    return b"".join(line for line in text.splitlines(keepends=True)
                    if not line.decode("utf-8", "replace").startswith(LABEL_DROP))


def apply_member(repo: Repository, m: BackupManifest, target: Path, *, base: bool = False,
                 last: bool = True) -> tuple[int, ChainApplier]:
    """One chain member, every object checked before use (pgdr.unpack), applied in place on ``target`` (the
    full: unpacked into it). Returns the bytes read and the applier (the paths the member held, how many
    files it rebuilt)."""
    from pgdr.unpack import feed_parts

    applier = ChainApplier(target, base=base, skip_wal=not last)
    try:
        read = feed_parts(repo, m, applier.feed)
        applier.close()
        removed = 0 if base else applier.prune()
    except OSError as e:
        raise PgdrError(f"cannot apply incremental backup {m.label} to {target}: {e}") from e
    finally:
        applier.release()
    if base:
        log.info("restored full backup %s, the base of the chain", m.label)
        return read, applier
    log.info("applied incremental %s: %d relation files rebuilt in place, %d whole files, %d removed",
             m.label, applier.rebuilt, len(applier.files), removed)
    return read, applier


def restore_chain(repo: Repository, chain: list[BackupManifest], target: Path) -> int:
    """The full into ``target``, then every incremental in order, in place. Returns the bytes read.

    Per file, only the paths of the member being applied are kept in memory (about 240 bytes a file, measured
    at 200,000 files): the lengths of the files the chain wrote and rebuilt are read back from the disk."""
    read, applier = apply_member(repo, chain[0], target, base=True, last=len(chain) == 1)
    for i, m in enumerate(chain[1:], start=2):
        applier = None  # the previous member's paths, released before the next member's are gathered
        got, applier = apply_member(repo, m, target, last=i == len(chain))
        read += got
    if len(chain) > 1:
        rewrite_backup_manifest(target, applier.rebuilt_paths)
    return read


# ------------------------------------------------------------------------------------- backup_manifest

def rewrite_backup_manifest(target: Path, rebuilt: set[str]) -> None:
    """The newest member's backup_manifest, as pg_combinebackup writes it for the combined directory. Read and
    written a line at a time, never whole: PostgreSQL writes one file a line, and a cluster of a million
    files has a manifest of hundreds of MB (parsed whole, several GB of Python objects). ``rebuilt``: the paths
    the newest member's tar held as INCREMENTAL. files, under their own names; the manifest must list exactly
    those as incremental, and a rebuilt file's size is read from the disk, where it was just written."""
    path = target / "backup_manifest"
    listed = 0
    tmp = target / "backup_manifest.pgdr-tmp"
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as src, open(tmp, "wb") as out:
            pending: list[str] = []

            def flush() -> None:
                data = "".join(pending).encode()
                pending.clear()
                sha.update(data)
                out.write(data)

            def emit(text: str) -> None:
                pending.append(text)
                if len(pending) >= 4096:
                    flush()

            for kind, value in _manifest_lines(src):
                if kind == "version":
                    emit('{ "PostgreSQL-Backup-Manifest-Version": %d,\n' % value)
                elif kind == "system":
                    emit('"System-Identifier": %d,\n' % value)
                elif kind == "files":
                    emit('"Files": [\n')
                    first = True
                elif kind == "file":
                    entry, incremental = _combined_entry(target, value, rebuilt)
                    listed += incremental
                    emit(("" if first else ",\n") + json.dumps(entry))
                    first = False
                elif kind == "ranges":
                    emit('\n],\n"WAL-Ranges": [\n')
                    first = True
                elif kind == "range":
                    emit(("" if first else ",\n") + json.dumps(value))
                    first = False
                elif kind == "end":
                    emit("\n],\n")
            if listed != len(rebuilt):
                raise IntegrityError(f"the incremental's backup_manifest lists {listed} incremental files, its tar "
                                     f"held {len(rebuilt)}")
            flush()
            out.write(b'"Manifest-Checksum": "' + sha.hexdigest().encode() + b'"}\n')
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise IntegrityError(f"the incremental's backup_manifest is unreadable: {e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _combined_entry(target: Path, entry: dict, rebuilt: set[str]) -> tuple[dict, bool]:
    """A file's manifest entry in the combined directory, and whether it was an INCREMENTAL. one: that becomes
    the file it rebuilt, with its size on the disk and without a checksum (pg_combinebackup leaves none
    either), and so does backup_label."""
    p = entry.get("Path")
    if p is None:
        return entry, False  # an Encoded-Path entry: never an incremental file
    head, _, leaf = p.rpartition("/")
    incremental = leaf.startswith(PREFIX)
    if incremental:
        real = (head + "/" if head else "") + leaf[len(PREFIX):]
        if real not in rebuilt:
            raise IntegrityError(f"backup_manifest lists {p}, which the incremental's tar did not hold as an "
                                 "incremental file")
        entry = {"Path": real, "Size": _size_on_disk(target, real, p), "Last-Modified": entry.get("Last-Modified")}
    elif p == "backup_label":
        entry = {"Path": p, "Size": _size_on_disk(target, p, p), "Last-Modified": entry.get("Last-Modified")}
    return {k: v for k, v in entry.items() if v is not None}, incremental


def _size_on_disk(target: Path, rel: str, listed: str) -> int:
    """The size of a file the chain's restore just wrote (a path its tar held: checked by the extractor)."""
    try:
        st = os.stat(f"{target}/{rel}", follow_symlinks=False)
    except OSError as e:
        raise IntegrityError(f"backup_manifest lists {listed}, but the restore left no {rel} ({e.strerror})") \
            from None
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(f"backup_manifest lists {listed}, but {rel} is not a regular file")
    return st.st_size


def _manifest_lines(src) -> Iterator[tuple[str, object]]:
    """A backup_manifest as PostgreSQL (13 to 18) lays it out, a line at a time: ("version", n), ("system",
    n), ("files", None), ("file", entry) for each, ("ranges", None), ("range", r) for each, ("end", None).
    Anything else is refused, naming the line: pgdr rewrites nothing it has not understood."""
    state = "head"
    number, line = 0, ""
    sha = hashlib.sha256()  # of everything before the Manifest-Checksum line, which must match it
    try:
        for number, raw in enumerate(src, start=1):
            line = raw.rstrip(b"\r\n").decode("utf-8")  # PostgreSQL writes Encoded-Path for other names
            if not line.startswith('"Manifest-Checksum": '):
                sha.update(raw)
            if state == "file" and line.startswith("{"):  # all but a handful of lines
                entry = json.loads(line[:-1] if line.endswith(",") else line)
                if not isinstance(entry, dict):
                    raise ValueError
                yield "file", entry
            elif state == "head" and line.startswith('{ "PostgreSQL-Backup-Manifest-Version": ') and \
                    line.endswith(","):
                yield "version", int(line.split(":", 1)[1].strip().rstrip(","))
                state = "system"
            elif state == "system" and line.startswith('"System-Identifier": ') and line.endswith(","):
                yield "system", int(line.split(":", 1)[1].strip().rstrip(","))
                state = "files?"
            elif state in ("system", "files?") and line == '"Files": [':
                yield "files", None
                state = "file"
            elif state == "file" and line == "],":
                state = "ranges?"
            elif state == "ranges?" and line == '"WAL-Ranges": [':
                yield "ranges", None
                state = "range"
            elif state == "range" and line.startswith("{"):
                entry = json.loads(line.rstrip(","))
                if not isinstance(entry, dict) or not {"Timeline", "Start-LSN", "End-LSN"} <= set(entry):
                    raise ValueError
                yield "range", entry
            elif state == "range" and line == "],":
                yield "end", None
                state = "checksum"
            elif state == "checksum" and line.startswith('"Manifest-Checksum": '):
                if line != f'"Manifest-Checksum": "{sha.hexdigest()}"}}':
                    raise IntegrityError(f"the incremental's backup_manifest, line {number}: its Manifest-Checksum "
                                         "does not match its contents")
                state = "done"
            elif not (line == "" and state in ("file", "range")):  # an empty list's own line
                raise IntegrityError(f"the incremental's backup_manifest, line {number}: unexpected: {line[:120]!r}")
    except UnicodeDecodeError:
        raise IntegrityError(f"the incremental's backup_manifest, line {number}: not UTF-8") from None
    except ValueError:
        raise IntegrityError(f"the incremental's backup_manifest, line {number}: unreadable: {line[:120]!r}") \
            from None
    if state != "done":
        missing = "Manifest-Checksum" if state == "checksum" else "end of its lists"
        raise IntegrityError(f"the incremental's backup_manifest ends early (no {missing})")


# ------------------------------------------------------------------------------------------- the server

def incremental_support(info) -> tuple[bool, str]:
    """Whether the server (its pgdr.postgres.ServerInfo) can take an incremental backup now, and in words
    why not."""
    major = info.major
    if major < 17:
        return False, f"PostgreSQL {major} has no incremental backups (17 or newer with summarize_wal = on)"
    setting = info.summarize_wal
    if setting != "on":
        return False, (f"summarize_wal = {setting or 'unknown'}: PostgreSQL takes incremental backups only with "
                       "summarize_wal = on (ALTER SYSTEM SET summarize_wal = on; SELECT pg_reload_conf(); the "
                       "first incremental follows the next full backup)")
    return True, "summarize_wal = on: incremental backups possible"
