"""After each task of a pgdr DAG, in the worker that ran it (an Airflow listener, registered by pgdr_plugin):

- the cluster's catalog cache is refreshed, so the API, the page, the health endpoint and the metrics show what
  the task changed (the WAL DAG's lag task also records the lag it measured);
- the operation is recorded in the cluster's audit log (``<cluster>/reports/audit/``): the actor is the user who
  triggered the run (a manual run from the UI or API), else ``airflow`` (a scheduled run).

Neither ever fails the task: a problem is logged as a warning.
"""

from __future__ import annotations

import logging
import re
import time

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)
DAG_ID = re.compile(r"^pgdr_(?P<cluster>[a-z][a-z0-9_]*)_(?P<kind>backup|verify|retention|restore|wal|drill)$")
# (DAG kind, task id) -> audited action; other tasks (check, slot, stream…) only refresh the cache
AUDITED = {("backup", "backup"): "backup", ("verify", "verify"): "verify", ("retention", "expire"): "expire",
           ("restore", "restore"): "restore", ("drill", "drill"): "drill"}
# the last task of each DAG: its success is the run's success (a PagerDuty incident of a failed run resolves)
FINAL = {("backup", "backup"), ("verify", "verify"), ("retention", "expire"), ("restore", "restore"),
         ("wal", "lag"), ("drill", "drill"), ("drill", "report")}
REFRESH_AFTER = {("backup", "backup"), ("verify", "verify"), ("retention", "expire"), ("wal", "lag"),
                 ("drill", "drill"), ("drill", "report")}


@hookimpl
def on_task_instance_running(previous_state, task_instance):
    """With Airflow's [sentry] integration on: pgdr's context (cluster, backup label, error kind) on every event
    the task sends. The listener runs inside the Sentry scope Airflow opens around the task."""
    m = DAG_ID.fullmatch(getattr(task_instance, "dag_id", "") or "")
    if not m:
        return
    try:
        import sentry_sdk
    except ImportError:
        return
    try:
        if not sentry_sdk.get_client().is_active():
            return
        context = _context(task_instance)
        conf = dict(getattr(context.get("dag_run"), "conf", None) or {})
        label = getattr(task_instance.task, "backup_label", None)
        if not label and m["kind"] == "backup" and task_instance.task_id == "backup":
            from pgdr_airflow.operators import label_for_run

            label = label_for_run(context)
        label = label or conf.get("backup") or (conf.get("scope") if str(conf.get("scope", "")).endswith("F") else None)
        scope = sentry_sdk.get_current_scope()
        scope.set_tag("pgdr.cluster", m["cluster"])
        scope.set_tag("pgdr.dag_kind", m["kind"])
        if label:
            scope.set_tag("pgdr.backup_label", label)
        scope.set_context("pgdr", {"cluster": m["cluster"], "backup_label": label, "dag_id": task_instance.dag_id,
                                   "run_id": task_instance.run_id, "conf": conf})
        scope.add_event_processor(_error_kind)
    except Exception as e:  # noqa: BLE001 - never fail a task for its error reporting
        log.warning("pgdr: could not add pgdr's context to Sentry: %s", e)


def _error_kind(event, hint):
    """The pgdr error kind (the CLI's: integrity, locked, postgres…) of the exception, as a tag."""
    from pgdr.errors import PgdrError

    exc = (hint or {}).get("exc_info", (None, None, None))[1]
    if isinstance(exc, PgdrError):
        event.setdefault("tags", {})["pgdr.error_kind"] = exc.kind
        event.setdefault("contexts", {}).setdefault("pgdr", {})["error_kind"] = exc.kind
    return event


@hookimpl
def on_task_instance_success(previous_state, task_instance):
    _after(task_instance, "ok", None)


@hookimpl
def on_task_instance_failed(previous_state, task_instance, error):
    _after(task_instance, "failed", error)


