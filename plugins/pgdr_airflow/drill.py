"""The DR drill's tasks: one core call each (pgdr.drill), state passed on as JSON XComs.

A step that finds a problem (RPO missed, a corrupt page, a wrong check result,
RTO missed) fails without retries — that is the drill's verdict, not a hiccup —
and leaves its record under the XCom key ``failure`` for the report task.
Infrastructure errors (the source or the repository unreachable) are retried.
The teardown and the report run whatever happened before them.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowFailException

from pgdr_airflow.operators import PgdrOperator

STEPS = ("mark", "restore", "validate", "measure")


class PgdrDrillOperator(PgdrOperator):
    ui_color = "#fde2c6"

    def __init__(self, *, light: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.light = light

    def plan(self, context):
        from pgdr.drill import plan_drill

        return plan_drill(self.hook.cluster, context["dag_run"].run_id, dict(context["params"]), light=self.light)


class PgdrDrillStepOperator(PgdrDrillOperator):
    """One step of the drill: ``mark``, ``restore``, ``validate`` or ``measure``."""

    def __init__(self, *, step: str, **kwargs):
        super().__init__(**kwargs)
        if step not in STEPS:
            raise ValueError(f"unknown drill step {step!r}")
        self.step = step

    def execute(self, context):
        from pgdr import drill

        ti = context["ti"]
        cluster = self.hook.cluster
        try:
            plan = self.plan(context)
            if self.step == "mark":
                out = drill.mark_moment(cluster, self.hook.conn_info(), self.hook.storage(), plan)
            elif self.step == "restore":
                from pgdr.config import config_path

                # restore_command (pgdr wal-fetch, run by the scratch server) reads the same file, by absolute path
                out = drill.restore_scratch(cluster, self.hook.storage(), plan, ti.xcom_pull(task_ids="mark"),
                                            str(config_path(self.hook.config_path).absolute()),
                                            on_scratch=lambda r: ti.xcom_push(key="scratch", value=r))
                self.log.info("scratch server up on port %s (socket %s), restored from backup %s",
                              out["port"], out["socket_dir"], out["backup"]["label"])
            elif self.step == "validate":
                out = drill.validate_scratch(cluster, plan, ti.xcom_pull(task_ids="mark"),
                                             ti.xcom_pull(task_ids="restore"))
            else:
                out = drill.measure_rto(plan, ti.xcom_pull(task_ids="restore"), ti.xcom_pull(task_ids="validate"))
        except drill.DrillFailed as e:
            ti.xcom_push(key="failure", value={**e.to_dict(), "record": e.record})
            raise AirflowFailException(f"drill step {self.step}: {e}") from None
        except Exception as e:
            ti.xcom_push(key="failure", value={"error": type(e).__name__, "cause": self.step, "message": str(e)})
            raise
        return out


class PgdrDrillTeardownOperator(PgdrDrillOperator):
    """Stops the scratch server and removes the run's directory, whatever happened before (trigger rule
    all_done); after ``keep_minutes`` when the form asks for a look first."""

    def execute(self, context):
        from pgdr.drill import teardown

        try:
            ti = context["ti"]
            restored = ti.xcom_pull(task_ids="restore") or ti.xcom_pull(task_ids="restore", key="scratch")
            return teardown(self.hook.cluster, self.plan(context), restored=restored)
        except Exception as e:
            context["ti"].xcom_push(key="failure", value={"error": type(e).__name__, "cause": "teardown",
                                                          "message": str(e)})
            raise


class PgdrDrillReportOperator(PgdrDrillOperator):
    """Writes the drill's report into the repository, ends the log with the summary table, and fails
    (so the alert goes out, once, with backup, RTO, RPO and the failed check) when the drill failed."""

    def execute(self, context):
        from pgdr.drill import make_report, render_summary, summary_line, write_report
        from pgdr.results import iso

        ti = context["ti"]
        plan = self.plan(context)
        steps, errors = {}, {}
        for task_id in STEPS + ("teardown",):
            value = ti.xcom_pull(task_ids=task_id)
            failure = ti.xcom_pull(task_ids=task_id, key="failure")
            if value is not None:
                steps[task_id] = value
            elif failure:
                errors[task_id] = failure
        for task_id in STEPS:  # a step that left neither a result nor a failure was killed or timed out
            if task_id not in steps:
                if task_id not in errors and not errors:
                    errors[task_id] = {"cause": task_id, "message": f"step {task_id} did not complete"}
                break
        if "teardown" not in steps and "teardown" not in errors:
            errors["teardown"] = {"cause": "teardown", "message": "the teardown did not complete"}
        start = getattr(context["dag_run"], "start_date", None)
        report = make_report(self.hook.cluster, plan, steps, errors, iso(start) if start else None)
        write_report(self.hook.storage(), report)
        for line in render_summary(report).splitlines():
            self.log.info("%s", line)
        line = summary_line(report)
        ti.xcom_push(key="alert", value={"summary": line, "backup": (report.backup or {}).get("label"),
                                         "rto_seconds": report.rto.get("total_seconds"),
                                         "rpo_seconds": report.rpo.get("seconds"),
                                         "failed": [f["cause"] for f in report.failures], "report": report.key})
        if not report.ok:
            raise AirflowFailException(line)
        return report.to_dict()
