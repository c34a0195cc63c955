"""Byte plumbing shared by backup and restore: hashing, counting, pumping."""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import IO, Iterable, Iterator

CHUNK = 1024 * 1024


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

    def read(self, limit: int) -> bytes:
        if not self._left:
            self._left = next(self._it, b"")
        out, self._left = self._left[:limit], self._left[limit:]
        return out


def read_pipe(pipe: IO[bytes], chunk: int = CHUNK) -> Iterator[bytes]:
    while True:
        data = pipe.read(chunk)
        if not data:
            return
        yield data
