"""Byte plumbing shared by backup and restore: hashing, counting, pumping."""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import IO, Iterable, Iterator

CHUNK = 1024 * 1024
VERIFY_CHUNK = 4 << 20  # stored bytes per recorded SHA-256: each is checked before any of it is used


class Digest:
    """Counts and SHA-256-hashes whatever passes through it."""

    def __init__(self):
        self.sha = hashlib.sha256()
        self.size = 0

    def tap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.sha.update(chunk)
            self.size += len(chunk)
            yield chunk

    @property
    def hexdigest(self) -> str:
        return self.sha.hexdigest()


class ChunkDigests:
    """SHA-256 of each ``chunk_size`` bytes of a stream (the last piece shorter, an empty stream none),
    and of the whole, of whatever passes through it: recorded at backup, re-checked piece by piece at
    restore before a byte of a piece is decompressed, decrypted or unpacked."""

    def __init__(self, chunk_size: int = VERIFY_CHUNK):
        self.chunk_size = chunk_size
        self.digests: list[str] = []
        self.sha = hashlib.sha256()
        self.size = 0
        self._piece = hashlib.sha256()
        self._fill = 0

    def update(self, data) -> None:
        mv = memoryview(data)
        self.sha.update(mv)
        self.size += len(mv)
        while len(mv):
            take = min(self.chunk_size - self._fill, len(mv))
            self._piece.update(mv[:take])
            self._fill += take
            mv = mv[take:]
            if self._fill == self.chunk_size:
                self.digests.append(self._piece.hexdigest())
                self._piece, self._fill = hashlib.sha256(), 0

    def tap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.update(chunk)
            yield chunk

    def finish(self) -> list[str]:
        if self._fill:
            self.digests.append(self._piece.hexdigest())
            self._piece, self._fill = hashlib.sha256(), 0
        return self.digests

    @property
    def hexdigest(self) -> str:
        return self.sha.hexdigest()


class Prefetch:
    """Iterates ``source`` in a background thread, up to ``depth`` items ahead.

    Reading (and hashing, which releases the GIL) then overlaps with whatever
    the consumer does: compressing, decompressing, writing to a pipe. Memory
    stays bounded by ``depth`` chunks. Errors in the source reach the consumer.
    """

    _END = object()

    def __init__(self, source: Iterable[bytes], depth: int = 8):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(iter(source),), name="pgdr-prefetch", daemon=True)
        self._thread.start()

    def _run(self, it):
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer
            self._put(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # a generator abandoned by the consumer runs its cleanup now, not whenever it is collected

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        item = self._q.get()
        if item is self._END:
            self._done = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self):
        self._stop.set()


class ChunkReader:
    """``read(limit)`` over an iterator of chunks: at most ``limit`` bytes, b"" at the end."""

    def __init__(self, chunks: Iterable[bytes]):
        self._it = iter(chunks)
        self._left = b""
        self._off = 0

    def read(self, limit: int) -> bytes:
        while self._off >= len(self._left):
            nxt = next(self._it, None)
            if nxt is None:
                return b""
            self._left, self._off = nxt, 0
        if self._off == 0 and len(self._left) <= limit:
            out, self._left = self._left, b""
            return out
        out = self._left[self._off:self._off + limit]  # one copy of what is returned, never of the rest
        self._off += len(out)
        return out


def read_pipe(pipe: IO[bytes], chunk: int = CHUNK) -> Iterator[bytes]:
    while True:
        data = pipe.read(chunk)
        if not data:
            return
        yield data
