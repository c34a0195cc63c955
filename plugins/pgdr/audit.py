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
