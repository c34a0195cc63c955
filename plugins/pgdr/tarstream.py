"""Tar streams, read as they flow by.

pg_basebackup writes one tar stream. On the way into the repository
``TarWatcher`` counts its members and keeps the small ones we need
(``backup_manifest``); on the way out ``TarExtractor`` writes it into the
target directory directly (one copy, no tar process, no pipe), refusing any
member that would land outside it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pgdr.errors import IntegrityError

BLOCK = 512


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        n = 0
        for b in field[1:]:
            n = (n << 8) | b
        return n
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


class TarParser:
    """Incremental ustar/GNU/pax parser: feed() bytes, get member callbacks."""

    def __init__(self):
        self.members = 0
        self._header = bytearray()
        self._remaining = 0  # payload + padding still to come
        self._payload_left = 0
        self._meta: bytearray | None = None
        self._meta_type = b""
        self._long_name: str | None = None
        self._pax_name: str | None = None
        self._long_link: str | None = None

    # hooks
    def member(self, name: str, kind: bytes, size: int, mode: int, linkname: str) -> None: ...

    def data(self, chunk: memoryview) -> None: ...

    def member_end(self) -> None: ...

    def feed(self, data) -> None:
        mv = memoryview(data)
        pos, n = 0, len(mv)
        while pos < n:
            if self._remaining:
                take = min(self._remaining, n - pos)
                payload = min(take, self._payload_left)
                if payload:
                    piece = mv[pos:pos + payload]
                    if self._meta is not None:
                        self._meta += piece
                    else:
                        self.data(piece)
                    self._payload_left -= payload
                self._remaining -= take
                pos += take
                if not self._remaining:
                    self._end()
                continue
            need = BLOCK - len(self._header)
            self._header += mv[pos:pos + need]
            pos += min(need, n - pos)
            if len(self._header) == BLOCK:
                self._start(bytes(self._header))
                self._header.clear()

    def _start(self, h: bytes) -> None:
        if h == b"\0" * BLOCK:
            return  # end-of-archive blocks
        name = _text(h[0:100])
        if h[257:262] == b"ustar" and _text(h[345:500]):
            name = f"{_text(h[345:500])}/{name}"
        size = _octal(h[124:136])
        kind = h[156:157]
        self._payload_left = size
        self._remaining = (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in (b"L", b"K", b"x", b"g"):
            self._meta = bytearray()
            self._meta_type = kind
        else:
            self._meta = None
            name = self._pax_name or self._long_name or name
            linkname = self._long_link or _text(h[157:257])
            self._pax_name = self._long_name = self._long_link = None
            self.members += 1
            self.member(name.removeprefix("./"), kind, size, _octal(h[100:108]) & 0o7777, linkname)
        if not self._remaining:
            self._end()

    def _end(self) -> None:
        if self._meta is None:
            self.member_end()
            return
        meta, self._meta = bytes(self._meta), None
        if self._meta_type == b"L":
            self._long_name = _text(meta)
        elif self._meta_type == b"K":
            self._long_link = _text(meta)
        elif self._meta_type == b"x":
            for rec in meta.decode("utf-8", "surrogateescape").split("\n"):
                _, _, kv = rec.partition(" ")
                if kv.startswith("path="):
                    self._pax_name = kv[len("path="):]
                elif kv.startswith("linkpath="):
                    self._long_link = kv[len("linkpath="):]


class TarWatcher(TarParser):
    """Counts members and captures small named ones, touching nothing."""

    def __init__(self, capture: tuple[str, ...] = ("backup_manifest", "backup_label"), limit: int = 64 << 20):
        super().__init__()
        self.capture = set(capture)
        self.limit = limit
        self.captured: dict[str, bytes] = {}
        self._current: bytearray | None = None
        self._name = ""

    def member(self, name, kind, size, mode, linkname):
        self._name = name
        self._current = bytearray() if name in self.capture and size <= self.limit else None

    def data(self, chunk):
        if self._current is not None:
            self._current += chunk

    def member_end(self):
        if self._current is not None:
            self.captured[self._name] = bytes(self._current)
            self._current = None


class TarExtractor(TarParser):
    """Writes regular files, directories and symlinks under ``root``; nothing outside it."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = Path(root)
        self.bytes_written = 0
        self._fd: int | None = None
        self._dirs: set[str] = set()

    def _path(self, name: str) -> str:
        parts = name.strip("/").split("/") if name.strip("/") else []
        if name.startswith("/") or ".." in parts or not parts:
            raise IntegrityError(f"tar member {name!r} would land outside the target directory; refusing")
        return os.path.join(self.root, *parts)

    def _parent(self, path: str) -> None:
        parent = os.path.dirname(path)
        if parent not in self._dirs:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            self._dirs.add(parent)

    def member(self, name, kind, size, mode, linkname):
        path = self._path(name)
        self._parent(path)
        if kind in (b"0", b"\0", b"7"):
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode or 0o600)
        elif kind == b"5":
            os.makedirs(path, mode=mode or 0o700, exist_ok=True)
            os.chmod(path, mode or 0o700)
            self._dirs.add(path)
        elif kind == b"2":
            os.symlink(linkname, path)
        else:
            raise IntegrityError(f"tar member {name!r} has type {kind!r}, which a base backup never holds")

    def data(self, chunk):
        if self._fd is not None:
            while chunk:
                written = os.write(self._fd, chunk)
                self.bytes_written += written
                chunk = chunk[written:]

    def member_end(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        if self._header or self._remaining:
            raise IntegrityError("the backup's tar stream ends in the middle of a member")
        self.member_end()
