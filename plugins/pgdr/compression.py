"""Streaming compression codecs: zstd (default), lz4, gzip and none.

Each codec turns an iterator of chunks into an iterator of chunks, so nothing
ever holds a whole file in memory.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Iterator

from pgdr.errors import IntegrityError, PgdrError, UsageError

SUFFIX = {"zstd": ".zst", "lz4": ".lz4", "gzip": ".gz", "none": ""}


ZSTD_MAX_THREADS = 4
ZSTD_JOB_SIZE = 2 << 20
ZSTD_NO_OVERLAP = 1  # zstd's overlapLog: 0 is the level's default, 1 none, 9 a whole window


def _zstd_compressor(level: int):
    import os

    import zstandard

    # One worker per core (at most 4), each on 2 MiB jobs: as fast as the
    # default job size and a tenth of the memory. Output is one frame.
    # Jobs do not re-read the end of the previous job as history
    # (overlap_log 1): measured on a 2.6 GB pgbench cluster at level 3, that
    # saved 5% of the CPU and the output was 0.5% smaller, not larger (levels
    # 1 to 12 alike on a 150 MB slice).
    threads = min(os.cpu_count() or 1, ZSTD_MAX_THREADS)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=threads if threads > 1 else 0, job_size=ZSTD_JOB_SIZE if threads > 1 else 0,
        overlap_log=ZSTD_NO_OVERLAP if threads > 1 else 0, write_checksum=True)
    return zstandard.ZstdCompressor(compression_params=params).compressobj()


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


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

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


def compress_stream(chunks: Iterable[bytes], kind: str, level: int) -> Iterator[bytes]:
    c = compressor(kind, level)
    for chunk in chunks:
        out = c.compress(chunk)
        if out:
            yield out
    tail = c.flush()
    if tail:
        yield tail


def decompress_stream(chunks: Iterable[bytes], kind: str, name: str = "object",
                      out_size: int = 1 << 20) -> Iterator[bytes]:
    """Decompress, yielding pieces of at most ``out_size`` bytes.

    Bounded output matters: a megabyte of compressed zero pages can expand a
    thousandfold, and memory must not grow with the compression ratio.
    """
    try:
        if kind == "zstd":
            import zstandard

            from pgdr.streams import ChunkReader

            yield from zstandard.ZstdDecompressor().read_to_iter(ChunkReader(chunks), read_size=out_size,
                                                                 write_size=out_size)
        elif kind == "lz4":
            import lz4.frame

            d = lz4.frame.LZ4FrameDecompressor()
            for chunk in chunks:
                out = d.decompress(chunk, max_length=out_size)
                while True:
                    if out:
                        yield out
                    if d.needs_input or d.eof:
                        break
                    out = d.decompress(b"", max_length=out_size)
            if not d.eof:
                raise IntegrityError(f"{name}: lz4 stream ends early")
        elif kind == "gzip":
            d = zlib.decompressobj(31)
            for chunk in chunks:
                data = chunk
                while data:
                    out = d.decompress(data, out_size)
                    if out:
                        yield out
                    data = d.unconsumed_tail
            tail = d.flush()
            if tail:
                yield tail
            if not d.eof:
                raise IntegrityError(f"{name}: gzip stream ends early")
        elif kind == "none":
            for chunk in chunks:
                for i in range(0, len(chunk), out_size):
                    yield chunk[i:i + out_size]
        else:
            raise UsageError(f"unknown compression {kind!r}")
    except PgdrError:
        raise
    except Exception as e:  # each codec has its own error type; all mean the same thing here
        raise IntegrityError(f"{name}: cannot decompress ({kind}): {e}") from e
