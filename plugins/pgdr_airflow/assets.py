"""Assets pgdr DAGs publish, so later DAGs can be scheduled on them."""

from __future__ import annotations

from airflow.sdk import Asset


def backups_asset(cluster: str) -> Asset:
    """Updated each time a backup of ``cluster`` commits."""
    return Asset(name=f"pgdr_{cluster}_backups", uri=f"pgdr://{cluster}/backups", group="pgdr")
