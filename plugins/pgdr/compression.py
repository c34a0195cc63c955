"""Streaming compression codecs: zstd (default), lz4, gzip and none.

Each codec turns an iterator of chunks into an iterator of chunks, so nothing
ever holds a whole file in memory.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Iterator

from pgdr.errors import IntegrityError, UsageError

SUFFIX = {"zstd": ".zst", "lz4": ".lz4", "gzip": ".gz", "none": ""}


def _zstd_compressor(level: int):
    import zstandard

    # threads=-1: one worker per core; output is still a single frame.
    return zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True).compressobj()


def _zstd_decompressor():
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


class _Lz4Compressor:
    def __init__(self, level: int):
        import lz4.frame

        self._c = lz4.frame.LZ4FrameCompressor(compression_level=level, content_checksum=True)
        self._started = False

    def compress(self, data: bytes) -> bytes:
        head = b"" if self._started else self._c.begin()
        self._started = True
        return head + self._c.compress(data)

    def flush(self) -> bytes:
        head = b"" if self._started else self._c.begin()
        self._started = True
        return head + self._c.flush()


class _Lz4Decompressor:
    def __init__(self):
        import lz4.frame

        self._d = lz4.frame.LZ4FrameDecompressor()

    def decompress(self, data: bytes) -> bytes:
        return self._d.decompress(data)


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    decompress = compress

    def flush(self) -> bytes:
        return b""


def compressor(kind: str, level: int):
    if kind == "zstd":
        return _zstd_compressor(level)
    if kind == "lz4":
        return _Lz4Compressor(level)
    if kind == "gzip":
        return zlib.compressobj(level, zlib.DEFLATED, 31)
    if kind == "none":
        return _Identity()
    raise UsageError(f"unknown compression {kind!r}")


def decompressor(kind: str):
    if kind == "zstd":
        return _zstd_decompressor()
    if kind == "lz4":
        return _Lz4Decompressor()
    if kind == "gzip":
        return zlib.decompressobj(31)
    if kind == "none":
        return _Identity()
    raise UsageError(f"unknown compression {kind!r}")


def compress_stream(chunks: Iterable[bytes], kind: str, level: int) -> Iterator[bytes]:
    c = compressor(kind, level)
    for chunk in chunks:
        out = c.compress(chunk)
        if out:
            yield out
    tail = c.flush()
    if tail:
        yield tail


def decompress_stream(chunks: Iterable[bytes], kind: str, name: str = "object") -> Iterator[bytes]:
    d = decompressor(kind)
    try:
        for chunk in chunks:
            out = d.decompress(chunk)
            if out:
                yield out
        flush = getattr(d, "flush", None)
        if flush:
            tail = flush()
            if tail:
                yield tail
    except IntegrityError:
        raise
    except Exception as e:  # each codec has its own error type; all mean the same thing here
        raise IntegrityError(f"{name}: cannot decompress ({kind}): {e}") from e
