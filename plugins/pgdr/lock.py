"""The per-cluster lock: one writer of a cluster's backups at a time, across hosts.

The lock is a sequence of small records, one object per generation,
``<cluster>/lock/<generation>.json``; the newest generation says who holds it
(or that it was released). Every change — taking the lock, a heartbeat,
taking over a stale lock, releasing it — is the creation of the NEXT
generation with a create-only-if-absent write (``If-None-Match: *`` on S3, a
hard link on a file repository), so it is atomic: of two processes that both
judged generation N stale, exactly one creates N+1; a holder whose heartbeat
finds N+1 already written has been taken over and knows it at once. Old
generations are deleted as new ones are written.

A lock is stale, and may be taken over, when its holder ran on this host and
that process is gone, or when its heartbeat is older than ``STALE_AFTER``.
A holder that loses its lock — taken over, or unable to renew it for half of
``STALE_AFTER`` — sets ``lost`` and must stop at once and commit nothing
(the backup kills pg_basebackup). Before a commit the holder renews the lock:
a successful renewal means nobody can take it over for ``STALE_AFTER``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from datetime import timedelta

from pgdr.errors import LockedError, ObjectNotFound, RepositoryError
from pgdr.results import iso, parse_iso, utcnow

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 60
STALE_AFTER = timedelta(minutes=15)
_GEN = re.compile(r"(\d{20})\.json$")


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a stopped postmaster whose parent never reaps it still answers kill 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True  # no /proc to ask: kill 0 said it exists
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


class ClusterLock:
    """``key`` names the lock (``<cluster>/lock.json``); its generations live under ``<cluster>/lock/``."""

    def __init__(self, storage, key: str, purpose: str):
        self.storage = storage
        self.key = key
        self.prefix = (key[:-len(".json")] if key.endswith(".json") else key) + "/"
        self.purpose = purpose
        self.token = uuid.uuid4().hex
        self.generation: int | None = None
        self.lost = threading.Event()  # set the moment this holder knows it no longer holds the lock
        self.lost_reason: str | None = None
        self._acquired = iso(utcnow())
        self._last_renewal = 0.0
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # records
    def _gen_key(self, gen: int) -> str:
        return f"{self.prefix}{gen:020d}.json"

    def _record(self, released: bool = False) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "purpose": self.purpose, "acquired_at": self._acquired, "heartbeat_at": iso(utcnow()),
                           "released": released}).encode()

    def _generations(self) -> list[int]:
        gens = []
        for obj in self.storage.list(self.prefix):
            m = _GEN.search(obj.key)
            if m and obj.key == self._gen_key(int(m.group(1))):
                gens.append(int(m.group(1)))
        return sorted(gens)

    def _read(self, key: str) -> dict:
        data = self.storage.get_bytes(key)
        try:
            rec = json.loads(data)
            return rec if isinstance(rec, dict) else {"unreadable": True}
        except ValueError:
            return {"unreadable": True}

    def current(self) -> tuple[int, dict | None]:
        """(newest generation, its record); (0, None) when the lock was never taken."""
        for _ in range(10):
            gens = self._generations()
            if not gens:
                return 0, None
            try:
                return gens[-1], self._read(self._gen_key(gens[-1]))
            except ObjectNotFound:
                continue  # deleted by the holder's clean-up between listing and reading: look again
        raise RepositoryError(f"the lock records under {self.prefix} keep changing under us; try again")

    @staticmethod
    def stale_reason(holder: dict) -> str | None:
        if holder.get("unreadable"):
            return "lock record is unreadable"
        if holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid") or 0)):
            return f"process {holder.get('pid')} on {holder.get('host')} is gone"
        try:
            beat = parse_iso(holder["heartbeat_at"])
        except (KeyError, TypeError, ValueError):
            return "lock record has no heartbeat"
        if utcnow() - beat > STALE_AFTER:
            return f"no heartbeat since {holder['heartbeat_at']}"
        return None

    def _refuse(self, holder: dict) -> LockedError:
        return LockedError(
            f"another pgdr process holds {self.key} ({holder.get('purpose')}, pid {holder.get('pid')} "
            f"on {holder.get('host')}, since {holder.get('acquired_at')}); try again when it finishes")

    def _create(self, gen: int, released: bool = False) -> bool:
        """Write generation ``gen`` if nobody has; True when it is ours (also after a retried write)."""
        if self.storage.put_if_absent(self._gen_key(gen), self._record(released)):
            return True
        try:  # a retried request may have found its own first attempt: that is still ours
            return self._read(self._gen_key(gen)).get("token") == self.token
        except ObjectNotFound:
            return False

    def _legacy_check(self) -> None:
        """A lock written by an older pgdr as one object at ``key``: respected while fresh."""
        try:
            holder = self._read(self.key)
        except ObjectNotFound:
            return
        reason = self.stale_reason(holder)
        if reason is None:
            raise self._refuse(holder)
        log.warning("removing stale lock %s: %s", self.key, reason)
        self.storage.delete(self.key)

    def _clean(self, keep_from: int) -> None:
        try:
            for gen in self._generations():
                if gen < keep_from:
                    self.storage.delete(self._gen_key(gen))
        except RepositoryError as e:
            log.warning("could not tidy old lock records under %s (harmless): %s", self.prefix, e)

    # taking, keeping, giving back
    def acquire(self) -> "ClusterLock":
        self._legacy_check()
        for _ in range(5):
            gen, holder = self.current()
            if holder is not None and not holder.get("released"):
                reason = self.stale_reason(holder)
                if reason is None:
                    raise self._refuse(holder)
                log.warning("taking over stale lock %s (generation %d): %s", self.key, gen, reason)
            if self._create(gen + 1):
                self.generation = gen + 1
                break
            # Somebody else wrote generation gen+1 first (took it, renewed it or released it): look again.
        else:
            raise LockedError(f"another pgdr process took {self.key} first")
        self._last_renewal = time.monotonic()
        self._clean(self.generation)
        self._thread = threading.Thread(target=self._heartbeat, name="pgdr-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _lose(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
            log.error("lost lock %s: %s; stopping the running operation, committing nothing", self.key, reason)

    def renew(self) -> None:
        """Write the next generation; raise LockedError if the lock is no longer ours.

        After it returns, nobody can take the lock over for ``STALE_AFTER``: call it right before a commit."""
        with self._mutex:
            if self.generation is None:
                raise LockedError(f"{self.key} is not held")
            if not self.lost.is_set():
                if self._create(self.generation + 1):
                    self.generation += 1
                    self._last_renewal = time.monotonic()
                    self._clean(self.generation)
                    return
                _, holder = self.current()
                self._lose(f"taken over by {holder.get('purpose') if holder else '?'} "
                           f"(pid {holder.get('pid') if holder else '?'} on {holder.get('host') if holder else '?'})")
            raise LockedError(f"lost {self.key}: {self.lost_reason}")

    def _heartbeat(self):
        interval = HEARTBEAT_SECONDS
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LockedError:
                return
            except RepositoryError as e:
                silent = time.monotonic() - self._last_renewal
                if silent > STALE_AFTER.total_seconds() / 2:
                    # Others may judge us stale soon: stop before they can take over.
                    self._lose(f"could not renew it for {silent:.0f} s ({e})")
                    return
                log.warning("lock heartbeat failed (will retry): %s", e)

    def held(self) -> bool:
        if self.lost.is_set() or self.generation is None:
            return False
        _, holder = self.current()
        return holder is not None and holder.get("token") == self.token and not holder.get("released")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        with self._mutex:
            if self.generation is None or self.lost.is_set():
                return
            try:
                if self._create(self.generation + 1, released=True):
                    self.generation += 1
                    self._clean(self.generation)
            except RepositoryError as e:
                log.warning("could not release %s (it goes stale on its own): %s", self.key, e)
            self.generation = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
