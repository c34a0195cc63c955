"""Operators: each one core call, logged in operators' words, returning JSON."""

from __future__ import annotations

from functools import cached_property

from airflow.sdk import BaseOperator

from pgdr.errors import PgdrError
from pgdr.labels import make_label
from pgdr_airflow.hooks import PgdrHook


class PgdrOperator(BaseOperator):
    ui_color = "#cfe8fc"

    def __init__(self, *, cluster: str, config_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.cluster = cluster
        self.config_path = config_path

    @cached_property
    def hook(self) -> PgdrHook:
        return PgdrHook(self.cluster, self.config_path)


class PgdrCheckOperator(PgdrOperator):
    """Fails when any critical readiness check fails; logs every check."""

    def execute(self, context):
        from pgdr.check import run_check

        report = run_check(self.hook.cluster, self.hook.conn_info(), self.hook.storage())
        for c in report.checks:
            level = self.log.info if c.ok else (self.log.error if c.critical else self.log.warning)
            level("%s %s: %s", "ok  " if c.ok else ("FAIL" if c.critical else "warn"), c.name, c.detail)
        if not report.ok:
            names = ", ".join(c.name for c in report.failed())
            raise PgdrError(f"cluster '{self.cluster}' is not ready for backups: {names} failed")
        return report.to_dict()


def label_for_run(context) -> str:
    """The run's backup label: a retry of the same run gets the same label."""
    when = context.get("logical_date") or context["dag_run"].run_after
    return make_label(when)


class PgdrBackupOperator(PgdrOperator):
    """A full physical backup; idempotent per DAG run (label from the logical date)."""

    template_fields = ("backup_label",)

    def __init__(self, *, backup_label: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.backup_label = backup_label

    def execute(self, context):
        from pgdr.backup import run_backup

        label = self.backup_label or label_for_run(context)
        self.log.info("backing up cluster '%s' as %s", self.cluster, label)
        result = run_backup(self.hook.cluster, self.hook.conn_info(), self.hook.storage(), label=label)
        if result.status == "already_exists":
            self.log.info("backup %s was already committed by an earlier try of this run; kept it", label)
        return result.to_dict()
