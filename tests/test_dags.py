"""The Airflow layer for real: DAG integrity, the backup DAG run with dag.test()
against real PostgreSQL and S3 servers, and failure alerts captured over HTTP."""

from __future__ import annotations

import importlib.util
import itertools
import json

import pytest

from capture import CaptureServer
from helpers import ROOT, pgdr, table_hashes, write_config
from test_backup_restore import restore_and_start

_n = itertools.count()


@pytest.fixture(scope="session")
def airflow_db():
    from airflow.utils import db

    db.resetdb()
    yield


@pytest.fixture
def capture():
    server = CaptureServer()
    yield server
    server.close()


def load_dag_module(monkeypatch, config, name="pgdr_backup"):
    monkeypatch.setenv("PGDR_CONFIG", str(config))
    spec = importlib.util.spec_from_file_location(f"{name}_{next(_n)}", ROOT / "dags" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def connections(monkeypatch, pg, s3_server=None, capture_url=None):
    conn = {"conn_type": "postgres", "host": "127.0.0.1", "port": pg.port, "login": "postgres", "schema": "postgres"}
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_APP", json.dumps(conn))
    if s3_server:
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_S3", json.dumps({
            "conn_type": "aws", "login": "testing", "password": "testing",
            "extra": {"endpoint_url": s3_server, "region_name": "us-east-1"}}))
    if capture_url:
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_SLACK", json.dumps({
            "conn_type": "slackwebhook", "host": capture_url + "/slack", "password": "T000/B000/XXXX"}))
        monkeypatch.setenv("AIRFLOW_CONN_PGDR_PAGERDUTY", json.dumps({
            "conn_type": "pagerduty_events", "password": "routing-key-123"}))


def dag_and_cli_configs(workdir, name, pg, repo):
    """One repository seen two ways: the DAGs' config (Airflow connection) and the CLI's (a DSN)."""
    return (write_config(workdir / f"{name}.yaml", {"app": {"conn_id": "pgdr_app", "repository": repo}}),
            write_config(workdir / f"{name}-cli.yaml", {"app": {"dsn": pg.dsn, "repository": repo}}))


