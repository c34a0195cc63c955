"""Reading a backup back out of the repository, trusting nothing unchecked.

Restore (into the target directory) and verify (into a scratch directory) both
use this module:

- :class:`VerifiedObject` yields a stored object's bytes one piece of a few MiB
  at a time, each only after its SHA-256 matched the manifest's: nothing
  unverified is ever decrypted, decompressed or unpacked, memory stays bounded
  and nothing is read twice. Objects of manifests without per-piece digests
  (older pgdr) are read twice: once checked whole, then unpacked against the
  digests taken on that first pass (so a change between the two reads is
  caught too), and the log says so.
- :func:`part_content` is a part's tar bytes: verified | decrypted | decompressed.
- :func:`unpack` writes the whole tar stream with :class:`~pgdr.tarstream.TarExtractor`.
- :func:`require_key` and :func:`pg_verifybackup` are the checks before and after.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from pathlib import Path
from typing import Iterator

from pgdr.compression import decompress_stream
from pgdr.crypto import check_key, unseal
from pgdr.errors import IntegrityError, PgdrError
from pgdr.manifest import BackupManifest, StoredFile
from pgdr.repository import Repository
from pgdr.storage import Storage
from pgdr.streams import ChunkDigests, Prefetch
from pgdr.tarstream import TarExtractor

log = logging.getLogger(__name__)


def _failed(check: str, message: str) -> IntegrityError:
    e = IntegrityError(message)
    e.check = check  # what verify reports it as
    return e


class VerifiedObject:
    """The stored bytes of one backup object, each piece yielded only once its SHA-256 matched the manifest.

    ``bytes_read`` counts what was read from the repository (twice the object for a legacy manifest).
    """

    def __init__(self, storage: Storage, key: str, f: StoredFile):
        self.storage = storage
        self.key = key
        self.f = f
        self.bytes_read = 0

    def __iter__(self) -> Iterator[bytes]:
        if self.f.chunks:
            return self._checked(self.f.chunks, self.f.chunk_size)
        return self._legacy()

    def _legacy(self) -> Iterator[bytes]:
        log.warning("%s: the manifest holds no per-chunk digests (a backup by an older pgdr): reading it twice, "
                    "first to check its SHA-256, then to unpack it against digests taken on that first pass",
                    self.key)
        first = ChunkDigests()
        source = Prefetch(self.storage.get_stream(self.key))
        try:
            for data in source:
                first.update(data)
                self.bytes_read += len(data)
        finally:
            source.close()
        digests = first.finish()
        if first.size != self.f.stored_size or first.hexdigest != self.f.sha256:
            raise _failed("sha256", f"{self.key}: stored object does not match the manifest (size {first.size} vs "
                          f"{self.f.stored_size}, sha256 {first.hexdigest} vs {self.f.sha256}); nothing of it "
                          "was used")
        yield from self._checked(digests, first.chunk_size)

    def _check(self, piece: bytes, index: int, digests: list[str], chunk_size: int) -> bytes:
        start = index * chunk_size
        if index >= len(digests):
            raise _failed("sha256", f"{self.key}: holds more than the {self.f.stored_size} bytes the manifest "
                          f"lists (chunk {index}, from byte {start}, is extra): replaced or appended to; "
                          "nothing of that chunk was used")
        if hashlib.sha256(piece).hexdigest() != digests[index]:
            raise _failed("sha256", f"{self.key}: chunk {index} of {len(digests)} (stored bytes {start}.."
                          f"{start + len(piece)}) does not match its SHA-256 in the manifest: damaged or "
                          "replaced; nothing of that chunk was used")
        return piece

    def _checked(self, digests: list[str], chunk_size: int) -> Iterator[bytes]:
        # Digests of consecutive pieces at fixed offsets, their count and the total size prove the object as
        # well as one SHA-256 of the whole would: that one is not computed again (it was, on a legacy first pass).
        buf = bytearray()
        index = size = 0
        source = Prefetch(self.storage.get_stream(self.key))
        try:
            for data in source:
                self.bytes_read += len(data)
                size += len(data)
                buf += data
                while len(buf) >= chunk_size:
                    with memoryview(buf) as view:
                        piece = bytes(view[:chunk_size])
                    del buf[:chunk_size]
                    self._check(piece, index, digests, chunk_size)
                    index += 1
                    yield piece
            if buf:
                piece = self._check(bytes(buf), index, digests, chunk_size)
                buf.clear()
                index += 1
                yield piece
        finally:
            source.close()
        if index != len(digests) or size != self.f.stored_size:
            raise _failed("size", f"{self.key}: ends after {size} bytes ({index} of the {len(digests)} chunks the "
                          f"manifest lists; it says {self.f.stored_size} bytes): truncated")


def part_content(repo: Repository, manifest: BackupManifest, f: StoredFile, stored: VerifiedObject) -> Iterator[bytes]:
    """A part's tar bytes. Stages in step, each in its own thread: read and check | decrypt | decompress."""
    key = repo.key(manifest.label, f.name)
    fetched = Prefetch(stored, depth=4)
    body = Prefetch(_opened(fetched, repo, manifest, f, key)) if manifest.encryption else fetched
    unpacked = Prefetch(decompress_stream(body, manifest.compression, name=key))
    try:
        yield from unpacked
    finally:
        unpacked.close()
        if body is not fetched:
            body.close()
        fetched.close()


