"""Backup labels: they sort by time and say the type and lineage, like pgBackRest's.

``20261125-020000F`` is a full backup started (or scheduled) at 02:00:00 UTC
on 2026-11-25. A trailing ``S`` marks a safety backup: what a confirmed
``restore --replace`` found in the destination, taken before touching it.
``20261125-020000F_20261126-020000I`` is an incremental backup taken at
02:00:00 on 2026-11-26 in the chain that starts at the full backup
``20261125-020000F``: the label names the chain's full, its manifest names
its direct parent. Labels of one chain sort in the order they were taken.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from pgdr.errors import UsageError

def label_pattern(kinds: str = "FS") -> str:
    """The regular expression (unanchored) of a label whose chain starts at one of ``kinds`` (F full, S safety);
    forms and the API build theirs from it, so they cannot drift from the core's rule."""
    return rf"\d{{8}}-\d{{6}}[{kinds}](_\d{{8}}-\d{{6}}I)?"


LABEL = re.compile(f"^{label_pattern()}$")
KINDS = {"F": "full", "S": "safety", "I": "incr"}


def make_label(when: datetime, kind: str = "F") -> str:
    if when.tzinfo is None:
        raise ValueError("label times must be timezone-aware")
    return when.astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S") + kind


def make_incr_label(full_label: str, when: datetime) -> str:
    """The label of an incremental in the chain of ``full_label`` (a full's own label)."""
    check_label(full_label)
    if is_incremental(full_label):
        raise ValueError(f"{full_label} is not a full backup's label")
    return f"{full_label}_{make_label(when, 'I')}"


def check_label(label: str) -> str:
    if not LABEL.fullmatch(label):
        raise UsageError(f"{label!r} is not a backup label (expected like 20261125-020000F, or 'latest'; "
                         "safety backups end in S, incrementals look like 20261125-020000F_20261126-020000I)")
    return label


def is_incremental(label: str) -> bool:
    return label.endswith("I")


def chain_full(label: str) -> str:
    """The label of the full backup a label's chain starts at (the label itself for a full)."""
    return label.split("_", 1)[0]


def label_time(label: str) -> datetime:
    """When the backup was started (or scheduled): an incremental's own time, not its full's."""
    return datetime.strptime(label.rsplit("_", 1)[-1][:15], "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
