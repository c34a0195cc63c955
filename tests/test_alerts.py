"""Alerts, captured by local HTTP servers: Sentry through Airflow's own [sentry] integration with pgdr's context
on the event (the real envelope, a local server as the DSN's host); PagerDuty resolving the incident when a run
succeeds after a failed one (same dedup key); Slack messages that link to the run and say what to do next."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import ROOT, write_config
from test_dags import airflow_db, capture, connections, load_dag_module  # noqa: F401


class SentryServer:
    """Receives what sentry-sdk sends to a DSN's host: envelopes, parsed into their items."""

    def __init__(self):
        self.envelopes: list[list[tuple[dict, object]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding == "br":
                    import brotli

                    body = brotli.decompress(body)
                if self.path.endswith("/envelope/"):
                    outer.envelopes.append(parse_envelope(body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict]:
        return [payload for env in self.envelopes for header, payload in env if header.get("type") == "event"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def parse_envelope(body: bytes) -> list[tuple[dict, object]]:
    """Sentry's envelope format: a header line, then (item header line, payload) pairs."""
    lines = body.split(b"\n")
    items, i = [], 1
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        header = json.loads(lines[i])
        payload = lines[i + 1] if i + 1 < len(lines) else b""
        try:
            payload = json.loads(payload)
        except ValueError:
            pass
        items.append((header, payload))
        i += 2
    return items


SENTRY_RUN = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pgdr_verify_sentry", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
dag = mod.pgdr_app_verify
for t in dag.tasks:
    t.retries = 0
run = dag.test(run_conf={"scope": "20200101-000000F"})
import sentry_sdk
sentry_sdk.flush(10)
print("STATE", run.state)
"""


def test_sentry_event_carries_pgdrs_context(airflow_db, tmp_path):  # noqa: F811
    """A verify run of a backup that does not exist fails with pgdr's backup_not_found; the event Airflow's
    Sentry integration sends carries Airflow's tags and pgdr's cluster, backup label and error kind."""
    sentry = SentryServer()
    try:
        config = write_config(tmp_path / "pgdr.yaml", {"app": {"repository": f"file://{tmp_path}/repo"}})
        (tmp_path / "repo").mkdir()
        env = {**os.environ, "PGDR_CONFIG": str(config), "AIRFLOW__SENTRY__SENTRY_ON": "True",
               "AIRFLOW__SENTRY__SENTRY_DSN": f"http://publickey@127.0.0.1:{sentry.port}/42",
               "AIRFLOW__SENTRY__ENVIRONMENT": "pgdr-test"}
        proc = subprocess.run([sys.executable, "-c", SENTRY_RUN, str(ROOT / "dags" / "pgdr_verify.py")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert "STATE failed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
        events = sentry.events()
        assert events, f"no Sentry event received: {sentry.envelopes}\n{proc.stderr[-3000:]}"
        event = next(e for e in events if e.get("exception"))
        tags = event["tags"]
        assert tags["dag_id"] == "pgdr_app_verify" and tags["task_id"] == "verify"  # Airflow's own
        assert tags["pgdr.cluster"] == "app" and tags["pgdr.backup_label"] == "20200101-000000F"
        assert tags["pgdr.error_kind"] == "backup_not_found"
        assert event["exception"]["values"][-1]["type"] == "BackupNotFound"
        assert event["contexts"]["pgdr"]["cluster"] == "app" and event["environment"] == "pgdr-test"
    finally:
        sentry.close()


@pytest.fixture
def pagerduty_at(monkeypatch, capture):  # noqa: F811
    import pagerduty

    # The PagerDuty client insists on https; point it at the capture server in-process.
    monkeypatch.setattr(pagerduty.EventsApiV2Client, "url",
                        property(lambda self: capture.url, lambda self, v: None), raising=False)
    return capture


def test_success_after_failure_resolves_the_incident_and_slack_says_what_next(airflow_db, monkeypatch,  # noqa: F811
                                                                              pagerduty_at, pg18, tmp_path):
    capture = pagerduty_at

    class Dead:
        port = 1  # nothing listens there

    config = write_config(tmp_path / "pgdr.yaml", {"app": {
        "conn_id": "pgdr_app", "repository": f"file://{tmp_path}/repo",
        "alerts": {"slack_conn_id": "pgdr_slack", "pagerduty_conn_id": "pgdr_pagerduty"}}})
    connections(monkeypatch, Dead, capture_url=capture.url)
    dag = load_dag_module(monkeypatch, config).pgdr_app_backup
    for t in dag.tasks:
        t.retries = 0
    assert dag.test().state == "failed"
    slack = [r for r in capture.requests if r["path"].startswith("/slack")]
    assert len(slack) == 1
    text = slack[0]["body"]["text"]
    assert "pgdr_app_backup failed at task check for cluster 'app'" in text
    assert "Run: http" in text and "/dags/pgdr_app_backup/runs/" in text  # a link to the failed run's task
    assert "Next: The last good backup is still restorable. Run `pgdr check --cluster app`" in text
    trigger = [r["body"] for r in capture.requests if r["path"] == "/v2/enqueue"]
    assert [e["event_action"] for e in trigger] == ["trigger"]

    connections(monkeypatch, pg18, capture_url=capture.url)  # the server is back
    assert dag.test().state == "success"
    events = [r["body"] for r in capture.requests if r["path"] == "/v2/enqueue"]
    assert [e["event_action"] for e in events] == ["trigger", "resolve"]
    assert events[1]["dedup_key"] == events[0]["dedup_key"] == "pgdr/app/pgdr_app_backup"
    slack = [r["body"]["text"] for r in capture.requests if r["path"].startswith("/slack")]
    assert len(slack) == 2 and "pgdr_app_backup recovered for cluster 'app'" in slack[1]

    assert dag.test().state == "success"  # a success after a success resolves nothing more
    assert len([r for r in capture.requests if r["path"] == "/v2/enqueue"]) == 2
