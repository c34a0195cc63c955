"""Audit records: who asked for what, with which parameters, and what happened.

    <cluster>/reports/<kind>/<UTC time>-<id>.json
"""

from __future__ import annotations

import json
import uuid

from pgdr.results import iso, utcnow
from pgdr.storage import Storage


def write_audit(storage: Storage, cluster: str, kind: str, record: dict) -> str:
    now = utcnow()
    key = f"{cluster}/reports/{kind}/{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex[:8]}.json"
    storage.put_bytes(key, json.dumps({"kind": kind, "cluster": cluster, "recorded_at": iso(now), **record},
                                      indent=2, default=str).encode(), lock=True)
    return key


def read_audit(storage: Storage, cluster: str, kind: str) -> list[dict]:
    """Oldest first."""
    records = [json.loads(storage.get_bytes(o.key)) for o in storage.list(f"{cluster}/reports/{kind}/")]
    return sorted(records, key=lambda r: r["recorded_at"])


# The operations log: one record per operation that changes or reads out the repository, whoever asked.
#
#     <cluster>/reports/audit/<UTC time>-<id>.json   (immutable under Object Lock, like every report)
#
# {"kind": "audit", "cluster", "recorded_at", "actor", "actor_type": "airflow" | "os", "source": "cli" | "api" |
#  "dag", "action", "parameters", "outcome": "ok" | "failed" | "refused", "error": kind or null, "message",
#  "duration_seconds", "result": a short summary}
AUDIT = "audit"
AUDITED_ACTIONS = ("backup", "expire", "keep", "unkeep", "delete", "restore", "verify", "drill", "rotate_key",
                   "refresh")


def repository_exists(storage: Storage, cluster: str) -> bool:
    """Whether the repository holds this cluster (its cluster.json, written by the first backup or WAL push).
    Bookkeeping (audit records, the catalog cache) goes only into such a repository: an operation that
    failed before there was one leaves nothing behind."""
    return storage.exists(f"{cluster}/cluster.json")


def os_actor() -> str:
    """The OS user running the CLI (and who sudo'ed to it, when someone did)."""
    import getpass
    import os

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.geteuid()}"
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user


def record_operation(storage: Storage, cluster: str, *, actor: str, actor_type: str, source: str, action: str,
                     parameters: dict, outcome: str, duration_seconds: float, error: str | None = None,
                     message: str | None = None, result: dict | None = None) -> str:
    return write_audit(storage, cluster, AUDIT, {
        "actor": actor, "actor_type": actor_type, "source": source, "action": action, "parameters": parameters,
        "outcome": outcome, "error": error, "message": message, "duration_seconds": round(duration_seconds, 3),
        "result": result})


def read_operations(storage: Storage, cluster: str, *, actor: str | None = None, action: str | None = None,
                    limit: int = 200) -> list[dict]:
    """Newest first, at most ``limit``; keys sort by time, so only the newest records are read."""
    out = []
    for obj in reversed(storage.list(f"{cluster}/reports/{AUDIT}/")):
        try:
            record = json.loads(storage.get_bytes(obj.key))
        except ValueError:
            record = {"cluster": cluster, "recorded_at": None, "action": "?", "outcome": "unreadable",
                      "message": f"{obj.key} is not JSON"}
        if actor and record.get("actor") != actor:
            continue
        if action and record.get("action") != action:
            continue
        out.append(record)
        if len(out) >= limit:
            break
    return out