def _opened(chunks, repo: Repository, manifest: BackupManifest, f: StoredFile, key: str) -> Iterator[bytes]:
    from pgdr.crypto import KeyUnavailable

    try:
        yield from unseal(chunks, repo.storage.keyring, f"{manifest.label}/{f.name}", key)
    except KeyUnavailable:
        raise
    except PgdrError as e:
        if not hasattr(e, "check"):
            e.check = "decrypt"
        raise


def feed_parts(repo: Repository, manifest: BackupManifest, feed) -> int:
    """Every part's content, in order, each piece checked before ``feed`` sees it (a tar extractor, or an
    incremental's applier); each part's decompressed size checked too. Returns the bytes read."""
    read = 0
    for f in manifest.files:
        key = repo.key(manifest.label, f.name)
        stored = VerifiedObject(repo.storage, key, f)
        size = 0
        try:
            for chunk in part_content(repo, manifest, f, stored):
                size += len(chunk)
                feed(chunk)
        finally:
            read += stored.bytes_read
        if size != f.size:
            raise IntegrityError(f"{key}: decompressed to {size} bytes, the manifest says {f.size}")
        log.info("verified and unpacked %s (%.1f MB)", key, f.size / 1e6)
    return read


def unpack(repo: Repository, manifest: BackupManifest, target: Path) -> int:
    """Every part, checked, into ``target`` (which must exist). Returns the bytes read from the repository."""
    extractor = TarExtractor(target)
    try:
        read = feed_parts(repo, manifest, extractor.feed)
        extractor.close()
    except OSError as e:
        raise PgdrError(f"cannot write the restored files into {target}: {e}") from e
    finally:
        extractor.release()
    return read


def require_key(repo: Repository, manifest: BackupManifest) -> None:
    """Before anything is written: the keyring must open this backup's data key (names the key id if not)."""
    if not manifest.encryption:
        if repo.storage.encrypt and not repo.storage.accept_unencrypted:
            raise IntegrityError(
                f"backup {manifest.label} is not encrypted, but this repository's configuration requires "
                "encryption: refusing it (a manifest rewritten to drop encryption looks exactly like this). "
                "For backups taken before encryption was turned on, set encryption.accept_unencrypted: true")
        return
    if not manifest.files:
        return
    key = repo.key(manifest.label, manifest.files[0].name)
    stream = repo.storage.get_stream(key, chunk_size=4096)
    try:
        head = next(stream, b"")
    finally:
        stream.close()
    check_key(head, repo.storage.keyring, f"backup {manifest.label} ({key})")


def pg_verifybackup(bins, target: Path, pg_major: int, checksums: bool, parse_wal: bool = True) -> str:
    """PostgreSQL's own check of the restored directory against its backup_manifest.

    By default every file must exist with its manifest size and the WAL must
    parse; file checksums are skipped because the SHA-256 of every stored
    object, and the codec's checksum of its content, already proved the bytes.
    ``checksums=True`` re-reads every file and checks its CRC too.
    """
    if not (target / "backup_manifest").exists():
        return "skipped: no backup_manifest in the backup"
    same_version = bins.major == pg_major
    cmd = [bins.tool("pg_verifybackup"), "-q"] + ([] if same_version and parse_wal else ["--no-parse-wal"])
    cmd += [] if checksums else ["--skip-checksums"]
    cmd.append(str(target))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise IntegrityError("pg_verifybackup rejected the restored data directory: " + "; ".join(detail[:10]))
    what = "files, sizes, checksums" if checksums else "files, sizes"
    if not parse_wal:
        what += "; WAL comes from the archive at recovery"
    else:
        what += ", WAL" if same_version else f"; WAL not parsed by PostgreSQL {bins.major} tools"
    return f"ok ({what})"