def test_dag_integrity(monkeypatch, tmp_path):
    """Every DAG file imports with connection and variable lookups made to fail."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import BaseHook, Variable

    def refuse(*a, **k):
        raise AssertionError("DAG files must not look up connections or variables at import time")

    monkeypatch.setattr(BaseHook, "get_connection", classmethod(refuse))
    monkeypatch.setattr(Variable, "get", staticmethod(refuse))
    config = write_config(tmp_path / "pgdr.yaml", {
        "app": {"conn_id": "pgdr_app", "repository": "file:///srv/pgdr"},
        "billing": {"conn_id": "pgdr_billing", "repository": {"url": "s3://b/p", "aws_conn_id": "s3"},
                    "schedule": "15 3 * * *", "timezone": "Europe/Berlin"},
    }, alerts={"slack_conn_id": "pgdr_slack", "pagerduty_conn_id": "pgdr_pagerduty"})
    monkeypatch.setenv("PGDR_CONFIG", str(config))
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert {"pgdr_app_backup", "pgdr_billing_backup", "pgdr_app_wal", "pgdr_app_restore", "pgdr_app_verify",
            "pgdr_app_retention"} <= set(bag.dag_ids)
    for dag_id, dag in bag.dags.items():
        assert "pgdr" in dag.tags and dag.doc_md, dag_id
        assert dag.max_active_runs == (2 if dag_id.endswith("_wal") else 1) and dag.catchup is False
        for task in dag.tasks:
            assert task.retries >= 2, f"{dag_id}.{task.task_id}"
            assert task.on_failure_callback, f"{dag_id}.{task.task_id} has no failure alert"
    billing = bag.dags["pgdr_billing_backup"]
    assert (billing.timetable.expression, str(billing.timetable.timezone)) == ("15 3 * * *", "Europe/Berlin")
    assert [o.name for o in bag.dags["pgdr_app_backup"].get_task("backup").outlets] == ["pgdr_app_backups"]


def test_broken_config_is_a_dag_import_error(monkeypatch, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    (tmp_path / "pgdr.yaml").write_text("clusters:\n  app:\n    repository: ftp://nope\n")
    monkeypatch.setenv("PGDR_CONFIG", str(tmp_path / "pgdr.yaml"))
    bag = DagBag(dag_folder=str(ROOT / "dags" / "pgdr_backup.py"))
    (err,) = bag.import_errors.values()
    assert "clusters.app.repository.url" in err and "pgdr.yaml" in err


def test_backup_dag_backs_up_to_s3_and_the_cli_restores_it(airflow_db, monkeypatch, pg18, s3_server, s3_bucket,
                                                           tmp_path, workdir):
    connections(monkeypatch, pg18, s3_server)
    repo = {"url": f"s3://{s3_bucket}/airflow", "aws_conn_id": "pgdr_s3", "region": "us-east-1"}
    config = write_config(tmp_path / "pgdr.yaml", {"app": {"conn_id": "pgdr_app", "repository": repo}})
    dag = load_dag_module(monkeypatch, config).pgdr_app_backup
    before = table_hashes(pg18)
    run = dag.test()
    assert run.state == "success"

    # The CLI, with no Airflow involved, finds and restores what the DAG wrote
    # (credentials from the environment, endpoint from the config).
    cli_config = write_config(tmp_path / "cli.yaml", {"app": {
        "dsn": pg18.dsn, "repository": {**repo, "endpoint_url": s3_server, "aws_conn_id": None}}})
    code, listing, err = pgdr("--json", "list", "--cluster", "app", config=cli_config)
    assert code == 0, err
    (backup,) = listing["backups"]
    assert backup["status"] == "ok"
    from pgdr.labels import make_label

    assert backup["label"] == make_label(run.logical_date)  # label derives from the run
    restored, _ = restore_and_start(cli_config, workdir, pg18)
    try:
        assert table_hashes(restored) == before
    finally:
        restored.destroy()

    # A second run for the same logical date (a retry) does not add a backup.
    from pgdr_airflow.operators import PgdrBackupOperator

    result = PgdrBackupOperator(task_id="again", cluster="app").execute({"logical_date": run.logical_date})
    assert result["status"] == "already_exists" and result["label"] == backup["label"]


def test_failure_alerts_reach_slack_and_pagerduty(airflow_db, monkeypatch, capture, tmp_path):
    import pagerduty

    # The PagerDuty client insists on https; point it at the capture server in-process.
    monkeypatch.setattr(pagerduty.EventsApiV2Client, "url",
                        property(lambda self: capture.url, lambda self, v: None), raising=False)

    class Dead:
        port = 1  # nothing listens there

    connections(monkeypatch, Dead, capture_url=capture.url)
    config = write_config(tmp_path / "pgdr.yaml", {"app": {
        "conn_id": "pgdr_app", "repository": f"file://{tmp_path}/repo",
        "alerts": {"slack_conn_id": "pgdr_slack", "pagerduty_conn_id": "pgdr_pagerduty", "severity": "critical"}}})
    dag = load_dag_module(monkeypatch, config).pgdr_app_backup
    for t in dag.tasks:
        t.retries = 0  # fail now rather than after retry delays
    run = dag.test()
    assert run.state == "failed"

    slack = [r for r in capture.requests if r["path"].startswith("/slack")]
    pd = [r for r in capture.requests if r["path"] == "/v2/enqueue"]
    assert len(slack) == 1 and len(pd) == 1, capture.requests
    assert slack[0]["path"] == "/slack/T000/B000/XXXX"
    text = slack[0]["body"]["text"]
    assert "pgdr_app_backup failed at task check for cluster 'app'" in text and "not ready for backups" in text
    event = pd[0]["body"]
    assert event["routing_key"] == "routing-key-123" and event["event_action"] == "trigger"
    assert event["dedup_key"] == "pgdr/app/pgdr_app_backup"
    assert event["payload"]["severity"] == "critical" and event["payload"]["source"] == "pgdr/app"
    assert "pgdr_app_backup failed at task check" in event["payload"]["summary"]
    assert event["payload"]["custom_details"]["cluster"] == "app"
    assert not (tmp_path / "repo" / "app" / "backup").exists()


def test_airflow_dags_test_command_backs_up_pg15(airflow_db, pg15, tmp_path, workdir):
    """The same DAG through Airflow's own CLI, as `make demo` and an operator would run it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    config = write_config(tmp_path / "pgdr.yaml", {"app": {"conn_id": "pgdr_app",
                                                           "repository": f"file://{tmp_path}/repo"}})
    env = {**os.environ, "PGDR_CONFIG": str(config),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "AIRFLOW_CONN_PGDR_APP": json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": pg15.port,
                                                "login": "postgres", "schema": "postgres"})}
    before = table_hashes(pg15)
    proc = subprocess.run(["airflow", "dags", "test", "pgdr_app_backup", "2026-11-25T07:00:00+00:00"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)
    assert [(b["label"], b["status"]) for b in listing["backups"]] == [("20261125-070000F", "ok")]
    cli_config = write_config(tmp_path / "cli.yaml", {"app": {"dsn": pg15.dsn, "repository": f"file://{tmp_path}/repo"}})
    restored, _ = restore_and_start(cli_config, workdir, pg15)
    try:
        assert table_hashes(restored) == before
    finally:
        restored.destroy()


def test_wal_dag_streams_then_checks_lag(airflow_db, monkeypatch, workdir, tmp_path):
    from conftest import _bins
    from pgdr.sandbox import SandboxCluster, free_port

    pg = SandboxCluster(_bins(15), workdir / "waldag" / "data", free_port()).init().start()
    try:
        connections(monkeypatch, pg)
        config = write_config(tmp_path / "pgdr.yaml", {"app": {
            "conn_id": "pgdr_app", "repository": f"file://{tmp_path}/repo",
            "wal": {"spool_dir": str(tmp_path / "spool"), "window_minutes": 5, "partial_interval_seconds": 1,
                    "rpo_seconds": 30}}})
        mod = load_dag_module(monkeypatch, config, "pgdr_wal")
        dag = mod.pgdr_app_wal
        assert dag.max_active_runs == 2 and dag.timetable.expression == "*/5 * * * *"  # runs overlap at handover
        pg.psql("create table t as select generate_series(1, 1000) g")
        run = dag.test(run_conf={"duration_seconds": 3})
        assert run.state == "success"
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert states["stream"] == "success" and states["lag"] == "success"
        assert states["trigger_full_backup"] == "skipped" and states["archive_gap"] == "skipped"
        code, lag, _ = pgdr("--json", "wal-lag", "--cluster", "app",
                            config=write_config(tmp_path / "cli.yaml", {"app": {
                                "dsn": pg.dsn, "repository": f"file://{tmp_path}/repo",
                                "wal": {"rpo_seconds": 30}}}))
        assert code == 0 and lag["lag_bytes"] == 0 and lag["slot"]["exists"] is True

        # Capture stops; the server keeps writing: the lag check fails once past the RPO.
        pg.psql("insert into t select generate_series(1, 100000)")
        pg.psql("select pg_switch_wal()")
        import time

        time.sleep(2)
        code, lag, _ = pgdr("--json", "wal-lag", "--cluster", "app",
                            config=write_config(tmp_path / "cli1.yaml", {"app": {
                                "dsn": pg.dsn, "repository": f"file://{tmp_path}/repo",
                                "wal": {"rpo_seconds": 1}}}))
        assert code == 1 and lag["lag_bytes"] > 0 and "past the RPO target of 1 s" in lag["problems"][0]
    finally:
        pg.destroy()


def test_invalidated_slot_triggers_a_full_backup_and_alerts(airflow_db, monkeypatch, workdir, tmp_path):
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    from conftest import _bins
    from pgdr.sandbox import SandboxCluster, free_port

    pg = SandboxCluster(_bins(18), workdir / "slotdag" / "data", free_port())
    pg.init(extra_conf="max_slot_wal_keep_size = 1MB\nmax_wal_size = 32MB\nmin_wal_size = 32MB\n").start()
    try:
        connections(monkeypatch, pg)
        pg.psql("select pg_create_physical_replication_slot('pgdr_app', true)")
        for _ in range(4):  # more WAL than the slot may keep, and checkpoints to remove it
            pg.psql("create table if not exists filler (x text); insert into filler select repeat('x', 1000) "
                    "from generate_series(1, 5000); select pg_switch_wal(); checkpoint;")
        assert pg.psql("select wal_status from pg_replication_slots where slot_name = 'pgdr_app'") == "lost"
        config = write_config(tmp_path / "pgdr.yaml", {"app": {
            "conn_id": "pgdr_app", "repository": f"file://{tmp_path}/repo",
            "wal": {"spool_dir": str(tmp_path / "spool")}}})
        load_dag_module(monkeypatch, config, "pgdr_backup")  # the DAG to be triggered exists
        dag = load_dag_module(monkeypatch, config, "pgdr_wal").pgdr_app_wal
        for t in dag.tasks:
            t.retries = 0  # the alert now, not after the retry delays
        run = dag.test(run_conf={"duration_seconds": 2})
        assert run.state == "failed"
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert states["stream"] == "skipped" and states["trigger_full_backup"] == "success"
        assert states["archive_gap"] == "failed"
        assert pg.psql("select wal_status from pg_replication_slots where slot_name = 'pgdr_app'") != "lost"
        with create_session() as session:
            triggered = session.query(DagRun).filter(DagRun.dag_id == "pgdr_app_backup").all()
        assert any(r.run_id.startswith("pgdr_gap__") for r in triggered)
    finally:
        pg.destroy()


def test_restore_dag_dry_run_real_refused_and_replaced(airflow_db, monkeypatch, pg15, tmp_path, workdir):
    from airflow.sdk.definitions.param import ParamValidationError

    from pgdr.audit import read_audit
    from pgdr.config import RepositoryConfig
    from pgdr.sandbox import SandboxCluster, free_port
    from pgdr.storage import open_storage

    connections(monkeypatch, pg15)
    repo = f"file://{workdir}/restoredag-repo"
    config, cli = dag_and_cli_configs(workdir, "restoredag", pg15, repo)
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=cli)
    assert code == 0, err
    before = table_hashes(pg15)
    dag = load_dag_module(monkeypatch, config, "pgdr_restore").pgdr_app_restore
    for t in dag.tasks:
        t.retries = 0
    storage = open_storage(RepositoryConfig(url=repo))
    dest = workdir / "restoredag-target"

    # A malformed LSN never reaches a task.
    with pytest.raises(ParamValidationError):
        dag.test(run_conf={"target": "lsn", "target_lsn": "not-an-lsn"})

    # The default is a dry run: a plan, nothing written.
    run = dag.test(run_conf={"pgdata": str(dest)})
    assert run.state == "success" and not dest.exists()
    (audit,) = read_audit(storage, "app", "restore")
    assert audit["outcome"] == "dry_run" and audit["result"]["backup"] == backup["label"]
    assert audit["params"]["dry_run"] is True and audit["triggered_by"]

    # A real restore, started, holding exactly the backed-up data.
    port = free_port()
    run = dag.test(run_conf={"pgdata": str(dest), "port": port, "dry_run": False})
    assert run.state == "success"
    restored = SandboxCluster(pg15.bins, dest, port)
    try:
        assert table_hashes(restored) == before
        restored.psql("create table marker_from_first_restore (x int)")

        # Same destination again, without confirmation: refused, untouched, audited.
        run = dag.test(run_conf={"pgdata": str(dest), "port": port, "dry_run": False, "replace": True,
                                 "confirm_cluster": "wrong"})
        assert run.state == "failed"
        assert restored.psql("select count(*) from marker_from_first_restore") == "0"
        assert read_audit(storage, "app", "restore")[-1]["outcome"] == "refused"

        # Confirmed: the running cluster is stopped and kept in a safety backup, then replaced.
        run = dag.test(run_conf={"pgdata": str(dest), "port": port, "dry_run": False, "replace": True,
                                 "confirm_cluster": "app"})
        assert run.state == "success"
        last = read_audit(storage, "app", "restore")[-1]
        safety = last["result"]["safety_backup"]
        assert last["outcome"] == "restored" and safety["server_was_running"] is True
        assert table_hashes(restored) == before  # the marker table is gone: a fresh restore
        code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=cli)
        assert {b["label"]: b["type"] for b in listing["backups"]}[safety["label"]] == "safety"
    finally:
        restored.destroy()


