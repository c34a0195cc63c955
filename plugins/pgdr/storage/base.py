"""The storage contract every backend fulfils (tests/test_storage_contract.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Iterator

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime | None = None  # last write, as the store reports it (None: unknown)


@dataclass(frozen=True)
class Retention:
    """An object's Object Lock retention, as the store reports it."""

    mode: str | None
    until: datetime | None

    def active(self, now: datetime) -> bool:
        return self.until is not None and self.until > now


class Storage(ABC):
    """Keys are '/'-separated paths relative to the repository root.

    Writes are atomic: a reader sees the whole object or nothing, never a
    half-written one.
    """

    url: str
    # What this process may do with the repository's protected objects, set by open_storage:
    keyring = None  # pgdr.crypto.Keyring: master keys to open encrypted objects (never stored)
    encrypt = False  # seal new backup and WAL objects with keyring.current()
    accept_unencrypted = True  # with encrypt: also read objects written before encryption was on
    object_lock = None  # pgdr.config.ObjectLockConfig: retention put on immutable objects

    @abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes], *, lock: bool = False) -> int:
        """Store the concatenated chunks under key; return the byte count.

        ``lock``: the object is immutable repository content (a backup part,
        a manifest, a WAL segment, a report); where Object Lock is configured
        it is retained for ``object_lock.days`` from now.
        """

    def put_bytes(self, key: str, data: bytes, *, lock: bool = False) -> None:
        self.put_stream(key, [data], lock=lock)

    def make_durable(self, key: str) -> None:
        """Make sure an object found in a listing survives a crash of this host (a writer killed between its
        rename and its directory fsync leaves one that is listed but not yet durable). Stores whose writes
        are durable once visible (S3) have nothing to do."""

    def retention(self, key: str) -> Retention | None:
        """The object's lock, or None where the backend has no Object Lock."""
        return None

    def process_env(self) -> dict:
        """Environment a child pgdr process (a restored server's restore_command) needs to reach this
        repository the way this process does, beyond what the config file says."""
        return {}

    def lock_enabled(self) -> bool:
        """Whether the store can hold Object Lock retention at all."""
        return False

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create key only if it does not exist; False when it already did."""

    @abstractmethod
    def get_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Yield the object's bytes; raise ObjectNotFound when it is missing."""

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.get_stream(key))

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with prefix, sorted by key.

        An object deleted while the listing runs is either listed or skipped;
        it never makes the listing fail or come back empty.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove key; removing a missing key is not an error."""

    def exists(self, key: str) -> bool:
        return any(o.key == key for o in self.list(key))

    def describe(self) -> str:
        return self.url
