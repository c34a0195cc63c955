"""Operators: each one core call, logged in operators' words, returning JSON."""

from __future__ import annotations

from functools import cached_property

from airflow.sdk import BaseBranchOperator, BaseOperator

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
    """A physical backup (full, incr, or auto: the cluster's backup_type_policy decides); idempotent per DAG
    run (label from the logical date)."""

    template_fields = ("backup_label", "backup_type")

    def __init__(self, *, backup_label: str | None = None, backup_type: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.backup_label = backup_label
        self.backup_type = backup_type

    def execute(self, context):
        from pgdr.backup import run_backup

        label = self.backup_label or label_for_run(context)
        if self.backup_label:
            self.log.info("backing up cluster '%s' as %s", self.cluster, label)
        else:
            self.log.info("backing up cluster '%s' as %s: the label is this run's schedule slot (logical date %s), "
                          "so a retry finds its own backup; the manifest records when it is really taken",
                          self.cluster, label, context.get("logical_date") or context["dag_run"].run_after)
        result = run_backup(self.hook.cluster, self.hook.conn_info(), self.hook.storage(), label=label,
                            backup_type=self.backup_type or "auto")
        if result.status == "already_exists":
            self.log.info("backup %s was already committed by an earlier try of this run; kept it", result.label)
        elif result.type_reason:
            self.log.info("backup %s is %s: %s", result.label, "an incremental" if result.type == "incr" else "a full",
                          result.type_reason)
        return result.to_dict()


class PgdrSlotCheckOperator(BaseBranchOperator):
    """Returns the task to run next: ``stream``, or ``trigger_full_backup`` when WAL was lost.

    WAL is lost when PostgreSQL invalidated the slot, or when the slot is missing
    (dropped, or gone after a failover) while the archive already holds WAL the new
    slot does not continue. The slot is created again so capture resumes with the
    next run, the gap's LSN range goes to the ``archive_gap`` task (which fails, so
    the alerts fire), and a new full backup is the only way to restore past it.
    """

    def __init__(self, *, cluster: str, config_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.cluster = cluster
        self.config_path = config_path

    def choose_branch(self, context):
        from pgdr.walstream import prepare_slot

        hook = PgdrHook(self.cluster, self.config_path)
        state = prepare_slot(hook.cluster, hook.conn_info(), hook.storage())
        context["ti"].xcom_push(key="slot_state", value=state.to_dict())
        if state.status == "gap":
            self.log.error("%s; triggering a full backup", state.detail)
            return "trigger_full_backup"
        (self.log.warning if state.status == "recreated" else self.log.info)("%s", state.detail)
        return "stream"


class PgdrWalStreamOperator(PgdrOperator):
    """Streams WAL for one window and a margin, handing over to the next run as soon as it waits
    for the slot (windows overlap; the slot keeps WAL in between, and advances only past what
    the repository holds)."""

    template_fields = ("duration_seconds",)
    HANDOVER_MARGIN = 120  # seconds past the window: the next run normally takes over before

    def __init__(self, *, duration_seconds=None, **kwargs):
        super().__init__(**kwargs)
        self.duration_seconds = duration_seconds
        self._stop = None

    def execute(self, context):
        import threading

        from pgdr.walstream import WalStreamer

        cluster = self.hook.cluster
        duration = float(self.duration_seconds) if self.duration_seconds not in (None, "", "None") \
            else cluster.wal.window_minutes * 60 + self.HANDOVER_MARGIN
        self._stop = threading.Event()
        streamer = WalStreamer(cluster, self.hook.conn_info(), self.hook.storage(),
                               partial_interval=cluster.wal.partial_interval_seconds)
        result = streamer.run(duration, self._stop)
        self.log.info("streamed %s..%s (%s): %d segments archived, %d partial uploads, slot confirmed to %s, "
                      "lag %s bytes", result.start_lsn, result.received_lsn, result.stopped_because,
                      result.segments_archived, result.partial_uploads, result.confirmed_lsn, result.lag_bytes)
        return result.to_dict()

    def on_kill(self):
        if self._stop is not None:
            self._stop.set()


class PgdrWalLagOperator(PgdrOperator):
    """Fails (so the alerts fire) when WAL capture is behind the RPO target, the slot is unhealthy
    (stream mode) or archive_command is failing (push mode, from pg_stat_archiver)."""

    def execute(self, context):
        from pgdr.walstream import measure_lag

        report = measure_lag(self.hook.cluster, self.hook.conn_info(), self.hook.storage())
        self.log.info("%s mode: server at %s, archive at %s: lag %s bytes, %s s (RPO %s s)", report.mode,
                      report.server_lsn, report.archived_lsn, report.lag_bytes, report.lag_seconds,
                      report.rpo_seconds)
        if report.archiver:
            self.log.info("pg_stat_archiver: %s", report.archiver)
        if not report.ok:
            raise PgdrError(f"cluster '{self.cluster}': " + "; ".join(report.problems))
        return report.to_dict()


class PgdrArchiveGapOperator(PgdrOperator):
    """Always fails, naming the gap the slot check found: the alert that follows lost WAL."""

    def execute(self, context):
        state = context["ti"].xcom_pull(task_ids="slot", key="slot_state") or {}
        detail = state.get("detail") or "the replication slot was invalidated or missing"
        where = (f" (WAL {state.get('gap_from') or 'before'}..{state.get('gap_to')} is not archived)"
                 if state.get("gap_to") else "")
        raise PgdrError(f"cluster '{self.cluster}': the WAL archive has a gap{where}: {detail}. Point-in-time "
                        "restore across it is impossible. A full backup was triggered; until it completes, "
                        "restores can only reach the WAL before the gap.")


def recovery_target_from_params(params: dict):
    """The form's target fields as a RecoveryTarget (None: restore to the end of the backup)."""
    from pgdr.errors import UsageError
    from pgdr.recovery import RecoveryTarget

    from pgdr_airflow.params import TARGETS

    kind = params.get("target") or "end_of_backup"
    if kind == "end_of_backup":
        return None
    if kind not in TARGETS:
        raise UsageError(f"target {kind!r} is not one of {', '.join(TARGETS)}")
    value = None
    if kind in ("time", "lsn", "xid", "name"):
        value = params.get(f"target_{kind}")
        if value in (None, ""):
            raise UsageError(f"target '{kind}' needs the target_{kind} field filled in")
        value = str(value)
    return RecoveryTarget(kind, value, params.get("target_action") or "promote", None,
                          bool(params.get("target_exclusive")))


class PgdrRestoreOperator(PgdrOperator):
    """A restore from the Params form: one call to the core's guarded restore (``pgdr.replace``).

    A dry run (the default) logs and returns the plan. A destination holding data or a running server is
    refused unless the form says ``replace`` and repeats the cluster name; the core then checks everything
    and takes a safety backup before touching it. A refusal (bad path, no such backup, unreachable target,
    occupied destination) fails the task at once with its one-line reason: retrying cannot change it.
    """

    def execute(self, context):
        from pgdr.errors import BackupNotFound, RestoreRefused, UsageError
        from pgdr.replace import restore_request

        params = dict(context["params"])
        dag_run = context["dag_run"]
        who = getattr(dag_run, "triggering_user_name", None) or str(getattr(dag_run, "run_type", "unknown"))
        requested_by = {"dag_id": dag_run.dag_id, "run_id": dag_run.run_id, "triggered_by": who, "params": params}
        cluster = self.hook.cluster
        storage = self.hook.storage()
        try:
            result = restore_request(
                cluster, storage, params.get("backup") or "latest", params.get("pgdata"),
                replace=bool(params.get("replace")), confirm=params.get("confirm_cluster"),
                dry_run=bool(params.get("dry_run")), recovery_target=recovery_target_from_params(params),
                requested_by=requested_by, start=bool(params.get("start")), port=params.get("port"),
                config_path=self.hook.config_path or None, listen=params.get("listen_addresses"))
        except (RestoreRefused, UsageError, BackupNotFound) as e:
            self.log.error("restore refused: %s", e)
            raise _fail(f"restore refused: {e}") from None
        if isinstance(result, dict):  # a dry run: the core logged its plan
            return result
        return result.to_dict()


def _fail(message: str):
    """Airflow's "fail now, do not retry" exception (the Task SDK's in Airflow 3)."""
    try:
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:  # Airflow 2
        from airflow.exceptions import AirflowFailException
    return AirflowFailException(message)


class PgdrVerifyOperator(PgdrOperator):
    """Verifies what a new backup brought (asset-triggered runs) or everything (the weekly sweep).

    Fails, naming each damaged object and check, so the alerts fire.
    """

    template_fields = ("scope",)

    def __init__(self, *, scope: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.scope = scope

    def execute(self, context):
        from pgdr.verify import run_verify

        scope = self.scope or ("new" if "asset" in str(context["dag_run"].run_type).lower() else "all")
        report = run_verify(self.hook.cluster, self.hook.storage(), scope)
        for b in report.backups:
            self.log.info("backup %s: %s (%.1f MB read, pg_verifybackup %s)", b["label"],
                          "verified" if b["ok"] else "FAILED", b["bytes_read"] / 1e6, b["pg_verifybackup"])
        self.log.info("verified %s: %.1f MB read in all", scope, report.bytes_read / 1e6)
        if not report.ok:
            problems = [f"{f['object']}: {f['check']} ({f['detail']})"
                        for b in report.backups for f in b["failures"]]
            problems += [f"{f['object']}: {f['check']}" for f in (report.wal or {}).get("failures", [])]
            raise PgdrError(f"cluster '{self.cluster}': verification failed: " + "; ".join(problems[:10]))
        return report.to_dict()


class PgdrExpireOperator(PgdrOperator):
    """Applies the retention policy. Manual runs are dry runs unless the form says otherwise."""

    template_fields = ("dry_run",)

    def __init__(self, *, dry_run=None, **kwargs):
        super().__init__(**kwargs)
        self.dry_run = dry_run

    def execute(self, context):
        from datetime import datetime, timezone

        from pgdr.retention import RetentionPolicy, run_expire

        dry = self.dry_run
        if dry in (None, "", "None"):
            dry = "manual" in str(context["dag_run"].run_type).lower()
        elif isinstance(dry, str):
            dry = dry.lower() == "true"
        cluster = self.hook.cluster
        result = run_expire(cluster, self.hook.storage(),
                            RetentionPolicy(cluster.retention_window_days, cluster.retention_min_full),
                            datetime.now(timezone.utc), dry)
        for d in result["plan"]["decisions"]:
            self.log.info("%s %s: %s", "would expire" if dry and d["action"] == "expire" else d["action"],
                          d["label"], d["reason"])
        self.log.info("%s: %d backups expired, %d WAL segments deleted", "DRY RUN" if dry else "retention",
                      len(result["deleted_backups"]), len(result["deleted_wal_segments"]))
        return result
