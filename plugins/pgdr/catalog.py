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
