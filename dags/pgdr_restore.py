"""
### pgdr: restore (manual)

Trigger with **Trigger DAG w/ config**: the form is validated before any task
runs (a malformed label, time or LSN never reaches one).

- **backup** — `latest` or a label (`20261125-020000F`; safety backups end in `S`).
- **target** — `end_of_backup` (default), `latest` (all archived WAL),
  `immediate`, or `time` / `lsn` / `xid` / `name` with the matching field filled in.
- **pgdata**, **port** — where the restored cluster goes on the worker, and its port. The
  path must lie below one of the cluster's `restore_roots` (config); the form refuses
  anything else, and so does the core.
- **listen_addresses** — `127.0.0.1` (default): the restored server is reachable from
  the worker only.
- **dry_run** — on by default: prints the plan (which backup, which WAL range,
  how many bytes, where) and writes nothing.
- **replace** + **confirm_cluster** — a destination holding data or a running
  server is refused unless both are set. Then the backup, its key, the WAL
  and free space are checked and the destination's contents go into a safety
  backup (a real backup, listed by `pgdr list`, label ending in `S`) before
  anything in it is stopped or touched.

A refusal (bad path, no such backup, unreachable target, occupied destination)
fails the task at once, without retries, naming the reason.

Every run, dry or real, refused or done, leaves an audit record in the
repository (`<cluster>/reports/restore/`): who, which parameters, the result.
The same restore works without Airflow: `pgdr restore --cluster <name> …`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from pgdr.config import load_config
from pgdr.paths import roots_pattern
from pgdr.server import LISTEN
from pgdr_airflow.notifiers import failure_notifiers
from pgdr_airflow.operators import PgdrRestoreOperator
from pgdr_airflow.params import LSN, TARGET_ACTIONS, TARGETS, backup_param, target_time_param

for cluster in load_config().clusters.values():
    dag_id = f"pgdr_{cluster.name}_restore"
    with DAG(
        dag_id=dag_id,
        description=f"Restore PostgreSQL cluster '{cluster.name}' (manual; dry run by default)",
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz=cluster.timezone),
        catchup=False,
        max_active_runs=1,
        tags=["pgdr", "restore", cluster.name],
        doc_md=__doc__,
        params={
            "backup": backup_param("FS"),
            "target": Param("end_of_backup", type="string", enum=list(TARGETS), description="How far to recover"),
            "target_time": target_time_param("For target=time: ISO 8601 with a zone, e.g. 2026-11-25T14:03:00+00:00",
                                             format="date-time"),
            "target_lsn": Param(None, type=["null", "string"], pattern=LSN,
                                description="For target=lsn: e.g. 0/3000060"),
            "target_xid": Param(None, type=["null", "integer"], minimum=3, description="For target=xid"),
            "target_name": Param(None, type=["null", "string"], minLength=1, maxLength=63,
                                 description="For target=name: a restore point made with pg_create_restore_point()"),
            "target_action": Param("promote", type="string", enum=list(TARGET_ACTIONS)),
            "target_exclusive": Param(False, type="boolean", description="Stop just before the target"),
            "pgdata": Param(f"{cluster.restore_roots[0]}/{cluster.name}", type="string", maxLength=1024,
                            pattern=roots_pattern(cluster.restore_roots),
                            description="Destination data directory on the worker, below "
                                        + " or ".join(cluster.restore_roots)),
            "port": Param(5499, type="integer", minimum=1024, maximum=65535),
            "start": Param(True, type="boolean", description="Start the restored server (archiving off)"),
            "listen_addresses": Param("127.0.0.1", type="string", pattern=LISTEN.pattern, maxLength=256,
                                      description="Where the started server listens (default: loopback only)"),
            "dry_run": Param(True, type="boolean", description="Only print the plan"),
            "replace": Param(False, type="boolean", description="Allow replacing a non-empty destination"),
            "confirm_cluster": Param(None, type=["null", "string"], maxLength=40,
                                     description=f"Type '{cluster.name}' to confirm a replace"),
        },
        default_args={
            "retries": 2,
            "retry_delay": timedelta(minutes=1),
            "on_failure_callback": failure_notifiers(cluster, dag_id),
        },
    ) as dag:
        PgdrRestoreOperator(task_id="restore", cluster=cluster.name, execution_timeout=timedelta(hours=12))
    globals()[dag_id] = dag
