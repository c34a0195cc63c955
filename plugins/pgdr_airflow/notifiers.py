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

        out.append(SlackWebhookNotifier(slack_webhook_conn_id=alerts.slack_conn_id, text=summary % cluster.name))
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
