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


class PipeReader:
    """Reads a pipe in a background thread so the writer never waits on us.

    ``read(limit)`` returns at most ``limit`` bytes, b"" at end of stream.
    Up to ``depth`` chunks are buffered (bounded memory).
    """

    def __init__(self, pipe: IO[bytes], depth: int = 16, chunk: int = CHUNK):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._left = b""
        self._eof = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pipe, chunk), name="pgdr-pipe-reader", daemon=True)
        self._thread.start()

    def _run(self, pipe, chunk):
        try:
            while not self._stop.is_set():
                data = pipe.read(chunk)
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # handed to the consumer
            self._error = e
            self._put(b"")

    def _put(self, data):
        while not self._stop.is_set():
            try:
                self._q.put(data, timeout=0.5)
                return
            except queue.Full:
                continue

    def read(self, limit: int) -> bytes:
        if not self._left:
            if self._eof:
                return b""
            self._left = self._q.get()
            if not self._left:
                self._eof = True
                if self._error:
                    raise self._error
                return b""
        out, self._left = self._left[:limit], self._left[limit:]
        return out

    def close(self):
        self._stop.set()
