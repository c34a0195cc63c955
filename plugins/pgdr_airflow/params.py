"""The pieces of the restore and drill forms (and the API's request bodies) that must agree: what a backup
label, a target time and an LSN look like, and which recovery targets and actions there are. Patterns and
choices come from the core's rules (pgdr.labels, pgdr.recovery)."""

from __future__ import annotations

from airflow.sdk import Param

from pgdr.labels import label_pattern
from pgdr.recovery import ACTIONS, KINDS

# ISO 8601 with a zone (Z, +05, +05:30, -0500); what pgdr.recovery.parse_time accepts.
ISO_TIME = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}(:?\d{2})?)$"
LSN = r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"
# How far a restore recovers: the end of the backup (no recovery target), then the core's kinds in the form's
# order (a kind the core adds fails here, at import, until it has a place).
_FORM_ORDER = ("latest", "immediate", "time", "lsn", "xid", "name")
TARGETS = ("end_of_backup", *sorted(KINDS, key=_FORM_ORDER.index))
TARGET_ACTIONS = ACTIONS  # what the server does at the target


def backup_choice(kinds: str = "FS", extra: tuple[str, ...] = ("latest",)) -> str:
    """The anchored pattern of a backup choice: one of ``extra`` or a label starting a chain of ``kinds``."""
    return rf"^({'|'.join(extra)}|{label_pattern(kinds)})$"


def backup_param(kinds: str = "FS") -> Param:
    return Param("latest", type="string", pattern=backup_choice(kinds),
                 description="'latest' or a backup label like 20261125-020000F")


def target_time_param(description: str, **schema) -> Param:
    return Param(None, type=["null", "string"], pattern=ISO_TIME, description=description, **schema)
