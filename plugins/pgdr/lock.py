"""The per-cluster lock: one backup of a cluster at a time, across hosts.

The lock is an object in the repository, created only if absent (O_EXCL on a
file repository, ``If-None-Match: *`` on S3). It names its holder (host, pid)
and is refreshed by a heartbeat. A lock is stale, and is taken over, when its
holder ran on this host and that process is gone, or when its heartbeat is
older than ``STALE_AFTER``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from datetime import timedelta

from pgdr.errors import LockedError, ObjectNotFound, RepositoryError
from pgdr.results import iso, parse_iso, utcnow

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 60
STALE_AFTER = timedelta(minutes=15)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ClusterLock:
    def __init__(self, storage, key: str, purpose: str):
        self.storage = storage
        self.key = key
        self.purpose = purpose
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = iso(utcnow())
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "purpose": self.purpose, "acquired_at": getattr(self, "_acquired", now),
                           "heartbeat_at": now}).encode()

    def _read(self) -> dict | None:
        try:
            return json.loads(self.storage.get_bytes(self.key))
        except ObjectNotFound:
            return None
        except ValueError:
            return {"token": None, "heartbeat_at": None, "unreadable": True}

    @staticmethod
    def stale_reason(holder: dict) -> str | None:
        if holder.get("unreadable"):
            return "lock record is unreadable"
        if holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", 0))):
            return f"process {holder.get('pid')} on {holder.get('host')} is gone"
        try:
            beat = parse_iso(holder["heartbeat_at"])
        except (KeyError, TypeError, ValueError):
            return "lock record has no heartbeat"
        if utcnow() - beat > STALE_AFTER:
            return f"no heartbeat since {holder['heartbeat_at']}"
        return None

    def acquire(self) -> "ClusterLock":
        self._acquired = iso(utcnow())
        if not self.storage.put_if_absent(self.key, self._record()):
            holder = self._read() or {}
            reason = self.stale_reason(holder) if holder else "it vanished"
            if reason is None:
                raise LockedError(
                    f"another pgdr process holds {self.key} ({holder.get('purpose')}, pid {holder.get('pid')} "
                    f"on {holder.get('host')}, since {holder.get('acquired_at')}); try again when it finishes")
            # Take over only the very lock we judged stale.
            current = self._read()
            if current is not None and current.get("token") == holder.get("token"):
                log.warning("taking over stale lock %s: %s", self.key, reason)
                self.storage.delete(self.key)
            if not self.storage.put_if_absent(self.key, self._record()):
                raise LockedError(f"another pgdr process took {self.key} first")
        self._thread = threading.Thread(target=self._heartbeat, name="pgdr-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                current = self._read()
                if current is None or current.get("token") != self.token:
                    log.error("lock %s was taken from us; the running operation will fail at commit", self.key)
                    return
                self.storage.put_bytes(self.key, self._record())
            except RepositoryError as e:
                log.warning("lock heartbeat failed (will retry): %s", e)

    def held(self) -> bool:
        current = self._read()
        return current is not None and current.get("token") == self.token

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.held():
            self.storage.delete(self.key)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
