"""Tar streams, read as they flow by.

pg_basebackup writes one tar stream. On the way into the repository
``TarWatcher`` counts its members and keeps the small ones we need
(``backup_manifest``); on the way out ``TarExtractor`` writes it into the
target directory directly (one copy, no tar process, no pipe), refusing any
member that would land outside it, write through a link, or be anything but a
regular file or a directory.
"""

from __future__ import annotations

import errno
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


SPOOL_IN_MEMORY = 8 << 20  # a spooled member past this goes to a temporary file


class TarWatcher(TarParser):
    """Counts members and spools the named ones whatever their size (``spooled``: a file at its start;
    backup_manifest is tens of MB for a cluster of hundreds of thousands of files), touching nothing."""

    def __init__(self, spool: tuple[str, ...] = ("backup_manifest",)):
        super().__init__()
        self.spool = set(spool)
        self.spooled: dict = {}
        self._spool = None
        self._name = ""

    def member(self, name, kind, size, mode, linkname):
        import tempfile

        self._name = name
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) if name in self.spool else None

    def data(self, chunk):
        if self._spool is not None:
            self._spool.write(chunk)

    def member_end(self):
        if self._spool is not None:
            earlier = self.spooled.pop(self._name, None)
            if earlier is not None:
                earlier.close()
            self._spool.seek(0)
            self.spooled[self._name] = self._spool
            self._spool = None

    def close(self) -> None:
        """Release the spooled members (their temporary files)."""
        for f in self.spooled.values():
            f.close()
        self.spooled.clear()


KINDS = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
         b"6": "a FIFO"}
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse(name: str, why: str) -> IntegrityError:
    return IntegrityError(f"tar member {name!r} {why}; refusing it (the backup is damaged or was tampered with)")


def _mkdir_open(dir_fd: int, part: str, name: str, why: str) -> int:
    """A descriptor of directory ``part`` in ``dir_fd``, made if missing; never through a link: an existing
    link or file there refuses member ``name`` (``why``)."""
    try:
        os.mkdir(part, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    try:
        return os.open(part, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse(name, why) from None
        raise


def member_parts(name: str) -> list[str]:
    """The path components of a tar member, or IntegrityError: absolute, ``..``, ``.``, empty."""
    if name.startswith("/"):
        raise _refuse(name, "is an absolute path")
    parts = name.rstrip("/").split("/") if name.rstrip("/") else []
    if not parts:
        raise _refuse(name, "has an empty name")
    if any(p in ("", ".", "..") for p in parts):
        raise _refuse(name, "has an empty, '.' or '..' path component: it could land outside the target")
    return parts


def check_kind(name: str, kind: bytes, linkname: str) -> None:
    """Only regular files and directories: a base backup holds nothing else that we restore (pg_basebackup
    writes symlinks only for tablespaces in pg_tblspc, which pgdr refuses to back up)."""
    if kind in (b"0", b"\0", b"7", b"5"):
        return
    what = KINDS.get(kind)
    if what is None:
        raise _refuse(name, f"has type {kind!r}, which a base backup never holds")
    target = f" to {linkname!r}" if kind in (b"1", b"2") else ""
    raise _refuse(name, f"is {what}{target}, which a base backup restored by pgdr never holds")


class TarChecker(TarParser):
    """Applies the extractor's rules to every member without writing anything (verify --no-pg-verify)."""

    def __init__(self):
        super().__init__()
        self._seen: dict[str, bool] = {}  # path -> is a directory

    def member(self, name, kind, size, mode, linkname):
        parts = member_parts(name)
        check_kind(name, kind, linkname)
        path = "/".join(parts)
        for i in range(1, len(parts)):
            if self._seen.get("/".join(parts[:i])) is False:
                raise _refuse(name, f"lies under {'/'.join(parts[:i])!r}, which is not a directory")
        earlier = self._seen.get(path)
        if earlier is not None and not (earlier and kind == b"5"):
            raise _refuse(name, "names a path that an earlier member already created")
        self._seen[path] = kind == b"5"

    def close(self) -> None:
        if self._header or self._remaining:
            raise IntegrityError("the backup's tar stream ends in the middle of a member")


class TarExtractor(TarParser):
    """Writes regular files and directories under ``root``, nothing else and nowhere else.

    Every path is walked one component at a time from a descriptor of the root,
    each directory opened with O_NOFOLLOW, and every file created with
    O_CREAT|O_EXCL|O_NOFOLLOW: nothing is ever written through a symbolic
    link, whoever put it there, and no member replaces another. Links,
    devices, FIFOs, absolute paths and ``..`` are refused, naming the member.
    """

    def __init__(self, root: Path):
        super().__init__()
        self.root = Path(root)
        self.bytes_written = 0
        self._fd: int | None = None
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._parent: tuple[tuple[str, ...], int] | None = None  # the last parent directory opened

    def _open_dir(self, name: str, parts: list[str]) -> int:
        """A descriptor of the directory ``parts`` under the root, creating what is missing; never via a link."""
        key = tuple(parts)
        if self._parent is not None and self._parent[0] == key:
            return self._parent[1]
        fd = os.dup(self._root_fd)
        try:
            for i, part in enumerate(parts):
                nxt = _mkdir_open(fd, part, name, f"lies under {'/'.join(parts[:i + 1])!r}, which is not a "
                                  "directory (a symbolic link or a file): nothing is written through it")
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        self._forget_parent()
        self._parent = (key, fd)
        return fd

    def _forget_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def member(self, name, kind, size, mode, linkname):
        parts = member_parts(name)
        check_kind(name, kind, linkname)
        parent = self._open_dir(name, parts[:-1])
        leaf = parts[-1]
        if kind == b"5":
            fd = _mkdir_open(parent, leaf, name, "is a directory where an earlier member put a file or a link")
            try:
                os.fchmod(fd, (mode & 0o750) | 0o700)
            finally:
                os.close(fd)
            return
        try:
            self._fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                               (mode & 0o640) | 0o600 if mode else 0o600, dir_fd=parent)
        except FileExistsError:
            raise _refuse(name, "names a path that already exists (a directory, a link or an earlier member): "
                          "it would replace it") from None

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
        """The stream is complete: refuse one that ends inside a member; release every descriptor."""
        try:
            if self._header or self._remaining:
                raise IntegrityError("the backup's tar stream ends in the middle of a member")
        finally:
            self.release()

    def release(self) -> None:
        """Close every descriptor (also after a failure); idempotent."""
        self.member_end()
        self._forget_parent()
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None
