"""Is a cluster recoverable right now, to which point, how fast? Pure functions of a catalog snapshot
(``pgdr.catalog.CatalogSnapshot``), the cluster's config and the time: ``/pgdr/health/backup``, the metrics and
the Disaster recovery page all read them.

Healthy means every one of:
  - the newest completed backup is younger than ``max_backup_age_hours`` (default 26);
  - WAL capture's last measured lag is under ``wal.rpo_seconds``;
  - the newest completed backup passed verification;
  - the last drill passed and is younger than ``max_drill_age_days`` (default 100).
Each rule that fails adds a code (stable, for monitors) and a reason (for people).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from pgdr.results import JsonResult, parse_iso

CODES = ("repository_unreachable", "no_backup", "backup_too_old", "backup_not_verified", "backup_verify_failed",
         "wal_lag_unknown", "wal_lag_over_rpo", "no_drill", "drill_failed", "drill_too_old")


@dataclass
class ClusterStatus(JsonResult):
    cluster: str
    healthy: bool
    codes: list = field(default_factory=list)
    reasons: list = field(default_factory=list)
    catalog_refreshed_at: str | None = None
    backups_count: int = 0
    last_backup: dict | None = None  # label, stop_time, age_seconds, size, stored_size, duration_seconds
    recoverable_from: str | None = None  # PITR window: the oldest backup's consistent point
    recoverable_to: str | None = None  # the newest archived WAL (or the newest backup's end)
    wal: dict | None = None  # lag_bytes, lag_seconds, rpo_seconds, measured_at
    verification: dict | None = None  # the newest backup's: ok, verified_at
    last_drill: dict | None = None  # passed, recorded_at, age_seconds, rto/rpo and their targets
    limits: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "healthy" if self.healthy else "unhealthy"


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return parse_iso(text)
    except ValueError:
        from datetime import datetime as dt

        try:
            return dt.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None


def _duration(b: dict) -> float | None:
    start, stop = _time(b.get("start_time")), _time(b.get("stop_time"))
    return round((stop - start).total_seconds(), 3) if start and stop else None


def cluster_status(snapshot: dict | None, cluster, now: datetime, error: str | None = None) -> ClusterStatus:
    """``snapshot``: a CatalogSnapshot dict, or None with ``error`` when the repository could not be read."""
    rpo = cluster.wal.rpo_seconds
    limits = {"max_backup_age_seconds": cluster.max_backup_age_hours * 3600, "rpo_seconds": rpo,
              "max_drill_age_seconds": cluster.max_drill_age_days * 86400,
              "rto_target_seconds": getattr(cluster, "rto_seconds", None)}
    st = ClusterStatus(cluster=cluster.name, healthy=False, limits=limits)
    codes, reasons = st.codes, st.reasons
    if snapshot is None:
        codes.append("repository_unreachable")
        reasons.append(f"the repository could not be read: {error or 'unknown error'}")
        return st
    st.catalog_refreshed_at = snapshot.get("catalog_refreshed_at")
    done = [b for b in snapshot.get("backups") or [] if b.get("status") == "ok"]
    st.backups_count = len(done)
    wal = snapshot.get("wal") or {}
    if done:
        newest = done[-1]
        stop = _time(newest.get("stop_time"))
        age = (now - stop).total_seconds() if stop else None
        st.last_backup = {"label": newest["label"], "stop_time": newest.get("stop_time"),
                          "age_seconds": round(age, 1) if age is not None else None, "size": newest.get("size"),
                          "stored_size": newest.get("stored_size"), "duration_seconds": _duration(newest)}
        if age is None or age > limits["max_backup_age_seconds"]:
            codes.append("backup_too_old")
            reasons.append(f"the newest backup {newest['label']} is {_human(age)} old, over the limit of "
                           f"{_human(limits['max_backup_age_seconds'])} (max_backup_age_hours)")
        v = newest.get("verification")
        st.verification = {"label": newest["label"], **({"ok": v.get("ok"), "verified_at": v.get("verified_at")}
                                                          if v else {"ok": None, "verified_at": None})}
        if v is None:
            codes.append("backup_not_verified")
            reasons.append(f"the newest backup {newest['label']} has not been verified (pgdr verify)")
        elif not v.get("ok"):
            codes.append("backup_verify_failed")
            reasons.append(f"the newest backup {newest['label']} failed verification")
        st.recoverable_from = done[0].get("stop_time")
        ends = [t for t in (newest.get("stop_time"), wal.get("archive_updated_at")) if _time(t)]
        st.recoverable_to = max(ends, key=_time) if ends else None
    else:
        codes.append("no_backup")
        reasons.append("there is no completed backup")
    lag = wal.get("lag")
    if lag:
        st.wal = {"lag_bytes": lag.get("lag_bytes"), "lag_seconds": lag.get("lag_seconds"), "rpo_seconds": rpo,
                  "measured_at": lag.get("measured_at"), "archived_lsn": lag.get("archived_lsn")}
    else:
        st.wal = {"lag_bytes": None, "lag_seconds": None, "rpo_seconds": rpo, "measured_at": None,
                  "archived_lsn": wal.get("archived_lsn")}
    if not lag or lag.get("lag_seconds") is None:
        codes.append("wal_lag_unknown")
        reasons.append("WAL lag has not been measured (pgdr wal-lag, or the WAL DAG), or nothing is archived")
    elif lag["lag_seconds"] > rpo:
        codes.append("wal_lag_over_rpo")
        reasons.append(f"WAL capture was {lag['lag_seconds']:.0f} s ({lag.get('lag_bytes')} bytes) behind at "
                       f"{lag.get('measured_at')}, over the RPO of {rpo} s")
    drills = snapshot.get("drills") or []
    if drills:
        d = drills[-1]
        when = _time(d.get("recorded_at"))
        age = (now - when).total_seconds() if when else None
        st.last_drill = {**d, "age_seconds": round(age, 1) if age is not None else None}
        if not d.get("passed"):
            codes.append("drill_failed")
            reasons.append(f"the last drill ({d.get('recorded_at')}) failed"
                           + (f": {'; '.join(map(str, d['failures']))}" if d.get("failures") else ""))
        if age is None or age > limits["max_drill_age_seconds"]:
            codes.append("drill_too_old")
            reasons.append(f"the last drill is {_human(age)} old, over the limit of "
                           f"{cluster.max_drill_age_days} days (max_drill_age_days)")
    else:
        codes.append("no_drill")
        reasons.append("no disaster-recovery drill has been recorded")
    st.healthy = not codes
    return st


def _human(seconds: float | None) -> str:
    if seconds is None:
        return "of unknown age"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# Prometheus metrics, in the style of postgres_exporter / pgbackrest_exporter: (name, help, type).
METRICS = (
    ("pgdr_repository_up", "1 when the repository (its catalog) could be read", "gauge"),
    ("pgdr_healthy", "1 when every /health/backup rule holds for the cluster", "gauge"),
    ("pgdr_backups", "completed backups in the repository", "gauge"),
    ("pgdr_last_backup_timestamp_seconds", "end of the newest completed backup (Unix time)", "gauge"),
    ("pgdr_last_backup_age_seconds", "seconds since the newest completed backup ended", "gauge"),
    ("pgdr_last_backup_size_bytes", "database size of the newest backup", "gauge"),
    ("pgdr_last_backup_stored_bytes", "stored (compressed) size of the newest backup", "gauge"),
    ("pgdr_last_backup_duration_seconds", "how long the newest backup took", "gauge"),
    ("pgdr_last_backup_verified", "1 verified ok, 0 failed, -1 never verified (newest backup)", "gauge"),
    ("pgdr_wal_lag_bytes", "WAL capture's lag behind the server at the last measurement", "gauge"),
    ("pgdr_wal_lag_seconds", "WAL capture's lag in seconds at the last measurement", "gauge"),
    ("pgdr_pitr_window_start_timestamp_seconds", "earliest recoverable point (Unix time)", "gauge"),
    ("pgdr_pitr_window_end_timestamp_seconds", "latest recoverable point (Unix time)", "gauge"),
    ("pgdr_last_drill_timestamp_seconds", "when the last drill was recorded (Unix time)", "gauge"),
    ("pgdr_last_drill_age_seconds", "seconds since the last drill", "gauge"),
    ("pgdr_last_drill_success", "1 when the last drill passed", "gauge"),
    ("pgdr_last_drill_rto_seconds", "the last drill's measured RTO", "gauge"),
    ("pgdr_last_drill_rpo_seconds", "the last drill's measured RPO", "gauge"),
    ("pgdr_catalog_age_seconds", "seconds since the catalog cache was refreshed", "gauge"),
)


def metric_values(st: ClusterStatus, now: datetime) -> dict[str, float]:
    """{metric name: value} for one cluster; a metric without a value (no drill yet…) is left out."""
    def ts(text):
        t = _time(text)
        return t.timestamp() if t else None

    out = {"pgdr_repository_up": 0.0 if "repository_unreachable" in st.codes else 1.0,
           "pgdr_healthy": 1.0 if st.healthy else 0.0}
    if "repository_unreachable" in st.codes:
        return out
    out["pgdr_backups"] = st.backups_count
    b = st.last_backup or {}
    out["pgdr_last_backup_timestamp_seconds"] = ts(b.get("stop_time"))
    out["pgdr_last_backup_age_seconds"] = b.get("age_seconds")
    out["pgdr_last_backup_size_bytes"] = b.get("size")
    out["pgdr_last_backup_stored_bytes"] = b.get("stored_size")
    out["pgdr_last_backup_duration_seconds"] = b.get("duration_seconds")
    if st.verification:
        ok = st.verification.get("ok")
        out["pgdr_last_backup_verified"] = -1.0 if ok is None else (1.0 if ok else 0.0)
    out["pgdr_wal_lag_bytes"] = (st.wal or {}).get("lag_bytes")
    out["pgdr_wal_lag_seconds"] = (st.wal or {}).get("lag_seconds")
    out["pgdr_pitr_window_start_timestamp_seconds"] = ts(st.recoverable_from)
    out["pgdr_pitr_window_end_timestamp_seconds"] = ts(st.recoverable_to)
    d = st.last_drill or {}
    out["pgdr_last_drill_timestamp_seconds"] = ts(d.get("recorded_at"))
    out["pgdr_last_drill_age_seconds"] = d.get("age_seconds")
    if d:
        out["pgdr_last_drill_success"] = 1.0 if d.get("passed") else 0.0
    out["pgdr_last_drill_rto_seconds"] = d.get("rto_seconds")
    out["pgdr_last_drill_rpo_seconds"] = d.get("rpo_seconds")
    refreshed = _time(st.catalog_refreshed_at)
    out["pgdr_catalog_age_seconds"] = (now - refreshed).total_seconds() if refreshed else None
    return {k: float(v) for k, v in out.items() if v is not None}
