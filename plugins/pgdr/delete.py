"""Deleting one backup by hand (the API's DELETE), only where retention would allow it.

Refused, before anything is deleted: a pinned backup (``pgdr keep``), the newest backup that passed
verification, the last completed backup, and a backup any of whose objects is still under S3 Object Lock.
The cluster lock is held while deleting (a running backup or expire makes it wait: ``locked``); the manifest
goes last, so the backup stops existing in one step. WAL is left to ``pgdr expire``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from pgdr.errors import PgdrError
from pgdr.results import iso

log = logging.getLogger(__name__)


class DeleteRefused(PgdrError):
    """The retention policy keeps this backup."""

    kind = "delete_refused"


class ObjectLocked(PgdrError):
    """S3 Object Lock still retains objects of this backup."""

    kind = "object_lock"


def delete_backup(repo, label: str, now: datetime | None = None) -> dict:
    from pgdr.lock import ClusterLock
    from pgdr.repository import MANIFEST
    from pgdr.retention import pinned_until
    from pgdr.verify import last_verification

    now = now or datetime.now(timezone.utc)
    m = repo.resolve(label)  # BackupNotFound for an unknown or unfinished label
    pin = pinned_until(repo, m.label)
    if pin is not None and pin > now:
        raise DeleteRefused(f"backup {m.label} is pinned (pgdr keep) "
                            + ("indefinitely" if pin.year == 9999 else f"until {iso(pin)}")
                            + "; remove the pin first (pgdr unkeep)")
    done = repo.backups()
    if len(done) <= 1:
        raise DeleteRefused(f"backup {m.label} is the cluster's only completed backup")
    children = [b.label for b in done if b.parent == m.label]
    if children:  # an incremental needs every backup of its chain: delete the newest of a chain first
        raise DeleteRefused(f"backup {m.label} is the parent of incremental backup(s) {', '.join(children)}, "
                            "which cannot be restored without it; delete those first")
    verified = [b.label for b in done if (v := last_verification(repo, b.label)) and v.get("ok")]
    if verified and verified[-1] == m.label:
        raise DeleteRefused(f"backup {m.label} is the newest backup that passed verification; retention never "
                            "deletes it")
    objs = repo.storage.list(repo.backup_prefix(m.label))
    if repo.storage.object_lock is not None:
        wall = datetime.now(timezone.utc)
        held = [(o.key, r) for o in objs if (r := repo.storage.retention(o.key)) is not None and r.active(wall)]
        if held:
            until = max(r.until for _, r in held)
            raise ObjectLocked(f"backup {m.label}: {len(held)} of its objects are under S3 Object Lock until "
                               f"{iso(until)}; it can be deleted after that")
    with ClusterLock(repo.storage, repo.lock_key, f"delete {m.label}"):
        for o in objs:
            if not o.key.endswith("/" + MANIFEST):
                repo.storage.delete(o.key)
        repo.storage.delete(repo.key(m.label, MANIFEST))
    log.info("deleted backup %s of cluster %s (%d objects)", m.label, repo.cluster, len(objs))
    return {"cluster": repo.cluster, "label": m.label, "deleted_objects": len(objs)}
