"""A repository in a local or mounted directory."""

from __future__ import annotations

import errno
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from pgdr.errors import ObjectNotFound, RepositoryError
from pgdr.storage.base import CHUNK, ObjectInfo, Storage

TMP_MARK = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path, root: Path) -> None:
    """Create path and its missing parents, each made durable: a new directory's entry lives in its
    parent, so every parent of a directory we create is fsynced, up to and including the root's."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p == root or p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        fsync_dir(d)
        fsync_dir(d.parent)


class FileStorage(Storage):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise RepositoryError(f"invalid object key {key!r}")
        return self.root / key

    def _error(self, action: str, key: str, e: OSError) -> RepositoryError:
        return RepositoryError(f"cannot {action} {self.url}/{key}: {e.strerror or e}")

    def _create(self, tmp: Path):
        """Open a new temporary file, creating (durably) the directories it needs. A concurrent delete
        tidies empty directories away; if it takes ours between mkdir and open, make them again."""
        for attempt in range(5):
            try:
                make_dirs(tmp.parent, self.root)
                return open(tmp, "wb")
            except FileNotFoundError:
                if attempt == 4:
                    raise

    def put_stream(self, key: str, chunks: Iterable[bytes], *, lock: bool = False) -> int:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
        written = 0
        try:
            with self._create(tmp) as f:
                for chunk in chunks:
                    f.write(chunk)
                    written += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as e:
            _discard(tmp)
            raise self._error("write", key, e) from e
        except BaseException:
            _discard(tmp)
            raise
        return written

    def make_durable(self, key: str) -> None:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(path.parent)
        except OSError as e:
            raise self._error("sync", key, e) from e

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            with self._create(tmp) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, fails if path exists
            except FileExistsError:
                return False
            fsync_dir(path.parent)
            return True
        except OSError as e:
            raise self._error("write", key, e) from e
        finally:
            _discard(tmp)

    def get_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}/{key} does not exist") from None
        except OSError as e:
            raise self._error("read", key, e) from e
        with f:
            while True:
                try:
                    chunk = f.read(chunk_size)
                except OSError as e:
                    raise self._error("read", key, e) from e
                if not chunk:
                    return
                yield chunk

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if prefix.startswith("/") or ".." in prefix.split("/"):  # as for a key: nothing outside the root
            raise RepositoryError(f"invalid object key prefix {prefix!r}")
        head, _, tail = prefix.rpartition("/")
        base = self.root / head if head else self.root
        out = []

        def add(dirpath: str, name: str) -> None:
            if TMP_MARK in name and name.startswith("."):
                return
            full = Path(dirpath) / name
            key = full.relative_to(self.root).as_posix()
            if not key.startswith(prefix):
                return
            try:
                st = full.stat()
            except FileNotFoundError:
                return
            out.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc)))

        def walk(top) -> None:
            for dirpath, dirnames, filenames in os.walk(top, onerror=_raise):
                dirnames.sort()
                for name in filenames:
                    add(dirpath, name)

        try:
            # A directory or file deleted while we walk (expiry, a lock's clean-up) is skipped; any other
            # error fails the listing, never an empty one.
            if not tail:
                walk(base)
            else:
                # Only the entries of ``base`` named ``tail…`` can hold such keys: the rest of a large directory
                # (a timeline's WAL, tens of thousands of segments, where each push and fetch looks up one
                # name) is passed over by name alone, with no path built or file looked at.
                try:
                    with os.scandir(base) as entries:
                        matching = [(e.name, *_kind(e)) for e in entries if e.name.startswith(tail)]
                except FileNotFoundError:
                    matching = []
                for name, is_dir, is_link in sorted(matching):
                    if not is_dir:
                        add(str(base), name)
                    elif not is_link:
                        walk(base / name)
        except OSError as e:
            raise self._error("list", prefix, e) from e
        return sorted(out, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            raise self._error("delete", key, e) from e
        # Tidy empty directories up to the root so listings stay clean.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    break
                raise self._error("delete", key, e) from e
            parent = parent.parent


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _kind(entry: os.DirEntry) -> tuple[bool, bool]:
    """(a directory, a link) as os.walk classifies an entry: an entry it cannot tell (a link looping or through
    a file) is not a directory; a link to a directory is not entered."""
    try:
        is_dir = entry.is_dir()
    except OSError:
        is_dir = False
    try:
        is_link = entry.is_symlink()
    except OSError:
        is_link = False
    return is_dir, is_link


def _raise(e: OSError):
    if isinstance(e, FileNotFoundError):
        return
    raise e
