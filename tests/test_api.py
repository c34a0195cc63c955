"""pgdr's API, health endpoint and metrics inside a RUNNING Airflow API server (``airflow api-server``), with
Airflow's own login (SimpleAuthManager users admin, op, viewer; JWTs from /auth/token) against a real PostgreSQL 18
cluster, real backups, a real verification and real WAL streaming into a file repository."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from types import SimpleNamespace
from urllib.parse import quote

import pytest

from airflow_server import AirflowServer
from helpers import pgdr, write_config
from pgdr.sandbox import SandboxCluster, free_port

CLUSTER = "drapi"


def _config(path, pg, repo_dir, cluster=CLUSTER, **extra):
    body = {"dsn": pg.dsn, "repository": {"url": f"file://{repo_dir}"}, "wal": {"mode": "stream", "rpo_seconds": 60}}
    for k, v in extra.items():
        if isinstance(v, dict):
            body[k] = {**body.get(k, {}), **v}
        else:
            body[k] = v
    return write_config(path, {cluster: body})


def _write_drill(config, passed: bool, label: str, rto: float, rpo: float, cluster=CLUSTER):
    """A drill report where the drill (pgdr drill, another feature) writes it: <cluster>/reports/drill/."""
    from pgdr.audit import write_audit
    from pgdr.config import load_config
    from pgdr.storage import open_storage

    storage = open_storage(load_config(config).cluster(cluster).repository)
    write_audit(storage, cluster, "drill", {"passed": passed, "backup_label": label, "rto_seconds": rto,
                                            "rpo_seconds": rpo, "targets": {"rto_seconds": 3600, "rpo_seconds": 60},
                                            "failures": [] if passed else ["check 'orders' returned 0, expected 1000"]})


@contextlib.contextmanager
def dr_environment(workdir, cluster):
    """A PostgreSQL 18 cluster streaming WAL into a file repository, two real backups (the newest verified), the
    lag measured, a passed drill report, the catalog refreshed, and a running Airflow API server."""
    from conftest import _bins

    pg = SandboxCluster(_bins(18), workdir / cluster / "data", free_port()).init().start()
    repo_dir = workdir / f"{cluster}-repo"
    config = _config(workdir / f"{cluster}.yaml", pg, repo_dir, cluster)
    server = AirflowServer(config).start_prepare()  # migrate + serialize the DAGs while the backups run
    streamer = None
    try:
        pg.psql("create table orders (id int primary key, note text)")
        pg.psql("insert into orders select g, 'order ' || g from generate_series(1, 1000) g")
        streamer = subprocess.Popen(
            [sys.executable, "-m", "pgdr", "--config", str(config), "-q", "wal-stream", "--cluster", cluster,
             "--spool", str(workdir / f"{cluster}-spool"), "--partial-interval", "0.5", "--duration", "120"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        labels = []
        for i in range(2):
            if i:
                pg.psql("insert into orders select g, 'more ' || g from generate_series(1001, 20000) g")
            code, out, err = pgdr("--json", "backup", "--cluster", cluster, config=config)
            assert code == 0, err
            labels.append(out["label"])
            time.sleep(1.1)  # labels are to the second
        code, out, err = pgdr("--json", "verify", "--cluster", cluster, "--backup", "latest", "--no-wal",
                              config=config)
        assert code == 0 and out["ok"], err
        deadline = time.monotonic() + 30
        while True:  # the streamer has archived up to the server's position: lag under the RPO
            code, lag, err = pgdr("--json", "wal-lag", "--cluster", cluster, config=config)
            if code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert code == 0, (lag, err)
        _write_drill(config, True, labels[-1], 41.5, 2.0, cluster)
        from pgdr.catalog import refresh_catalog
        from pgdr.config import load_config
        from pgdr.repository import Repository
        from pgdr.storage import open_storage

        refresh_catalog(Repository(open_storage(load_config(config).cluster(cluster).repository), cluster))
        server.start()
        yield SimpleNamespace(pg=pg, config=config, server=server, labels=labels, repo_dir=repo_dir,
                              workdir=workdir, lag=lag, streamer=streamer, cluster=cluster)
    finally:
        if streamer and streamer.poll() is None:
            streamer.terminate()
            streamer.wait(30)
        server.stop()
        pg.destroy()


@pytest.fixture(scope="module")
def dr(workdir):
    with dr_environment(workdir, CLUSTER) as env:
        yield env


def _routes():
    from fastapi.routing import APIRoute

    from pgdr_airflow.api import app

    return [r for r in app.routes if isinstance(r, APIRoute)]


def _concrete(path: str, label: str) -> str:
    return "/pgdr" + path.replace("{cluster}", CLUSTER).replace("{label}", label).replace("{name}", "icon")


def _depends_on_user(dependant) -> bool:
    from airflow.api_fastapi.core_api.security import get_user

    return any(d.call is get_user or _depends_on_user(d) for d in dependant.dependencies)


def test_every_route_but_health_needs_a_login(dr):
    """Walk every route of the app: anonymous requests get 401 (the page: a redirect to Airflow's login), and
    every route's dependencies include Airflow's get_user — except GET /pgdr/health/backup."""
    s = dr.server
    routes = _routes()
    assert len(routes) >= 18
    for r in routes:
        for method in r.methods:
            path = _concrete(r.path, dr.labels[0])
            status, body, headers = s.request(method, path, {} if method in ("POST", "PUT") else None)
            if r.path == "/health/backup":
                assert status in (200, 503), (path, status, body)
                continue
            if r.path.startswith("/ui"):
                assert status == 307 and headers["location"].startswith("/auth/login/"), (path, status, body)
                continue
            assert _depends_on_user(r.dependant), f"{method} {path} does not depend on Airflow's get_user"
            assert status == 401, (method, path, status, body)
    # the FastAPI docs and schema are off
    for path in ("/pgdr/docs", "/pgdr/redoc", "/pgdr/openapi.json"):
        assert s.request("GET", path, user="admin")[0] == 404, path


def test_every_route_for_every_role(dr):
    """viewer reads; op also starts backups, verifies, drills, restore dry runs, keeps and refreshes; only admin
    restores for real, deletes and unkeeps. 403 where due, and never 401/403/5xx where allowed."""
    a, b = dr.labels
    read = [("GET", "/api/v1/clusters", None), ("GET", f"/api/v1/clusters/{CLUSTER}", None),
            ("GET", f"/api/v1/clusters/{CLUSTER}/backups", None), ("GET", f"/api/v1/clusters/{CLUSTER}/backups/{b}", None),
            ("GET", f"/api/v1/clusters/{CLUSTER}/drills", None), ("GET", f"/api/v1/clusters/{CLUSTER}/audit", None),
            ("GET", "/api/v1/audit", None), ("GET", "/api/v1/overview", None), ("GET", "/metrics", None),
            ("GET", "/ui", None), ("GET", "/ui/plotly.min.js", None), ("GET", "/ui/icon.svg", None)]
    operate = [("POST", f"/api/v1/clusters/{CLUSTER}/backup", {}),
               ("POST", f"/api/v1/clusters/{CLUSTER}/verify", {"scope": b}),
               ("POST", f"/api/v1/clusters/{CLUSTER}/drill", {}),
               ("POST", f"/api/v1/clusters/{CLUSTER}/restore", {"backup": b}),
               ("POST", f"/api/v1/clusters/{CLUSTER}/backups/{a}/keep", {}),
               ("POST", f"/api/v1/clusters/{CLUSTER}/refresh", None)]
    administer = [("POST", f"/api/v1/clusters/{CLUSTER}/restore", {"backup": b, "dry_run": False,
                                                                   "pgdata": "/tmp/pgdr-api-test-never-runs"}),
                  ("DELETE", f"/api/v1/clusters/{CLUSTER}/backups/{b}", None),
                  ("DELETE", f"/api/v1/clusters/{CLUSTER}/backups/{a}/keep", None)]
    covered = {(m, re.sub(r"\d{8}-\d{6}F", "{label}", p.replace(CLUSTER, "{cluster}")).replace("/icon.svg", "/{name}.svg"))
               for m, p, _ in
               read + operate + administer}
    every = {(m, r.path) for r in _routes() for m in r.methods if r.path != "/health/backup"}
    assert every <= covered, f"routes missing from the role matrix: {every - covered}"
    level = {"viewer": 0, "op": 1, "admin": 2}
    for user in ("viewer", "op", "admin"):
        for need, calls in ((0, read), (1, operate), (2, administer)):
            for method, path, body in calls:
                status, out, _ = dr.server.request(method, "/pgdr" + path, body, user=user)
                if level[user] >= need:
                    # the drill DAG belongs to another feature: 404 dag_not_found until it is deployed
                    assert status in (200, 202, 404 if path.endswith("/drill") else 200, 409), \
                        (user, method, path, status, out)
                    if status == 404:
                        assert out["error"] == "dag_not_found"
                else:
                    assert status == 403, (user, method, path, status, out)
                    assert out["error"] == "forbidden"


def test_runs_start_through_airflow_with_a_validated_conf(dr):
    s = dr.server
    status, run, _ = s.request("POST", f"/pgdr/api/v1/clusters/{CLUSTER}/restore", {"backup": dr.labels[1]}, user="op")
    assert status == 202 and run["dag_id"] == f"pgdr_{CLUSTER}_restore" and run["conf"]["dry_run"] is True
    # Airflow's own API shows the run: queued, with that conf, triggered by op
    status, airflow_run, _ = s.request(
        "GET", f"/api/v2/dags/pgdr_{CLUSTER}_restore/dagRuns/{quote(run['run_id'], safe='')}", user="admin")
    assert status == 200, airflow_run
    assert airflow_run["conf"] == {"backup": dr.labels[1], "dry_run": True}
    assert airflow_run["triggering_user_name"] == "op" and airflow_run["run_type"] == "manual"
    status, run, _ = s.request("POST", f"/pgdr/api/v1/clusters/{CLUSTER}/verify", None, user="op")
    assert status == 202 and run["conf"] == {"scope": "new"}


@pytest.mark.parametrize("path,body,field", [
    ("verify", {"scope": "everything"}, "scope"),
    ("verify", {"scope": "all", "bogus": 1}, "bogus"),
    ("restore", {"port": 80}, "port"),
    ("restore", {"backup": "yesterday"}, "backup"),
    ("restore", {"pgdata": "relative/dir"}, "pgdata"),
    ("restore", {"pgdata": "/x; rm -rf /"}, "pgdata"),
    ("restore", {"target": "time"}, "target_time"),
    ("restore", {"target": "sometime"}, "target"),
    ("backups/20200101-000000F/keep", {"until": "not a date"}, "until"),
    ("backups/20200101-000000F/keep", {"until": "2027-01-01T00:00:00"}, "until"),
    ("backups/not-a-label/keep", {}, "label"),
    ("backup", b"{not json", "body"),
])
def test_bad_bodies_are_400_naming_the_field(dr, path, body, field):
    raw = body if isinstance(body, bytes) else None
    status, out, _ = dr.server.request("POST", f"/pgdr/api/v1/clusters/{CLUSTER}/{path}",
                                       None if raw else body, user="admin", raw=raw)
    assert status == 400, out
    assert out["error"] == "usage" and out["field"] == field, out


def test_unknown_cluster_and_label_are_404(dr):
    s = dr.server
    status, out, _ = s.request("GET", "/pgdr/api/v1/clusters/nosuch", user="viewer")
    assert status == 404 and out["error"] == "cluster_not_found"
    status, out, _ = s.request("GET", "/pgdr/api/v1/clusters/nosuch/backups", user="viewer")
    assert status == 404
    status, out, _ = s.request("GET", f"/pgdr/api/v1/clusters/{CLUSTER}/backups/20200101-000000F", user="viewer")
    assert status == 404 and out["error"] == "backup_not_found", out
    status, out, _ = s.request("DELETE", f"/pgdr/api/v1/clusters/{CLUSTER}/backups/20200101-000000F", user="admin")
    assert status == 404 and out["error"] == "backup_not_found", out


def test_backup_listing_and_one_backup_match_the_cli(dr):
    s = dr.server
    status, listing, _ = s.request("GET", f"/pgdr/api/v1/clusters/{CLUSTER}/backups", user="viewer")
    assert status == 200 and listing["catalog_refreshed_at"]
    code, cli, _ = pgdr("--json", "list", "--cluster", CLUSTER, config=dr.config)
    assert [b["label"] for b in listing["backups"]] == [b["label"] for b in cli["backups"]] == dr.labels
    for api_b, cli_b in zip(listing["backups"], cli["backups"]):
        assert {k: v for k, v in api_b.items() if k != "pinned_until"} == cli_b
    status, one, _ = s.request("GET", f"/pgdr/api/v1/clusters/{CLUSTER}/backups/{dr.labels[1]}", user="viewer")
    code, info, _ = pgdr("--json", "info", "--cluster", CLUSTER, "--backup", dr.labels[1], config=dr.config)
    assert {k: v for k, v in one.items() if k != "pinned_until"} == info
    assert one["verification"]["ok"] is True
    status, drills, _ = s.request("GET", f"/pgdr/api/v1/clusters/{CLUSTER}/drills", user="viewer")
    assert drills["drills"][0]["passed"] is True and drills["drills"][0]["rto_seconds"] == 41.5


def test_delete_only_where_retention_allows(dr):
    s = dr.server
    older, newest = dr.labels
    status, out, _ = s.request("DELETE", f"/pgdr/api/v1/clusters/{CLUSTER}/backups/{newest}", user="admin")
    assert status == 409 and out["error"] == "delete_refused" and "newest backup that passed verification" in \
        out["message"], out
    assert s.request("POST", f"/pgdr/api/v1/clusters/{CLUSTER}/backups/{older}/keep", {}, user="op")[0] == 200
    status, out, _ = s.request("DELETE", f"/pgdr/api/v1/clusters/{CLUSTER}/backups/{older}", user="admin")
    assert status == 409 and "pinned" in out["message"], out
    assert (dr.repo_dir / CLUSTER / "backup" / older / "manifest.json").exists()
    assert s.request("DELETE", f"/pgdr/api/v1/clusters/{CLUSTER}/backups/{older}", user="op")[0] == 403
    assert s.request("DELETE", f"/pgdr/api/v1/clusters/{CLUSTER}/backups/{older}/keep", user="admin")[0] == 200
    status, out, _ = s.request("DELETE", f"/pgdr/api/v1/clusters/{CLUSTER}/backups/{older}", user="admin")
    assert status == 200 and out["label"] == older, out
    assert not (dr.repo_dir / CLUSTER / "backup" / older).exists() or \
        not any((dr.repo_dir / CLUSTER / "backup" / older).iterdir())
    status, listing, _ = s.request("GET", f"/pgdr/api/v1/clusters/{CLUSTER}/backups", user="viewer")
    assert [b["label"] for b in listing["backups"]] == [newest]  # the cache was refreshed by the delete
    # the last one left is never deleted either
    status, out, _ = s.request("DELETE", f"/pgdr/api/v1/clusters/{CLUSTER}/backups/{newest}", user="admin")
    assert status == 409


def test_audit_log_holds_every_operation_with_its_actor(dr):
    s = dr.server
    status, out, _ = s.request("GET", "/pgdr/api/v1/audit", user="viewer")
    records = out["records"]
    assert records == sorted(records, key=lambda r: r["recorded_at"], reverse=True)
    import getpass

    cli = [r for r in records if r["source"] == "cli"]
    assert sorted(r["action"] for r in cli) == ["backup", "backup", "verify"]
    assert {r["actor"] for r in cli} == {getpass.getuser()} and {r["outcome"] for r in cli} == {"ok"}
    deletes = [r for r in records if r["action"] == "delete"]
    assert [(r["actor"], r["outcome"]) for r in deletes if r["outcome"] == "ok"] == [("admin", "ok")]
    assert {(r["actor"], r["error"]) for r in deletes if r["outcome"] == "refused"} >= {("admin", "delete_refused")}
    refused = [r for r in records if r["action"] == "restore" and r["outcome"] == "refused"]
    assert {r["actor"] for r in refused} == {"op"}  # op asked for a real restore: refused, and recorded
    started = [r for r in records if r["action"] == "restore" and r["outcome"] == "started"]
    assert all(r["result"]["run_id"] for r in started) and {r["actor"] for r in started} >= {"op", "admin"}
    # filters
    status, out, _ = s.request("GET", f"/pgdr/api/v1/clusters/{CLUSTER}/audit?actor=admin&action=delete",
                               user="viewer")
    assert out["records"] and {(r["actor"], r["action"]) for r in out["records"]} == {("admin", "delete")}
    status, out, _ = s.request("GET", "/pgdr/api/v1/audit?action=nope;drop", user="viewer")
    assert status == 400 and out["field"] == "action"


def test_metrics_carry_the_real_backup(dr):
    from prometheus_client.parser import text_string_to_metric_families

    status, text, headers = dr.server.request("GET", "/pgdr/metrics", user="viewer")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {(s.name, s.labels.get("cluster")): s.value for f in text_string_to_metric_families(text)
              for s in f.samples}
    code, info, _ = pgdr("--json", "info", "--cluster", CLUSTER, "--backup", "latest", config=dr.config)
    from pgdr.results import parse_iso

    assert values[("pgdr_last_backup_size_bytes", CLUSTER)] == info["size"]
    assert values[("pgdr_last_backup_stored_bytes", CLUSTER)] == info["stored_size"]
    assert values[("pgdr_last_backup_timestamp_seconds", CLUSTER)] == pytest.approx(
        parse_iso(info["stop_time"]).timestamp())
    assert values[("pgdr_last_backup_duration_seconds", CLUSTER)] == pytest.approx(
        (parse_iso(info["stop_time"]) - parse_iso(info["start_time"])).total_seconds(), abs=0.01)
    assert 0 <= values[("pgdr_last_backup_age_seconds", CLUSTER)] < 3600
    assert values[("pgdr_last_backup_verified", CLUSTER)] == 1
    assert values[("pgdr_repository_up", CLUSTER)] == 1
    assert values[("pgdr_last_drill_rto_seconds", CLUSTER)] == 41.5
    assert values[("pgdr_last_drill_success", CLUSTER)] == 1
    assert values[("pgdr_wal_lag_bytes", CLUSTER)] == dr.lag["lag_bytes"]
    assert values[("pgdr_pitr_window_start_timestamp_seconds", CLUSTER)] <= \
        values[("pgdr_pitr_window_end_timestamp_seconds", CLUSTER)]


def test_health_flips_to_503(dr):
    s = dr.server

    def health(user=None):
        status, out, _ = s.request("GET", "/pgdr/health/backup", user=user)
        return status, out

    status, out = health()
    assert status == 200 and out == {"status": "healthy", "clusters": {CLUSTER: {"status": "healthy", "codes": []}}}
    status, out = health("viewer")
    assert status == 200 and out["clusters"][CLUSTER]["reasons"] == []

    # the last drill failed
    _write_drill(dr.config, False, dr.labels[1], 50.0, 3.0)
    assert s.request("POST", f"/pgdr/api/v1/clusters/{CLUSTER}/refresh", user="op")[0] == 200
    status, out = health()
    assert status == 503 and out["clusters"][CLUSTER] == {"status": "unhealthy", "codes": ["drill_failed"]}
    status, out = health("viewer")
    assert "expected 1000" in out["clusters"][CLUSTER]["reasons"][0]
    _write_drill(dr.config, True, dr.labels[1], 40.0, 2.0)
    s.request("POST", f"/pgdr/api/v1/clusters/{CLUSTER}/refresh", user="op")
    assert health()[0] == 200

    # the newest backup is older than max_backup_age_hours (0.0001 h: 0.36 s); the API re-reads the config
    _config(dr.config, dr.pg, dr.repo_dir, max_backup_age_hours=0.0001)
    status, out = health()
    assert status == 503 and out["clusters"][CLUSTER]["codes"] == ["backup_too_old"]
    _config(dr.config, dr.pg, dr.repo_dir)
    assert health()[0] == 200

    # WAL lag past the RPO: capture stopped, the server wrote on, measured again with an RPO of 1 s. The
    # streamer records how far it reached as it stops (a partial segment, when the server wrote anything since
    # the last one): the lag counts from then, so more than the RPO passes after it stopped.
    dr.pg.psql("insert into orders select g, 'late' from generate_series(20001, 21000) g")
    _config(dr.config, dr.pg, dr.repo_dir, wal={"rpo_seconds": 1})
    dr.streamer.terminate()
    dr.streamer.wait(30)
    dr.pg.psql("insert into orders select g, 'later' from generate_series(21001, 22000) g")
    time.sleep(1.5)
    code, lag, err = pgdr("--json", "wal-lag", "--cluster", CLUSTER, config=dr.config)
    assert code == 1 and lag["lag_seconds"] > 1, (lag, err)
    status, out = health()
    assert status == 503 and out["clusters"][CLUSTER]["codes"] == ["wal_lag_over_rpo"], out
    status, out = health("viewer")
    assert "over the RPO of 1 s" in out["clusters"][CLUSTER]["reasons"][0]
