"""
### pgdr: continuous WAL capture, and its watch

One DAG per cluster. In `wal.mode: stream` (the default) each run streams WAL
on the physical slot `pgdr_<cluster>` for one window (`wal.window_minutes`)
and hands over to the next run: runs overlap, the next one waits for the slot
and the running one releases it within two seconds. The slot
advances only past what the repository holds, so a run that dies loses
nothing and the next one, on any worker, starts where the repository ends.

1. **slot** — checks the replication slot. If PostgreSQL invalidated it
   (`max_slot_wal_keep_size`), or it is missing while the archive already holds
   WAL (dropped, or lost in a failover), the archive has a gap: the slot is
   created again, a full backup is triggered and **archive_gap** fails, naming
   the LSN range, so the alert fires.
2. **stream** — one window of streaming.
3. **lag** — primary's current LSN against the newest LSN in the repository;
   fails when the lag passes `wal.rpo_seconds`, or the slot retains more than
   `wal.slot_retained_alert_mb` on the server.

In `wal.mode: push` (`archive_command = pgdr wal-push`) the DAG has only the
**lag** task, every window: it fails when `pg_stat_archiver` shows
`archive_command` failing since its last success, or when WAL waits longer
than `wal.rpo_seconds` to be archived.

Set `max_slot_wal_keep_size` on the server so a stalled capture cannot fill
its disk: a full disk stops the database, an invalidated slot only costs a
backup.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, CronTriggerTimetable, Param

from pgdr.config import load_config
from pgdr_airflow.notifiers import failure_notifiers
from pgdr_airflow.operators import (PgdrArchiveGapOperator, PgdrSlotCheckOperator, PgdrWalLagOperator,
                                    PgdrWalStreamOperator)

for cluster in load_config().clusters.values():
    stream_mode = cluster.wal.mode == "stream"
    dag_id = f"pgdr_{cluster.name}_wal"
    window = cluster.wal.window_minutes
    with DAG(
        dag_id=dag_id,
        description=(f"Continuous WAL capture for PostgreSQL cluster '{cluster.name}'" if stream_mode
                     else f"Watches archive_command (push mode) of PostgreSQL cluster '{cluster.name}'"),
        schedule=CronTriggerTimetable("0 * * * *" if window == 60 else f"*/{window} * * * *",
                                      timezone=cluster.timezone),
        start_date=pendulum.datetime(2026, 1, 1, tz=cluster.timezone),
        catchup=False,
        max_active_runs=2 if stream_mode else 1,  # stream: the next run takes the slot as this one lets go
        tags=["pgdr", "wal", cluster.name],
        doc_md=__doc__,
        params={"duration_seconds": Param(None, type=["null", "integer"], minimum=1, maximum=7200,
                                          description="Stream for this long instead of one window")},
        default_args={
            "retries": 2,
            "retry_delay": timedelta(seconds=30),
            "on_failure_callback": failure_notifiers(cluster, dag_id),
        },
    ) as dag:
        lag = PgdrWalLagOperator(task_id="lag", cluster=cluster.name)
        if stream_mode:
            slot = PgdrSlotCheckOperator(task_id="slot", cluster=cluster.name)
            stream = PgdrWalStreamOperator(task_id="stream", cluster=cluster.name,
                                           duration_seconds="{{ params.duration_seconds }}",
                                           execution_timeout=timedelta(minutes=window + 10))
            trigger = TriggerDagRunOperator(task_id="trigger_full_backup",
                                            trigger_dag_id=f"pgdr_{cluster.name}_backup",
                                            trigger_run_id="pgdr_gap__{{ run_id }}", wait_for_completion=False,
                                            conf={"type": "full"})
            gap = PgdrArchiveGapOperator(task_id="archive_gap", cluster=cluster.name,
                                         retry_delay=timedelta(seconds=5))
            slot >> [stream, trigger]
            stream >> lag
            trigger >> gap
    globals()[dag_id] = dag