def _after(ti, outcome: str, error) -> None:
    m = DAG_ID.fullmatch(getattr(ti, "dag_id", "") or "")
    if not m:
        return
    kind, task_id = m["kind"], ti.task_id
    action = AUDITED.get((kind, task_id))
    if action is None and (kind, task_id) not in REFRESH_AFTER:
        return
    try:
        _bookkeeping(ti, m["cluster"], kind, task_id, action, outcome, error)
    except Exception as e:  # noqa: BLE001 - bookkeeping must never fail or mask the task's own outcome
        log.warning("pgdr: could not record %s.%s in the audit log / catalog cache: %s", ti.dag_id, task_id, e)
    if outcome == "ok" and (kind, task_id) in FINAL:
        _resolve(ti, m["cluster"])


def _bookkeeping(ti, cluster_name: str, kind: str, task_id: str, action: str | None, outcome: str, error) -> None:
    from pgdr.audit import repository_exists
    from pgdr.repository import Repository
    from pgdr_airflow.hooks import PgdrHook

    started = time.monotonic()
    hook = PgdrHook(getattr(ti.task, "cluster", None) or cluster_name, getattr(ti.task, "config_path", None))
    storage = hook.storage()
    if not repository_exists(storage, hook.cluster.name):
        return  # never create a repository for the record's sake
    if action:
        _audit(ti, storage, hook.cluster.name, action, outcome, error, started)
    if (kind, task_id) in REFRESH_AFTER:
        from pgdr.catalog import refresh_catalog

        lag = _returned(ti) if (kind, task_id) == ("wal", "lag") else None
        refresh_catalog(Repository(storage, hook.cluster.name), lag=lag if isinstance(lag, dict) else None)


def _resolve(ti, cluster_name: str) -> None:
    """A success after a failed run resolves the incident the failure opened (same dedup key)."""
    try:
        from pgdr_airflow.hooks import PgdrHook
        from pgdr_airflow.notifiers import resolve_if_recovered

        previous = ti.get_previous_dagrun()
        state = str(getattr(previous, "state", "") or "") if previous is not None else None
        sent = resolve_if_recovered(PgdrHook(cluster_name, getattr(ti.task, "config_path", None)).cluster,
                                    ti.dag_id, state.rsplit(".", 1)[-1].lower() if state else None,
                                    getattr(ti, "log_url", None))
        if sent:
            log.info("pgdr: %s recovered after a failed run; resolved via %s", ti.dag_id, ", ".join(sent))
    except Exception as e:  # noqa: BLE001
        log.warning("pgdr: could not send the recovery notice for %s: %s", ti.dag_id, e)


def _audit(ti, storage, cluster: str, action: str, outcome: str, error, started: float) -> None:
    from pgdr.audit import record_operation
    from pgdr.errors import PgdrError

    dag_run = _context(ti).get("dag_run")
    actor = getattr(dag_run, "triggering_user_name", None) or "airflow"
    conf = dict(getattr(dag_run, "conf", None) or {})
    start = getattr(ti, "start_date", None)
    duration = 0.0
    if start is not None:
        from datetime import datetime, timezone

        duration = (datetime.now(timezone.utc) - start).total_seconds()
    result = _returned(ti) if outcome == "ok" else None
    summary = {k: result[k] for k in ("label", "status", "ok", "dry_run", "backup_label", "deleted_backups")
               if isinstance(result, dict) and k in result} or None
    record_operation(storage, cluster, actor=actor, actor_type="airflow" if actor != "airflow" else "scheduler",
                     source="dag", action=action,
                     parameters={"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id,
                                 "try_number": getattr(ti, "try_number", None), "conf": conf},
                     outcome=outcome, duration_seconds=duration,
                     error=getattr(error, "kind", None) if isinstance(error, PgdrError) else
                     (type(error).__name__ if isinstance(error, BaseException) else None),
                     message=str(error) if error else None, result=summary)


def _context(ti) -> dict:
    try:
        return ti.get_template_context()
    except Exception:  # noqa: BLE001
        return {}


def _returned(ti):
    try:
        return ti.xcom_pull(task_ids=ti.task_id)
    except Exception:  # noqa: BLE001
        return None
