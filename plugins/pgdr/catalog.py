"""What ``pgdr list`` and ``pgdr info`` report about a repository."""

from __future__ import annotations

from dataclasses import dataclass, field

from pgdr.repository import Repository
from pgdr.results import JsonResult


@dataclass
class BackupSummary(JsonResult):
    label: str
    status: str  # ok | unfinished | unreadable
    type: str | None = None
    pg_version: str | None = None
    timeline: int | None = None
    start_lsn: str | None = None
    stop_lsn: str | None = None
    start_time: str | None = None
    stop_time: str | None = None
    size: int | None = None
    stored_size: int | None = None
    detail: str | None = None
    verification: dict | None = None  # the last `pgdr verify` result: verified_at, ok, failures
    key_id: str | None = None  # the master key that opens it, when encrypted


@dataclass
class CatalogReport(JsonResult):
    cluster: str
    repository: str
    backups: list[BackupSummary] = field(default_factory=list)


def list_backups(repo: Repository) -> CatalogReport:
    out = []
    for entry in repo.catalog(unchecked_ok=True):
        m = entry.manifest
        if m is None:
            status = "unfinished" if entry.error and entry.error.startswith("unfinished") else "unreadable"
            out.append(BackupSummary(entry.label, status, detail=entry.error))
            continue
        out.append(BackupSummary(
            label=m.label, status=m.status, type=m.type, pg_version=m.pg_version_text, timeline=m.timeline,
            start_lsn=m.start_lsn, stop_lsn=m.stop_lsn, start_time=m.start_time, stop_time=m.stop_time,
            size=m.size, stored_size=m.stored_size, verification=_verification(repo, m.label), key_id=m.key_id,
            detail=entry.unchecked))
    return CatalogReport(cluster=repo.cluster, repository=repo.storage.describe(), backups=out)


def _verification(repo: Repository, label: str) -> dict | None:
    from pgdr.verify import last_verification

    v = last_verification(repo, label)
    if v is None:
        return None
    return {"ok": v["ok"], "verified_at": v["verified_at"], "tool_version": v["tool_version"],
            "failures": v["failures"]}


# The catalog cache: what the API, the Disaster recovery page and the metrics read instead of listing a large
# repository per request. One object per cluster, rewritten whole (never locked: it changes constantly):
#
#     <cluster>/catalog.json
#
# Refreshed by every pgdr command and Airflow task that changes the repository, and on demand
# (POST /pgdr/api/v1/clusters/<cluster>/refresh); ``catalog_refreshed_at`` says how fresh it is.
CACHE = "catalog.json"
CACHE_FORMAT = 1
LAG_HISTORY = 500  # WAL lag measurements kept for the page's chart


@dataclass
class CatalogSnapshot(JsonResult):
    cluster: str
    repository: str
    catalog_refreshed_at: str
    backups: list = field(default_factory=list)  # BackupSummary dicts, oldest first, plus pinned_until
    wal: dict | None = None  # archived_lsn, archive_updated_at, lag (the last measured WalLagReport) or None
    drills: list = field(default_factory=list)  # drill report summaries, oldest first
    format: int = CACHE_FORMAT


def cache_key(cluster: str) -> str:
    return f"{cluster}/{CACHE}"


def refresh_catalog(repo: Repository, lag: dict | None = None) -> CatalogSnapshot:
    """List the repository once and store what the API shows. ``lag``: a fresh ``pgdr wal-lag`` result (a
    WalLagReport dict) to record; without one, the last recorded measurement is kept."""
    import json

    from pgdr.results import iso, utcnow
    from pgdr.retention import pinned_until
    from pgdr.wal import WalArchive

    report = list_backups(repo)
    backups = []
    for b in report.backups:
        d = b.to_dict()
        pin = pinned_until(repo, b.label) if b.status == "ok" else None
        d["pinned_until"] = None if pin is None else ("forever" if pin.year == 9999 else iso(pin))
        backups.append(d)
    previous = cached_catalog(repo)
    history = list(((previous.wal or {}).get("lag_history") or [])) if previous else []
    if lag is None:
        lag = (previous.wal or {}).get("lag") if previous else None
    else:
        lag = {**lag, "measured_at": iso(utcnow())}
        history = (history + [{k: lag.get(k) for k in ("measured_at", "lag_bytes", "lag_seconds")}])[-LAG_HISTORY:]
    archive = WalArchive(repo.storage, repo.cluster)
    progress = archive.progress() or {}
    snapshot = CatalogSnapshot(
        cluster=repo.cluster, repository=repo.storage.describe(), catalog_refreshed_at=iso(utcnow()),
        backups=backups,
        wal={"archived_lsn": progress.get("archived_lsn"), "archive_updated_at": progress.get("updated_at"),
             "lag": lag, "lag_history": history},
        drills=drill_history(repo))
    repo.storage.put_bytes(cache_key(repo.cluster), json.dumps(snapshot.to_dict()).encode())
    return snapshot


def cached_catalog(repo: Repository) -> CatalogSnapshot | None:
    """The stored snapshot, or None when there is none yet (or it is unreadable: a refresh rewrites it)."""
    import json

    from pgdr.errors import ObjectNotFound

    try:
        data = json.loads(repo.storage.get_bytes(cache_key(repo.cluster)))
    except (ObjectNotFound, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return None
    return CatalogSnapshot.from_dict(data)


def catalog(repo: Repository) -> CatalogSnapshot:
    """The cached snapshot, refreshed first when there is none."""
    return cached_catalog(repo) or refresh_catalog(repo)


def drill_history(repo: Repository) -> list[dict]:
    """The drill reports under ``<cluster>/reports/drill/`` (written by the drill), summarized, oldest first;
    empty when there are none."""
    import json

    out = []
    for obj in repo.storage.list(f"{repo.cluster}/reports/drill/"):
        try:
            out.append(drill_summary(json.loads(repo.storage.get_bytes(obj.key)), obj.key))
        except ValueError:
            out.append({"key": obj.key, "passed": False, "recorded_at": None, "detail": "unreadable report"})
    return sorted(out, key=lambda d: d.get("recorded_at") or "")


def drill_summary(r: dict, key: str) -> dict:
    """The fields the page, health and metrics need from a drill report, tolerant of its exact layout."""
    def seconds(name):
        v = r.get(f"{name}_seconds", r.get(name))
        if isinstance(v, dict):
            v = v.get("seconds", v.get("total_seconds", v.get("measured")))
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    passed = r.get("passed", r.get("ok"))
    if passed is None and "status" in r:
        passed = str(r["status"]).lower() in ("passed", "ok", "success")
    targets = r.get("targets") or {}
    backup = r.get("backup")
    label = r.get("backup_label") or r.get("label") or (backup.get("label") if isinstance(backup, dict) else backup)
    return {"key": key, "recorded_at": r.get("recorded_at") or r.get("finished_at"), "passed": bool(passed),
            "backup_label": label,
            "rto_seconds": seconds("rto"), "rpo_seconds": seconds("rpo"),
            "rto_target_seconds": r.get("rto_target_seconds", targets.get("rto_seconds")),
            "rpo_target_seconds": r.get("rpo_target_seconds", targets.get("rpo_seconds")),
            "failures": r.get("failures") or ([r["error"]] if r.get("error") else [])}
