"""
### pgdr: disaster-recovery drill

Quarterly by default (00:00 on 1 January, April, July and October in the
cluster's time zone; `drill.schedule` in the config), and by hand with
**Trigger DAG w/ config** (the form submits as it is, with the defaults):

1. **mark** — a restore point `pgdr-drill-<run>` on the source (or, without the
   privilege, the current LSN), after the canary row when `drill.canary` is set;
   then waits until the repository holds WAL past it. That wait is the
   measured **RPO**; past `rpo_seconds` the drill fails.
2. **restore** — the backup plus WAL up to the mark, through the same restore a
   real one uses, into `drill.scratch_dir` (free space checked first); started
   on a free port, loopback only, socket access only, archiving off.
3. **validate** — promoted; the mark reached (timeline switch LSN >= marked LSN);
   `pg_amcheck` of every database beside a full read (`pg_dump` to nowhere) of
   each, in parallel; the user checks of `drill.checks`; the canary row.
4. **measure** — **RTO** by phase (restore, WAL replay, start and promotion,
   validation); past `rto_seconds` the drill fails.
5. **teardown** — always: stops the scratch server (after `keep_minutes`, if
   asked) and removes its directory. **report** — always: the JSON report in
   the repository (`<cluster>/reports/drill/`, `pgdr drills` lists them), a
   summary table at the end of its log, and one alert when the drill failed.

The same drill runs without Airflow: `pgdr drill --cluster <name>`.
With `drill.on_new_backup: true`, `pgdr_<cluster>_drill_new_backup` restores,
starts and queries every new backup (no mark, no amcheck or full read).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, CronTriggerTimetable, Param

from pgdr.config import load_config
from pgdr.drill import VALIDATIONS
from pgdr_airflow.assets import backups_asset
from pgdr_airflow.drill import PgdrDrillReportOperator, PgdrDrillStepOperator, PgdrDrillTeardownOperator
from pgdr_airflow.notifiers import drill_notifiers, drill_step_failed, failure_notifiers
from pgdr_airflow.params import backup_param, target_time_param

for cluster in load_config().clusters.values():
    d = cluster.drill
    for light in (False, True) if d.on_new_backup else (False,):
        dag_id = f"pgdr_{cluster.name}_drill" + ("_new_backup" if light else "")
        default_args = {"retries": 2, "retry_delay": timedelta(minutes=1), "on_failure_callback": drill_step_failed}
        if d.queue:
            default_args["queue"] = d.queue
        with DAG(
            dag_id=dag_id,
            description=(f"Restore, start and query each new backup of '{cluster.name}'" if light else
                         f"Quarterly DR drill of PostgreSQL cluster '{cluster.name}': restore, validate, RTO/RPO"),
            schedule=[backups_asset(cluster.name)] if light else
            CronTriggerTimetable(d.schedule, timezone=cluster.timezone),
            start_date=pendulum.datetime(2026, 1, 1, tz=cluster.timezone),
            catchup=False,
            max_active_runs=1,
            tags=["pgdr", "drill", cluster.name],
            doc_md=__doc__,
            params={
                "backup": backup_param("F"),  # a drill proves real backups, not safety copies
                "target_time": target_time_param("Restore to this point in time instead of a fresh mark "
                                                 "(ISO 8601 with a zone; no RPO is measured then)"),
                "validations": Param(list(VALIDATIONS), type="array", uniqueItems=True,
                                     items={"type": "string", "enum": list(VALIDATIONS)},
                                     description="Which validations to run besides 'server up and target reached'"),
                "heapallindexed": Param(d.heapallindexed, type="boolean",
                                        description="pg_amcheck --heapallindexed (slower)"),
                "keep_minutes": Param(d.keep_minutes, type="integer", minimum=0, maximum=1440,
                                      description="Keep the scratch server up this long for a person to look"),
            },
            default_args=default_args,
        ) as dag:
            common = {"cluster": cluster.name, "light": light}
            work = timedelta(minutes=d.timeout_minutes)
            mark = PgdrDrillStepOperator(task_id="mark", step="mark", execution_timeout=timedelta(hours=1), **common)
            restore = PgdrDrillStepOperator(task_id="restore", step="restore", execution_timeout=work, **common)
            validate = PgdrDrillStepOperator(task_id="validate", step="validate", execution_timeout=work, **common)
            measure = PgdrDrillStepOperator(task_id="measure", step="measure",
                                            execution_timeout=timedelta(minutes=5), **common)
            teardown = PgdrDrillTeardownOperator(task_id="teardown", trigger_rule="all_done",
                                                 execution_timeout=timedelta(minutes=1440 + 30),
                                                 on_failure_callback=failure_notifiers(cluster, dag_id), **common)
            report = PgdrDrillReportOperator(task_id="report", trigger_rule="all_done",
                                             execution_timeout=timedelta(minutes=10),
                                             on_failure_callback=drill_notifiers(cluster, dag_id), **common)
            mark >> restore >> validate >> measure >> teardown >> report
        globals()[dag_id] = dag
