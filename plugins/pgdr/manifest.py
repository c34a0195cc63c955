"""The backup manifest: what a backup holds, written last as its commit point."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pgdr import __version__
from pgdr.errors import IntegrityError
from pgdr.results import JsonResult

FORMAT_VERSION = 1
MAX_CHUNK = 64 << 20  # a restore holds one chunk in memory before it is checked: bound what a manifest may ask


@dataclass
class StoredFile(JsonResult):
    """One object in the repository.

    ``sha256`` and ``stored_size`` are of the bytes as stored (compressed), so
    an object is checked before anything decompresses it; ``size`` is the
    decompressed length, whose content the codec's own checksum (zstd, lz4
    content checksum, gzip CRC) guards. ``chunks`` holds the SHA-256 of each
    ``chunk_size`` bytes as stored (the last piece shorter): a restore checks
    each piece before any of it is decrypted, decompressed or unpacked, so
    nothing unverified is ever used and nothing is read twice. Older manifests
    have no ``chunks``; those objects are read twice (checked
    whole, then unpacked against digests taken on the first pass).
    """

    name: str
    size: int
    stored_size: int
    sha256: str
    chunk_size: int = 0
    chunks: list[str] = field(default_factory=list)


@dataclass
class BackupManifest(JsonResult):
    cluster: str
    label: str
    type: str
    status: str
    pg_version: int
    pg_version_text: str
    system_identifier: str
    timeline: int
    start_lsn: str
    stop_lsn: str
    start_time: str
    stop_time: str
    compression: str
    compression_level: int
    files: list[StoredFile] = field(default_factory=list)
    pg_file_count: int = 0
    size: int = 0
    stored_size: int = 0
    wal_included: bool = True
    databases: list[str] = field(default_factory=list)
    encryption: dict | None = None  # {"cipher": "aes-256-gcm", "key_id": ...} when the parts are sealed
    format_version: int = FORMAT_VERSION
    tool: str = "pgdr"
    tool_version: str = __version__
    # In an encrypted repository: {"alg": "hmac-sha256", "key_id": ..., "mac": ...} over every other field
    # (pgdr.crypto.sign_record), so a rewritten checksum, size or file list is detected.
    auth: dict | None = None
    # Incremental backups (type "incr", PostgreSQL 17+): ``parent`` is the backup whose backup_manifest
    # pg_basebackup --incremental was given, ``full`` the full backup the chain starts at. A restore applies
    # full, then every incremental in order; each member's objects are checked like any backup's.
    parent: str | None = None
    full: str | None = None

    @property
    def pg_major(self) -> int:
        return self.pg_version // 10000

    @property
    def key_id(self) -> str | None:
        return (self.encryption or {}).get("key_id")

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: bytes | str, where: str = "manifest") -> "BackupManifest":
        try:
            data = json.loads(text)
            if data.get("format_version") != FORMAT_VERSION:
                raise IntegrityError(
                    f"{where}: format version {data.get('format_version')!r} is not one this pgdr "
                    f"({__version__}) reads ({FORMAT_VERSION})")
            data["files"] = [StoredFile(**f) for f in data.get("files", [])]
            for f in data["files"]:
                if f.chunks and not 0 < f.chunk_size <= MAX_CHUNK:
                    raise IntegrityError(f"{where}: {f.name} names an impossible chunk size {f.chunk_size}")
                if f.chunks and len(f.chunks) != -(-f.stored_size // f.chunk_size):
                    raise IntegrityError(f"{where}: {f.name} lists {len(f.chunks)} chunk digests of "
                                         f"{f.chunk_size} bytes for {f.stored_size} stored bytes")
            return cls.from_dict(data)
        except IntegrityError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError) as e:
            raise IntegrityError(f"{where}: unreadable manifest: {e}") from None
