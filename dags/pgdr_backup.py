"""
### pgdr: daily physical backup

One DAG per cluster in the pgdr config (`include/pgdr.yaml` or `$PGDR_CONFIG`).

1. **check** — the server is reachable, `wal_level`, `max_wal_senders`, replication
   privilege and `pg_hba.conf`, binaries, and repository write access.
2. **backup** — `pg_basebackup` streamed through compression and SHA-256
   into the repository; the manifest is written last. The label comes from the
   run's logical date, so a retry resumes or replaces its own backup. The
   `type` param is `auto` by default: the cluster's `backup_type_policy`
   (e.g. a full every 7 days, incrementals in between, at most `max_chain` in a
   chain; PostgreSQL 17+ with `summarize_wal = on`) decides; without a policy
   every backup is a full. `full` or `incr` force one.

On success the cluster's backups Asset is updated. Failures alert via Slack
and PagerDuty as configured. Restore from the CLI even with Airflow down:
`pgdr restore --cluster <name> --backup latest --pgdata /new/dir`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, Param

from pgdr.config import load_config
from pgdr_airflow.assets import backups_asset
from pgdr_airflow.notifiers import failure_notifiers
from pgdr_airflow.operators import PgdrBackupOperator, PgdrCheckOperator

for cluster in load_config().clusters.values():
    dag_id = f"pgdr_{cluster.name}_backup"
    with DAG(
        dag_id=dag_id,
        description=f"Daily physical backup (full or incremental) of PostgreSQL cluster '{cluster.name}'",
        schedule=CronTriggerTimetable(cluster.schedule, timezone=cluster.timezone),
        start_date=pendulum.datetime(2026, 1, 1, tz=cluster.timezone),
        catchup=False,
        max_active_runs=1,
        tags=["pgdr", "backup", cluster.name],
        doc_md=__doc__,
        params={"type": Param("auto", type="string", enum=["auto", "full", "incr"],
                              description="auto: the cluster's backup_type_policy; full or incr to force one")},
        default_args={
            "retries": 2,
            "retry_delay": timedelta(minutes=5),
            "execution_timeout": timedelta(hours=12),
            "on_failure_callback": failure_notifiers(cluster, dag_id),
        },
    ) as dag:
        check = PgdrCheckOperator(task_id="check", cluster=cluster.name)
        backup = PgdrBackupOperator(task_id="backup", cluster=cluster.name, outlets=[backups_asset(cluster.name)],
                                    backup_type="{{ params.type }}")
        check >> backup
    globals()[dag_id] = dag
