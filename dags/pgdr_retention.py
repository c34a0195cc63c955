"""
### pgdr: retention

One DAG per cluster, daily at 05:00. Keeps every backup inside the recovery
window (`retention_window_days`, default 30: any point in it stays
restorable), the backup the window starts from, at least `retention_min_full`
full backups, the newest verified backup and every pinned one (`pgdr keep`),
and the WAL they need; deletes the rest, oldest first. One unreadable manifest
stops it before anything is deleted. Each decision is logged with its reason,
and what was deleted is written to an audit record in the repository.

Manual runs are dry runs unless the form's `dry_run` is unticked; the
scheduled run deletes.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, Param

from pgdr.config import load_config
from pgdr_airflow.notifiers import failure_notifiers
from pgdr_airflow.operators import PgdrExpireOperator

for cluster in load_config().clusters.values():
    dag_id = f"pgdr_{cluster.name}_retention"
    with DAG(
        dag_id=dag_id,
        description=f"Retention for PostgreSQL cluster '{cluster.name}'",
        schedule=CronTriggerTimetable("0 5 * * *", timezone=cluster.timezone),
        start_date=pendulum.datetime(2026, 1, 1, tz=cluster.timezone),
        catchup=False,
        max_active_runs=1,
        tags=["pgdr", "retention", cluster.name],
        doc_md=__doc__,
        params={"dry_run": Param(None, type=["null", "boolean"],
                                 description="Empty: dry run when triggered by hand, real when scheduled")},
        default_args={
            "retries": 2,
            "retry_delay": timedelta(minutes=5),
            "on_failure_callback": failure_notifiers(cluster, dag_id),
        },
    ) as dag:
        PgdrExpireOperator(task_id="expire", cluster=cluster.name, dry_run="{{ params.dry_run }}")
    globals()[dag_id] = dag