def test_verify_dag_passes_then_names_the_damage(airflow_db, monkeypatch, pg18, workdir):
    from pgdr.config import RepositoryConfig
    from pgdr.storage import open_storage

    connections(monkeypatch, pg18)
    repo = f"file://{workdir}/verifydag-repo"
    config, cli = dag_and_cli_configs(workdir, "verifydag", pg18, repo)
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=cli)
    assert code == 0, err
    dag = load_dag_module(monkeypatch, config, "pgdr_verify").pgdr_app_verify
    for t in dag.tasks:
        t.retries = 0
    assert "pgdr_app_backups" in str(dag.timetable.asset_condition)
    run = dag.test(run_conf={"scope": "all"})
    assert run.state == "success"
    storage = open_storage(RepositoryConfig(url=repo))
    key = f"app/backup/{backup['label']}/base.tar.00000.zst"
    data = bytearray(storage.get_bytes(key))
    data[1000] ^= 0xFF
    storage.put_bytes(key, bytes(data))
    run = dag.test(run_conf={"scope": "all"})
    assert run.state == "failed"
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=cli)
    assert listing["backups"][0]["verification"]["failures"][0]["object"] == key


def test_retention_dag_is_a_dry_run_by_hand(airflow_db, monkeypatch, pg15, workdir):
    connections(monkeypatch, pg15)
    repo = f"file://{workdir}/retentiondag-repo"
    config = write_config(workdir / "retentiondag.yaml", {"app": {
        "conn_id": "pgdr_app", "repository": repo, "retention_min_full": 1, "retention_window_days": 1}})
    cli = write_config(workdir / "retentiondag-cli.yaml", {"app": {"dsn": pg15.dsn, "repository": repo}})
    for label in ("20261001-000000F", "20261002-000000F"):
        assert pgdr("--json", "backup", "--cluster", "app", "--label", label, config=cli)[0] == 0
    dag = load_dag_module(monkeypatch, config, "pgdr_retention").pgdr_app_retention
    assert dag.get_task("expire").retries >= 2
    run = dag.test()
    assert run.state == "success"
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=cli)
    assert len(listing["backups"]) == 2  # by hand: nothing deleted
    # (Both backups ended minutes ago, inside even a 1-day window: a real run keeps them too.)
    run = dag.test(run_conf={"dry_run": False})
    assert run.state == "success"
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=cli)
    assert len(listing["backups"]) == 2
    from pgdr.audit import read_audit
    from pgdr.config import RepositoryConfig
    from pgdr.storage import open_storage

    (audit,) = read_audit(open_storage(RepositoryConfig(url=repo)), "app", "retention")
    assert audit["deleted_backups"] == []


