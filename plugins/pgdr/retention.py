"""Retention: which backups and WAL the policy keeps, and deleting the rest.

The plan is a pure function of the catalog, the policy and the time, and
explains each decision. Deletion fails closed: one unreadable manifest stops
it before anything is deleted. It never deletes the newest verified backup, a
pinned backup, a backup an incremental that stays is built on, or WAL a kept
backup needs; it deletes newest first (an incremental before its parent, so an
interrupted run never orphans one) and writes an audit record of what it
deleted.

Expiry never races a writer: it holds the cluster lock (which every backup
holds while it writes) from before it reads the catalog until it is done,
and renews it before each backup it deletes. A backup directory without a
manifest is a leftover only once its last write is older than
``UNFINISHED_GRACE`` — its label says nothing (``--label`` may be any date).
A backup's manifest is deleted first, so from its first deletion on the
backup is no longer offered; an interrupted expiry leaves a leftover, never a
committed backup with missing parts. ``now`` may not lie in the future
unless nothing is deleted (dry run).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pgdr.errors import IntegrityError, ObjectNotFound, PgdrError, UsageError
from pgdr.lsn import parse_lsn
from pgdr.results import JsonResult, iso, parse_iso, utcnow

log = logging.getLogger(__name__)
UNFINISHED_GRACE = timedelta(days=1)
CLOCK_SLACK = timedelta(minutes=5)  # how far ``now`` may run ahead of this host's clock
KEEP = "keep.json"


@dataclass(frozen=True)
class RetentionPolicy:
    window_days: int = 30
    min_full: int = 2


@dataclass(frozen=True)
class CatalogItem:
    """What the planner needs to know of one backup directory."""

    label: str
    status: str  # ok | waiting_for_wal | unfinished | unreadable
    stop_time: datetime | None = None  # unfinished: its last write (None: unknown, never expired)
    start_lsn: str | None = None
    pinned_until: datetime | None = None  # datetime.max: pinned with no end
    verified_ok: bool = False
    parent: str | None = None  # an incremental: the backup it needs to restore
    kind: str = "full"  # full | safety (taken by a confirmed replace; never a base for WAL replay)


@dataclass
class Decision(JsonResult):
    label: str
    action: str  # keep | expire
    reason: str


@dataclass
class RetentionPlan(JsonResult):
    now: str
    window_start: str
    decisions: list = field(default_factory=list)
    keep_wal_from_lsn: str | None = None

    def expired(self) -> list[str]:
        return [d["label"] for d in self.decisions if d["action"] == "expire"]


def plan_retention(items: list[CatalogItem], policy: RetentionPolicy, now: datetime) -> RetentionPlan:
    bad = [i.label for i in items if i.status == "unreadable"]
    if bad:
        raise IntegrityError(f"retention stopped before deleting anything: unreadable backup(s) {', '.join(bad)}")
    window_start = now - timedelta(days=policy.window_days)
    safety = {i.label: i for i in items if i.status == "ok" and i.kind == "safety"}
    done = sorted((i for i in items if i.status == "ok" and i.label not in safety), key=lambda i: i.label)
    reasons: dict[str, str] = {}
    for i in done:
        if i.stop_time >= window_start:
            reasons[i.label] = "kept: inside the recovery window"
    base = [i for i in done if i.stop_time < window_start]
    if base:
        reasons.setdefault(base[-1].label, "kept: base backup for the start of the recovery window")
    fulls = [i for i in done if not i.parent]
    for i in fulls[-policy.min_full:] if policy.min_full else []:
        reasons.setdefault(i.label, f"kept: among the newest {policy.min_full} full backups")
    verified = [i for i in done if i.verified_ok]
    if verified:
        reasons.setdefault(verified[-1].label, "kept: the newest backup that passed verification")
    for i in done:
        if i.pinned_until and i.pinned_until > now:
            until = "indefinitely" if i.pinned_until == datetime.max.replace(tzinfo=now.tzinfo) \
                else f"until {iso(i.pinned_until)}"
            reasons.setdefault(i.label, f"kept: pinned {until}")
    # A chain member is kept while any later member is: newest first, each kept incremental keeps its parent.
    by_label = {i.label: i for i in items}
    for i in reversed(done):
        if i.label in reasons and i.parent:
            parent = by_label.get(i.parent)
            if parent is not None and parent.status == "ok":
                reasons.setdefault(i.parent, f"kept: kept incremental {i.label} is built on it")
    for i in safety.values():
        # A safety backup stands alone (its WAL is inside it): kept for the window like the point it
        # captured, never counted among the full backups, never a reason to keep archived WAL.
        if i.pinned_until and i.pinned_until > now:
            reasons[i.label] = "kept: pinned safety backup"
        elif i.stop_time >= window_start:
            reasons[i.label] = "kept: safety backup inside the recovery window"
    decisions = []
    for i in sorted(items, key=lambda i: i.label):
        if i.label in safety and i.label not in reasons:
            decisions.append(Decision(i.label, "expire", "expired: safety backup older than the recovery window"))
        elif i.status == "ok":
            if i.label in reasons:
                decisions.append(Decision(i.label, "keep", reasons[i.label]))
            else:
                decisions.append(Decision(i.label, "expire", "expired: older than the recovery window's base "
                                                             "backup and beyond the minimum count"))
        elif i.status == "unfinished" and i.stop_time is not None and i.stop_time < now - UNFINISHED_GRACE:
            decisions.append(Decision(i.label, "expire", "expired: unfinished leftover of a failed backup, "
                                                         f"last written {iso(i.stop_time)}, past the grace period"))
        else:
            decisions.append(Decision(i.label, "keep", f"kept: {i.status} (not a retention candidate yet)"))
    kept = [i for i in done if reasons.get(i.label)]
    wal_from = min((i.start_lsn for i in kept), key=parse_lsn) if kept else None
    return RetentionPlan(now=iso(now), window_start=iso(window_start), decisions=[d.to_dict() for d in decisions],
                         keep_wal_from_lsn=wal_from)


def catalog_items(repo) -> list[CatalogItem]:
    from pgdr.verify import last_verification

    out = []
    for e in repo.catalog():
        if e.manifest is None:
            status = "unfinished" if e.error and e.error.startswith("unfinished") else "unreadable"
            # A leftover's age is its last write, never its label: a label may name any date.
            out.append(CatalogItem(e.label, status, stop_time=repo.last_write(e.label) if status == "unfinished"
                                   else None))
            continue
        m = e.manifest
        pin = pinned_until(repo, m.label)
        v = last_verification(repo, m.label)
        out.append(CatalogItem(m.label, m.status, parse_iso(m.stop_time), m.start_lsn, pin, bool(v and v["ok"]),
                               kind="safety" if m.type == "safety" else "full", parent=m.parent))
    return out


def pinned_until(repo, label: str) -> datetime | None:
    try:
        data = json.loads(repo.storage.get_bytes(repo.key(label, KEEP)))
    except ObjectNotFound:
        return None
    except ValueError as e:
        raise IntegrityError(f"{repo.key(label, KEEP)} is unreadable: {e}") from None
    return parse_iso(data["until"]) if data.get("until") else datetime.max.replace(tzinfo=parse_iso(data["at"]).tzinfo)


def check_now(now: datetime, dry_run: bool) -> None:
    """A plan for a future time would delete what the policy keeps today: only a dry run may look ahead."""
    wall = utcnow()
    if not dry_run and now > wall + CLOCK_SLACK:
        raise UsageError(f"--now {iso(now)} is in the future (this host's clock says {iso(wall)}); expiring as of "
                         "a future time would delete backups the policy still keeps: use it with --dry-run only")


def run_expire(cluster, storage, policy: RetentionPolicy, now: datetime, dry_run: bool, *,
               simulated_now: bool = False) -> dict:
    """Plan, and unless ``dry_run`` delete, holding the cluster lock.

    ``simulated_now``: tests and drills that simulate the passage of time may expire as of a future ``now``;
    the CLI and the DAG never set it."""
    from pgdr.lock import ClusterLock
    from pgdr.repository import Repository

    if not simulated_now:
        check_now(now, dry_run)
    repo = Repository(storage, cluster.name)
    if dry_run:
        return _expire(cluster, storage, repo, policy, now, None)
    # Before the catalog is read: a backup writing now holds this lock, so what has no manifest is not
    # being written (a writer that lost the lock stops at once and never commits).
    with ClusterLock(storage, repo.lock_key, "expire") as lock:
        return _expire(cluster, storage, repo, policy, now, lock)


def _expire(cluster, storage, repo, policy: RetentionPolicy, now: datetime, lock) -> dict:
    from pgdr.audit import write_audit
    from pgdr.wal import SEG_SIZE, WalArchive, parse_segment

    dry_run = lock is None
    items = catalog_items(repo)
    plan = plan_retention(items, policy, now)
    parents = {i.label: i.parent for i in items if i.parent}
    deleted_objects, wal_deleted, deleted_backups, locked_backups = 0, [], [], []
    locked_wal: list[str] = []
    locked_wal_until = None
    if not dry_run:
        # Every listing first: one that fails stops the run before anything is deleted.
        backup_objects = {label: storage.list(repo.backup_prefix(label)) for label in plan.expired()}
        wal_keys = {}
        if plan.keep_wal_from_lsn:
            first_needed = parse_lsn(plan.keep_wal_from_lsn) // SEG_SIZE
            wal_keys = {name: keys for name, keys in WalArchive(storage, cluster.name).segment_keys().items()
                        if parse_segment(name)[1] < first_needed}
        needed: set[str] = set()  # parents of incrementals that stay: never deleted from under them
        # Newest first: an incremental goes before the backup it is built on, so a run stopped half-way never
        # leaves an incremental without its parent.
        for label, objs in reversed(list(backup_objects.items())):
            if label in needed:
                locked_backups.append({"label": label, "locked_objects": 0, "locked_until": None,
                                       "reason": "an incremental built on it could not be deleted"})
                log.warning("backup %s is expired but an incremental built on it stays; skipped", label)
                if label in parents:
                    needed.add(parents[label])
                continue
            held = _still_locked(storage, [o.key for o in objs])
            if held:
                # Deleting around a lock would leave a backup with holes; it goes when its last lock ends.
                until = max(r.until for r in held.values())
                locked_backups.append({"label": label, "locked_objects": len(held), "locked_until": iso(until)})
                log.warning("backup %s is expired but %d of its objects are under Object Lock until %s; "
                            "skipped (a later run deletes it)", label, len(held), iso(until))
                if label in parents:
                    needed.add(parents[label])
                continue
            lock.renew()  # still ours: no backup can have started writing since the plan
            manifest_key = repo.key(label, "manifest.json")
            # First: from here on the backup is not offered; if this run stops half-way, what is left
            # is a manifest-less leftover the next run deletes, never a committed backup with holes.
            storage.delete(manifest_key)
            for obj in objs:
                if obj.key == manifest_key:
                    continue
                storage.delete(obj.key)
                deleted_objects += 1
            deleted_backups.append(label)
            log.info("expired backup %s", label)
        for name, keys in wal_keys.items():
            held = _still_locked(storage, keys)
            if held:
                locked_wal.append(name)
                until = max(r.until for r in held.values())
                locked_wal_until = max(locked_wal_until or until, until)
                continue
            for key in keys:
                storage.delete(key)
            wal_deleted.append(name)
        if locked_wal:
            log.warning("%d expired WAL segments are under Object Lock (until %s at the latest); skipped",
                        len(locked_wal), iso(locked_wal_until))
        write_audit(storage, cluster.name, "retention", {
            "plan": plan.to_dict(), "deleted_backups": deleted_backups, "deleted_wal_segments": wal_deleted,
            "skipped_locked_backups": locked_backups, "skipped_locked_wal_segments": locked_wal})
    return {"cluster": cluster.name, "dry_run": dry_run, "plan": plan.to_dict(), "deleted_backups": deleted_backups,
            "deleted_objects": deleted_objects, "deleted_wal_segments": wal_deleted,
            "skipped_locked_backups": locked_backups, "skipped_locked_wal_segments": locked_wal,
            "locked_wal_until": iso(locked_wal_until) if locked_wal_until else None}


def _still_locked(storage, keys: list[str]) -> dict:
    """{key: Retention} of the objects whose Object Lock has not ended yet (by the wall clock:
    the store enforces real time, whatever ``now`` the plan was made for)."""
    if storage.object_lock is None:
        return {}
    from datetime import timezone

    wall = datetime.now(timezone.utc)
    out = {}
    for key in keys:
        r = storage.retention(key)
        if r is not None and r.active(wall):
            out[key] = r
    return out


def set_keep(repo, label: str, until: datetime | None, now: datetime) -> dict:
    m = repo.resolve(label)
    record = {"label": m.label, "at": iso(now), "until": iso(until) if until else None}
    repo.storage.put_bytes(repo.key(m.label, KEEP), json.dumps(record).encode())
    return record


def clear_keep(repo, label: str) -> dict:
    m = repo.resolve(label)
    if not repo.storage.exists(repo.key(m.label, KEEP)):
        raise PgdrError(f"backup {m.label} is not pinned")
    repo.storage.delete(repo.key(m.label, KEEP))
    return {"label": m.label, "pinned": False}
