"""Backup labels: they sort by time and say the type, like pgBackRest's.

``20261125-020000F`` is a full backup started (or scheduled) at 02:00:00 UTC
on 2026-11-25. A trailing ``S`` marks a safety backup: what a confirmed
``restore --replace`` found in the destination, taken before touching it.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from pgdr.errors import UsageError

LABEL = re.compile(r"^\d{8}-\d{6}[FS]$")
KINDS = {"F": "full", "S": "safety"}


def make_label(when: datetime, kind: str = "F") -> str:
    if when.tzinfo is None:
        raise ValueError("label times must be timezone-aware")
    return when.astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S") + kind


def check_label(label: str) -> str:
    if not LABEL.match(label):
        raise UsageError(f"{label!r} is not a backup label (expected like 20261125-020000F, or 'latest'; "
                         "safety backups end in S)")
    return label


def label_time(label: str) -> datetime:
    return datetime.strptime(label[:15], "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