def test_encrypted_backup_dag_takes_its_keyring_from_an_airflow_connection(airflow_db, monkeypatch, pg15, workdir):
    from pgdr.crypto import generate_key

    connections(monkeypatch, pg15)
    k1, k2 = generate_key("ops-2026a"), generate_key("ops-2026b")
    monkeypatch.setenv("AIRFLOW_CONN_PGDR_KEYS", json.dumps({"conn_type": "generic", "password": f"{k1},{k2}"}))
    monkeypatch.delenv("PGDR_KEYRING", raising=False)
    repo = {"url": f"file://{workdir}/encdag-repo", "encryption": {"conn_id": "pgdr_keys"}}
    config, cli = dag_and_cli_configs(workdir, "encdag", pg15, repo)
    before = table_hashes(pg15)
    run = load_dag_module(monkeypatch, config).pgdr_app_backup.test()
    assert run.state == "success"
    verify = load_dag_module(monkeypatch, config, "pgdr_verify").pgdr_app_verify
    for t in verify.tasks:
        t.retries = 0
    assert verify.test(run_conf={"scope": "all"}).state == "success"

    # Airflow down: the CLI restores with the same keyring from the environment, and only with it.
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=cli)
    assert listing["backups"][0]["key_id"] == "ops-2026b"  # the newest key listed encrypts
    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", workdir / "encdag-nokey", config=cli)
    assert code == 2 and "'ops-2026b'" in out["message"]
    monkeypatch.setenv("PGDR_KEYRING", k2)
    restored, _ = restore_and_start(cli, workdir, pg15)
    try:
        assert table_hashes(restored) == before
    finally:
        restored.destroy()


