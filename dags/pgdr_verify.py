"""
### pgdr: integrity verification

One DAG per cluster. It runs soon after each new backup commits (scheduled on
the `pgdr_<cluster>_backups` Asset) and reads only what is new: backups never
verified, and WAL newer than the last clean check. Every Sunday at 04:00 it
sweeps everything retained.

For each backup: every object exists, its size and SHA-256 match the manifest,
it decompresses, and `pg_verifybackup` (full, with checksums) accepts it
unpacked into a scratch directory. For the WAL: each segment's checksum, and no
gap from the oldest backup on. Results are recorded beside each backup (`pgdr
list` shows them); a failure fails the task, naming the object and the check.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param

from pgdr.config import load_config
from pgdr_airflow.assets import backups_asset
from pgdr_airflow.notifiers import failure_notifiers
from pgdr_airflow.operators import PgdrVerifyOperator

for cluster in load_config().clusters.values():
    dag_id = f"pgdr_{cluster.name}_verify"
    with DAG(
        dag_id=dag_id,
        description=f"Verify the backups and WAL of PostgreSQL cluster '{cluster.name}'",
        schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 4 * * 0", timezone=cluster.timezone),
                                     assets=[backups_asset(cluster.name)]),
        start_date=pendulum.datetime(2026, 1, 1, tz=cluster.timezone),
        catchup=False,
        max_active_runs=1,
        tags=["pgdr", "verify", cluster.name],
        doc_md=__doc__,
        params={"scope": Param(None, type=["null", "string"], pattern=r"^(new|all|latest|\d{8}-\d{6}F(_\d{8}-\d{6}I)?)$",
                               description="new, all, latest or a label (default: new after a backup, "
                                           "all on the weekly sweep)")},
        default_args={
            "retries": 2,
            "retry_delay": timedelta(minutes=5),
            "on_failure_callback": failure_notifiers(cluster, dag_id),
        },
    ) as dag:
        PgdrVerifyOperator(task_id="verify", cluster=cluster.name, scope="{{ params.scope or '' }}",
                           execution_timeout=timedelta(hours=12))
    globals()[dag_id] = dag
