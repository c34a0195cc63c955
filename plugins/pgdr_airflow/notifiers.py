"""Failure alerts for every pgdr DAG, routed by the cluster's config."""

from __future__ import annotations

from pgdr.config import ClusterConfig

SUMMARY = ("pgdr: {{ dag.dag_id }} failed at task {{ ti.task_id }} for cluster '%s' "
           "(run {{ run_id }}, try {{ ti.try_number }}): {{ exception }}")


def dedup_key(cluster: str, dag_id: str) -> str:
    return f"pgdr/{cluster}/{dag_id}"


def failure_notifiers(cluster: ClusterConfig, dag_id: str, summary: str = SUMMARY, details: dict | None = None) -> list:
    """Slack and PagerDuty notifiers for this cluster; empty when none are configured."""
    out = []
    alerts = cluster.alerts
    if alerts.slack_conn_id:
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        out.append(SlackWebhookNotifier(slack_webhook_conn_id=alerts.slack_conn_id,
                                        text=summary % cluster.name + slack_next_steps(cluster.name, dag_id)))
    if alerts.pagerduty_conn_id:
        from airflow.providers.pagerduty.notifications.pagerduty import PagerdutyNotifier

        out.append(PagerdutyNotifier(
            pagerduty_events_conn_id=alerts.pagerduty_conn_id,
            summary=summary % cluster.name,
            severity=alerts.severity,
            source=f"pgdr/{cluster.name}",
            component="postgresql",
            group=f"pgdr/{cluster.name}",
            class_type=dag_id,
            dedup_key=dedup_key(cluster.name, dag_id),
            custom_details={"cluster": cluster.name, "dag_id": dag_id, "run_id": "{{ run_id }}",
                            "task_id": "{{ ti.task_id }}", "log_url": "{{ ti.log_url }}", **(details or {})},
        ))
    return out


DRILL_SUMMARY = "pgdr: DR drill {{ dag.dag_id }} of cluster '%s' failed (run {{ run_id }}): {{ exception }}"


def drill_notifiers(cluster: ClusterConfig, dag_id: str) -> list:
    """The drill's alert, sent once per failed drill by its report task: backup, RTO, RPO and the failed check
    are in the summary (the exception) and in PagerDuty's custom details."""
    pull = "{{ ti.xcom_pull(task_ids='report', key='alert') or {} }}"
    return failure_notifiers(cluster, dag_id, DRILL_SUMMARY, {"drill": pull})


def drill_step_failed(context) -> None:
    """A drill step's failure is reported (and alerted, once, with the whole summary) by the report task."""
    import logging

    logging.getLogger(__name__).info("drill step %s failed; the report task records it and alerts",
                                     context["ti"].task_id)


# What to do next, per DAG, in the Slack message (after the summary and a link to the failed task's log).
NEXT_STEPS = {
    "backup": "The last good backup is still restorable. Run `pgdr check --cluster {c}` and fix what it reports, "
              "then trigger pgdr_{c}_backup again.",
    "wal": "Point-in-time recovery is at risk past the RPO. Run `pgdr wal-lag --cluster {c}`; check the "
           "replication slot and that pgdr_{c}_wal is unpaused; a gap needs a new full backup.",
    "verify": "Do not rely on the backup named above. Run `pgdr verify --cluster {c} --backup all` and take a new "
              "backup (trigger pgdr_{c}_backup).",
    "retention": "Nothing was deleted after the failure (deletion fails closed). Run `pgdr expire --cluster {c} "
                 "--dry-run` to see the plan and what stopped it.",
    "restore": "The destination was left as the log says. Read the task log, fix the cause, and run the restore "
               "DAG again (dry run first).",
    "drill": "The last drill did not prove recovery. Read the drill report (Disaster recovery page), fix the "
             "cause, and trigger pgdr_{c}_drill again.",
}


def slack_next_steps(cluster: str, dag_id: str) -> str:
    kind = "drill" if dag_id.endswith(("_drill", "_drill_new_backup")) else dag_id.rsplit("_", 1)[-1]
    step = NEXT_STEPS.get(kind, "Read the task log.").format(c=cluster)
    return "\nRun: {{ ti.log_url }}\nNext: " + step


def resolve_if_recovered(cluster: ClusterConfig, dag_id: str, previous_state: str | None, run_url: str | None = None):
    """After a successful run: when the run before it failed, resolve the PagerDuty incident it opened (same
    dedup key) and tell Slack. Returns what was sent, e.g. ["pagerduty", "slack"]."""
    if previous_state != "failed":
        return []
    sent = []
    alerts = cluster.alerts
    summary = f"pgdr: {dag_id} recovered for cluster '{cluster.name}': this run succeeded after a failed one"
    if alerts.pagerduty_conn_id:
        from airflow.providers.pagerduty.hooks.pagerduty_events import PagerdutyEventsHook

        PagerdutyEventsHook(pagerduty_events_conn_id=alerts.pagerduty_conn_id).send_event(
            summary=summary, severity=alerts.severity, source=f"pgdr/{cluster.name}", action="resolve",
            dedup_key=dedup_key(cluster.name, dag_id))
        sent.append("pagerduty")
    if alerts.slack_conn_id:
        from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook

        SlackWebhookHook(slack_webhook_conn_id=alerts.slack_conn_id).send_text(
            summary + (f"\nRun: {run_url}" if run_url else ""))
        sent.append("slack")
    return sent