def test_restore_dag_pitr_from_s3_with_credentials_only_in_airflow_connections(airflow_db, monkeypatch, pg15,
                                                                              s3_server, s3_bucket, workdir):
    """The restored server's restore_command reaches S3 with what the DAG used: the Airflow AWS connection's
    keys and endpoint, which neither the config file nor the environment holds."""
    from pgdr.lsn import parse_lsn
    from pgdr.sandbox import SandboxCluster, free_port
    from pgdr.wal import segment_name, segment_of

    connections(monkeypatch, pg15, s3_server)
    repo = {"url": f"s3://{s3_bucket}/pitrdag", "aws_conn_id": "pgdr_s3", "region": "us-east-1"}
    config = write_config(workdir / "pitrdag.yaml", {"app": {"conn_id": "pgdr_app", "repository": repo}})
    cli = write_config(workdir / "pitrdag-cli.yaml", {"app": {
        "dsn": pg15.dsn, "repository": {**repo, "aws_conn_id": None, "endpoint_url": s3_server}}})
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=cli)
    assert code == 0, err
    pg15.psql("create table pitr_dag_rows as select g as id from generate_series(1, 777) g", dbname="app")
    pg15.psql("select pg_switch_wal()")
    expected = table_hashes(pg15)
    last = pg15.psql("select pg_walfile_name(pg_current_wal_lsn() - 1)")  # the segment just switched away from
    first = segment_name(backup["timeline"], segment_of(parse_lsn(backup["stop_lsn"])))
    for seg in sorted(p for p in (pg15.datadir / "pg_wal").iterdir() if len(p.name) == 24
                      and first <= p.name <= last):
        assert pgdr("wal-push", "--cluster", "app", seg, config=cli)[0] == 0
    pg15.psql("drop table pitr_dag_rows", dbname="app")

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    dag = load_dag_module(monkeypatch, config, "pgdr_restore").pgdr_app_restore
    for t in dag.tasks:
        t.retries = 0
    dest, port = workdir / "pitrdag-target", free_port()
    run = dag.test(run_conf={"pgdata": str(dest), "port": port, "dry_run": False, "target": "latest"})
    assert run.state == "success"
    restored = SandboxCluster(pg15.bins, dest, port)
    try:
        assert table_hashes(restored) == expected  # the 777 rows came from WAL fetched through the connection
        assert restored.psql("select count(*) from pitr_dag_rows", dbname="app") == "777"
    finally:
        restored.destroy()
