"""Watching a tar stream go by without unpacking it.

pg_basebackup writes one tar stream; we count its members and pick out
small ones we need (``backup_manifest``, ``backup_label``) while the bytes
flow on to compression and storage.
"""

from __future__ import annotations

BLOCK = 512


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        n = 0
        for b in field[1:]:
            n = (n << 8) | b
        return n
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


class TarWatcher:
    def __init__(self, capture: tuple[str, ...] = ("backup_manifest", "backup_label"), limit: int = 64 << 20):
        self.capture = set(capture)
        self.limit = limit
        self.captured: dict[str, bytes] = {}
        self.members = 0
        self.bytes_seen = 0
        self._header = bytearray()
        self._remaining = 0  # payload + padding still to skip
        self._payload_left = 0
        self._current: bytearray | None = None
        self._current_name = ""
        self._long_name: str | None = None
        self._pax_name: str | None = None
        self._meta: bytearray | None = None
        self._meta_type = b""
        self.ended = False

    def feed(self, data: bytes) -> None:
        self.bytes_seen += len(data)
        mv = memoryview(data)
        pos, n = 0, len(mv)
        while pos < n and not self.ended:
            if self._remaining:
                take = min(self._remaining, n - pos)
                payload = min(take, self._payload_left)
                if payload:
                    if self._current is not None:
                        self._current += mv[pos:pos + payload]
                    elif self._meta is not None:
                        self._meta += mv[pos:pos + payload]
                    self._payload_left -= payload
                self._remaining -= take
                pos += take
                if not self._remaining:
                    self._finish_member()
                continue
            need = BLOCK - len(self._header)
            self._header += mv[pos:pos + need]
            pos += min(need, n - pos)
            if len(self._header) == BLOCK:
                self._start_member(bytes(self._header))
                self._header.clear()

    def _start_member(self, h: bytes) -> None:
        if h == b"\0" * BLOCK:
            return  # end-of-archive blocks
        name = h[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if h[257:262] == b"ustar" else ""
        if prefix:
            name = f"{prefix}/{name}"
        size = _octal(h[124:136])
        kind = h[156:157]
        self._payload_left = size
        self._remaining = (size + BLOCK - 1) // BLOCK * BLOCK
        self._current = None
        self._meta = None
        if kind in (b"L", b"x", b"g"):
            self._meta = bytearray()
            self._meta_type = kind
        else:
            name = self._pax_name or self._long_name or name
            self._pax_name = self._long_name = None
            self.members += 1
            self._current_name = name.removeprefix("./")
            if self._current_name in self.capture and size <= self.limit:
                self._current = bytearray()
        if not self._remaining:
            self._finish_member()

    def _finish_member(self) -> None:
        if self._meta is not None:
            if self._meta_type == b"L":
                self._long_name = bytes(self._meta).split(b"\0", 1)[0].decode("utf-8", "replace")
            elif self._meta_type == b"x":
                for rec in bytes(self._meta).decode("utf-8", "replace").split("\n"):
                    _, _, kv = rec.partition(" ")
                    if kv.startswith("path="):
                        self._pax_name = kv[len("path="):]
            self._meta = None
        if self._current is not None:
            self.captured[self._current_name] = bytes(self._current)
            self._current = None
