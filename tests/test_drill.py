"""The DR drill for real: sources archiving with `pgdr wal-push` (PostgreSQL 15 and 18, file and S3
repositories), drills from the CLI and from the DAG with dag.test(), faults that must fail the drill
and alert, and nothing left running or on disk afterwards."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import archive_repo, pgdr, switch_and_wait_archived, write_config
from pgdr.sandbox import SandboxCluster, free_port
from test_dags import airflow_db, capture, connections, load_dag_module  # noqa: F401 (fixtures)

_n = itertools.count()


class Source:
    """A throwaway source cluster archiving into its own repository, with one backup taken."""

    def __init__(self, workdir: Path, major: int, s3_server: str | None = None, drill: dict | None = None,
                 setup=None, top: dict | None = None, archive_timeout: int = 2):
        from conftest import _bins

        self.tag = f"drill{major}-{next(_n)}"
        self.workdir = workdir
        self.repo = archive_repo(workdir, self.tag, s3_server)
        self.scratch = workdir / f"{self.tag}-scratch"
        self.pg = SandboxCluster(_bins(major), workdir / self.tag / "data", free_port())
        self.drill = {"scratch_dir": str(self.scratch), **(drill or {})}
        self.extra = top or {}
        self.cli = self.config("cli")
        command = f"{sys.executable} -m pgdr --config {self.cli} -q wal-push --cluster app %p"
        self.pg.init(extra_conf=f"archive_mode = on\narchive_command = '{command}'\n"
                                f"archive_timeout = {archive_timeout}\n").start()
        self.pg.psql("create database app")
        self.pg.psql("create table t (id int primary key, note text)", dbname="app")
        self.pg.psql("insert into t select g, 'row ' || g from generate_series(1, 1000) g", dbname="app")
        if setup:
            setup(self)
        code, self.backup, err = pgdr("--json", "backup", "--cluster", "app", config=self.cli)
        assert code == 0, err

    def config(self, name: str, dag: bool = False, **overrides) -> Path:
        body = {"repository": self.repo, **self.extra, **overrides}
        body["drill"] = {**self.drill, **overrides.get("drill", {})}
        body.update({"conn_id": "pgdr_app"} if dag else {"dsn": self.pg.dsn})
        path = write_config(self.workdir / f"{self.tag}-{name}.yaml", {"app": body},
                            alerts={"slack_conn_id": "pgdr_slack", "pagerduty_conn_id": "pgdr_pagerduty"})
        path.chmod(0o644)
        return path

    def storage(self):
        from pgdr.config import load_config
        from pgdr.storage import open_storage

        return open_storage(load_config(self.cli).cluster("app").repository)

    def reports(self) -> list[dict]:
        from pgdr.audit import read_audit

        return read_audit(self.storage(), "app", "drill")

    def destroy(self):
        self.pg.destroy()


@pytest.fixture
def sources(workdir):
    made = []

    def make(*args, **kwargs):
        made.append(Source(workdir, *args, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.destroy()


def assert_nothing_left(report: dict, scratch: Path):
    """No server on the drill's port or data directory, and the run's scratch directory is gone."""
    from pgdr.drill import server_processes

    assert report["teardown"]["scratch_removed"] is True, report["teardown"]
    assert report["teardown"]["socket_dir_removed"] is True
    assert not any(scratch.glob("app/*")), list(scratch.glob("app/*"))
    assert server_processes(scratch) == []


def pgbench(pg, script: Path, *args):
    """pgbench writing into the source all along (small: updates and inserts on the test's own tables)."""
    script.write_text("\\set id random(1, 1000)\nupdate t set note = 'bench ' || :id where id = :id;\n"
                      "insert into bench_log (id) values (:id);\n")
    return [pg.bins.tool("pgbench"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "-n", "-f", str(script),
            *args, "app"]


@pytest.mark.parametrize("major, backend", [(15, "file"), (18, "s3")], ids=["pg15-file", "pg18-s3"])
def test_drill_passes_while_pgbench_writes(sources, major, backend, request):
    s3 = request.getfixturevalue("s3_server") if backend == "s3" else None
    src = sources(major, s3, drill={"canary": {"database": "app"}, "checks": [
        {"name": "rows", "database": "app", "sql": "select count(*) from t", "expected": 1000}]},
        setup=lambda s: s.pg.psql("create table bench_log (id int, at timestamptz default now())", dbname="app"),
        archive_timeout=4)  # fewer, fuller segments while pgbench writes: less to push and to replay
    bench = subprocess.Popen(pgbench(src.pg, src.workdir / f"{src.tag}.pgbench", "-c", "2", "-T", "120", "-R", "50"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        code, report, err = pgdr("--json", "drill", "--cluster", "app", "--run-id", "quarterly-1", config=src.cli)
        assert bench.poll() is None, "pgbench kept writing during the drill"
    finally:
        bench.terminate()
        bench.wait(10)
    assert code == 0, err
    assert report["ok"] is True and report["failures"] == []
    assert int(src.pg.psql("select count(*) from bench_log", dbname="app")) > 0
    assert report["backup"]["label"] == src.backup["label"]
    mark = report["mark"]
    assert mark["method"] == "restore_point" and mark["name"].startswith("pgdr-drill-quarterly-1")
    results = {v["name"]: v for v in report["validations"]}
    assert {"server", "target_reached", "amcheck", "read_all", "check:rows", "canary"} <= set(results)
    assert all(v["ok"] for v in results.values()), results
    assert "at restore point" in results["target_reached"]["detail"] and mark["name"] in \
        results["target_reached"]["detail"]
    assert results["read_all"]["databases"] == ["app", "postgres"]
    assert report["rpo"]["seconds"] is not None and report["rpo"]["ok"] is True
    phases = report["rto"]["phases"]
    assert set(phases) == {"restore", "replay", "start_and_promotion", "validation"}
    assert phases["restore"] > 0 and phases["validation"] > 0
    assert report["rto"]["total_seconds"] == pytest.approx(sum(phases.values()), abs=0.01)
    assert report["rto"]["ok"] is True and report["versions"]["postgresql"].startswith(str(major))
    assert_nothing_left(report, src.scratch)
    # The report is in the repository; the canary row was written on the source just before the mark.
    (stored,) = src.reports()
    assert stored["run_id"] == "quarterly-1" and stored["ok"] is True
    assert src.pg.psql("select count(*) from pgdr_drill_canary where run_id = 'quarterly-1'", dbname="app") == "1"

    # A second, light drill (the backup itself, started and queried) whose user check is wrong: exit 1, the
    # cause named; the history lists both, in order.
    wrong = src.config("wrong", drill={"checks": [{"name": "rows", "database": "app", "sql": "select count(*) from t",
                                                   "expected": 999}]})
    code, failed, err = pgdr("--json", "drill", "--cluster", "app", "--run-id", "quarterly-2", "--light",
                             config=wrong)
    assert code == 1 and failed["ok"] is False, err
    assert failed["failures"][0]["cause"] == "check:rows" and "expected '999', got '1000'" in \
        failed["failures"][0]["message"]
    assert failed["light"] is True and failed["mark"]["method"] == "none" and failed["rpo"]["seconds"] is None
    assert [v["name"] for v in failed["validations"]] == ["server", "target_reached", "check:rows"]
    assert_nothing_left(failed, src.scratch)
    code, history, _ = pgdr("--json", "drills", "--cluster", "app", config=src.cli)
    assert code == 0
    assert [(d["run_id"], d["ok"], d["failures"]) for d in history["drills"]] == [
        ("quarterly-1", True, []), ("quarterly-2", False, ["check:rows"])]
    proc = subprocess.run([sys.executable, "-m", "pgdr", "--config", str(src.cli), "drills", "--cluster", "app"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "2 drill(s)" in proc.stdout and "check:rows" in proc.stdout


def test_rpo_missed_fails_the_mark_step_and_leaves_nothing(sources):
    """No WAL capture past the mark (no archive_timeout, an idle server): the mark step fails at rpo_seconds."""
    src = sources(15, archive_timeout=0, top={"rpo_seconds": 1})
    code, report, err = pgdr("--json", "drill", "--cluster", "app", config=src.cli)
    assert code == 1, err
    assert [f["cause"] for f in report["failures"]] == ["rpo"]
    assert report["rpo"]["ok"] is False and report["rpo"]["seconds"] > 1
    assert report["backup"] is None  # nothing was restored
    assert_nothing_left(report, src.scratch)


def corrupt_wal_after_backup(src):
    """Flip bytes inside the first archived WAL segment after the backup's: the drill must replay through it."""
    from pgdr.lsn import parse_lsn
    from pgdr.wal import segment_name, segment_of

    src.pg.psql("insert into t select g, 'after backup' from generate_series(1001, 3000) g", dbname="app")
    switch_and_wait_archived(src.pg)
    first = segment_name(src.backup["timeline"], segment_of(parse_lsn(src.backup["stop_lsn"])) + 1)
    repo = Path(src.repo.removeprefix("file://"))
    (victim,) = [p for p in (repo / "app" / "wal" / "00000001").iterdir() if p.name.startswith(first)]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    victim.write_bytes(bytes(data))
    return first


def corrupt_heap_page(src):
    """A heap page damaged on disk while the server is stopped (data checksums off, so the backup carries it)."""
    pg = src.pg
    assert pg.psql("show data_checksums") == "off"
    pg.psql("create table victim (id int primary key, note text)", dbname="app")
    pg.psql("insert into victim select g, 'victim ' || g from generate_series(1, 500) g", dbname="app")
    path = pg.psql("select pg_relation_filepath('victim')", dbname="app")
    pg.psql("checkpoint")
    pg.stop()
    with open(pg.datadir / path, "r+b") as f:  # the line pointer array of block 0
        f.seek(24)
        f.write(b"A" * 64)
    pg.start()


FAULTS = {
    "wal": dict(major=15, cause="recovery", text="recovery"),
    "heap": dict(major=15, cause="amcheck", text="victim"),
    "check": dict(major=18, cause="check:rows", text="expected '5', got '1000'",
                  drill={"checks": [{"name": "rows", "database": "app", "sql": "select count(*) from t",
                                     "expected": 5}]}),
    # The smallest target (1 s) against a restore of a small cluster that can finish within it on a fast run:
    # a check that passes but takes 1.2 s puts the time from restore to validated past it on every run.
    "rto": dict(major=18, cause="rto", text="RTO target missed", top={"rto_seconds": 1},
                drill={"checks": [{"name": "slow", "database": "app", "sql": "select count(*) from pg_sleep(1.2)",
                                   "expected": 1}]}),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_fails_the_drill_names_the_cause_and_alerts(fault, airflow_db, sources, capture,  # noqa: F811
                                                         monkeypatch):
    import pagerduty

    monkeypatch.setattr(pagerduty.EventsApiV2Client, "url",
                        property(lambda self: capture.url, lambda self, v: None), raising=False)
    spec = FAULTS[fault]
    src = sources(spec["major"], drill=spec.get("drill"), top=spec.get("top"),
                  setup=corrupt_heap_page if fault == "heap" else None)
    if fault == "wal":
        spec = {**spec, "text": corrupt_wal_after_backup(src)}  # the message names the damaged segment
    connections(monkeypatch, src.pg, capture_url=capture.url)
    dag = load_dag_module(monkeypatch, src.config("dag", dag=True), "pgdr_drill").pgdr_app_drill
    for t in dag.tasks:
        t.retries = 0
    run = dag.test()
    assert run.state == "failed"
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["teardown"] == "success" and states["report"] == "failed", states

    (report,) = src.reports()
    assert report["ok"] is False and report["run_id"] == run.run_id
    assert report["failures"][0]["cause"] == spec["cause"], report["failures"]
    assert spec["text"] in report["failures"][0]["message"] or \
        any(spec["text"] in v["detail"] for v in report["validations"] if not v["ok"]), report
    assert_nothing_left(report, src.scratch)

    slack = [r for r in capture.requests if r["path"].startswith("/slack")]
    pd = [r for r in capture.requests if r["path"] == "/v2/enqueue"]
    assert len(slack) == 1 and len(pd) == 1, capture.requests  # one alert per failed drill, not one per task
    text = slack[0]["body"]["text"]
    assert "DR drill pgdr_app_drill of cluster 'app' failed" in text and "FAILED" in text
    assert f"backup {src.backup['label']}" in text and "RTO" in text and "RPO" in text
    assert f"failed: {spec['cause']}" in text
    assert pd[0]["body"]["payload"]["severity"] == "critical" and "failed: " + spec["cause"] in \
        pd[0]["body"]["payload"]["summary"]


def test_dag_drill_passes_and_hands_state_between_tasks(airflow_db, sources, monkeypatch):  # noqa: F811
    src = sources(18, drill={"canary": True})
    connections(monkeypatch, src.pg)
    dag = load_dag_module(monkeypatch, src.config("dag-ok", dag=True), "pgdr_drill").pgdr_app_drill
    run = dag.test()
    assert run.state == "success"
    tis = {ti.task_id: ti for ti in run.get_task_instances()}
    assert all(ti.state == "success" for ti in tis.values()), {k: v.state for k, v in tis.items()}
    (report,) = src.reports()
    assert report["ok"] and report["mark"]["method"] == "restore_point"
    assert {v["name"] for v in report["validations"]} >= {"server", "target_reached", "amcheck", "read_all", "canary"}
    assert report["rto"]["ok"] is True and set(report["rto"]["phases"]) == {
        "restore", "replay", "start_and_promotion", "validation"}
    assert_nothing_left(report, src.scratch)

    # drill.on_new_backup: the lighter drill of each new backup (restored to its end, started, queried).
    light = load_dag_module(monkeypatch, src.config("dag-light", dag=True, drill={"on_new_backup": True, "checks": [
        {"name": "rows", "database": "app", "sql": "select count(*) from t", "expected": 1000}]}),
        "pgdr_drill").pgdr_app_drill_new_backup
    assert light.test().state == "success"
    latest = src.reports()[-1]
    assert latest["light"] is True and latest["ok"] and latest["mark"]["method"] == "none"
    assert [v["name"] for v in latest["validations"]] == ["server", "target_reached", "check:rows"]
    assert_nothing_left(latest, src.scratch)


def test_dag_schedule_is_quarterly_in_the_cluster_timezone_and_the_form_is_validated(airflow_db, monkeypatch,  # noqa: F811
                                                                                   tmp_path):
    import pendulum
    from airflow.sdk.definitions.param import ParamValidationError
    from airflow.timetables.base import TimeRestriction
    from airflow.timetables.trigger import CronTriggerTimetable

    config = write_config(tmp_path / "pgdr.yaml", {
        "app": {"conn_id": "pgdr_app", "repository": "file:///srv/pgdr", "timezone": "Asia/Tokyo",
                "drill": {"on_new_backup": True, "queue": "drill-disk"}}})
    mod = load_dag_module(monkeypatch, config, "pgdr_drill")
    dag = mod.pgdr_app_drill
    assert (dag.timetable.expression, str(dag.timetable.timezone)) == ("0 0 1 1,4,7,10 *", "Asia/Tokyo")
    nxt = CronTriggerTimetable(dag.timetable.expression, timezone=str(dag.timetable.timezone)).next_dagrun_info(
        last_automated_data_interval=None,
        restriction=TimeRestriction(earliest=pendulum.datetime(2026, 11, 26, tz="UTC"), latest=None, catchup=False))
    assert nxt.run_after == pendulum.datetime(2027, 1, 1, tz="Asia/Tokyo")  # midnight in Tokyo, 1 January
    assert [t.task_id for t in dag.tasks] == ["mark", "restore", "validate", "measure", "teardown", "report"]
    assert {t.queue for t in dag.tasks} == {"drill-disk"}
    assert {t.task_id: t.trigger_rule for t in dag.tasks}["teardown"] == "all_done"
    assert dag.params.validate()["validations"] == ["amcheck", "read_all", "checks", "canary"]  # defaults submit
    for bad in ({"keep_minutes": -1}, {"keep_minutes": 100000}, {"validations": ["amcheck", "rm -rf /"]},
                {"backup": "latest; rm -rf /"}, {"target_time": "yesterday"}, {"heapallindexed": "yes"}):
        with pytest.raises(ParamValidationError):
            dag.test(run_conf=bad)
    light = mod.pgdr_app_drill_new_backup
    assert [a.name for a in light.timetable.asset_condition.objects] == ["pgdr_app_backups"]
    assert light.params.validate()["keep_minutes"] == 0


def test_config_and_plan_refuse_bad_drill_settings(tmp_path):
    from pgdr.config import parse_config
    from pgdr.drill import plan_drill
    from pgdr.errors import ConfigError, UsageError

    def cfg(**drill):
        return parse_config({"clusters": {"app": {"repository": "file:///r", "drill": drill}}})

    for bad, key in ((dict(scratch_dir="relative"), "scratch_dir"), (dict(scratch_dir="/tmp/a b"), "scratch_dir"),
                     (dict(scratch_dir="/"), "scratch_dir"), (dict(keep_minutes=-1), "keep_minutes"),
                     (dict(checks=[{"name": "x", "sql": "select 1"}]), "expected"),
                     (dict(canary={"table": "Robert'); drop table students"}), "canary.table"),
                     (dict(bogus=1), "bogus")):
        with pytest.raises(ConfigError, match=key):
            cfg(**bad)
    c = parse_config({"clusters": {"app": {"repository": "file:///r", "wal": {"rpo_seconds": 42}}}}).cluster("app")
    assert c.rpo_target == 42 and c.rto_seconds == 3600  # rpo_seconds defaults to wal.rpo_seconds
    plan = plan_drill(c, "manual__2026-11-26T00:00:00+00:00", {})
    assert plan.rpo_seconds == 42 and plan.validations == ["amcheck", "read_all", "checks", "canary"]
    assert Path(plan.scratch).parent == Path("/var/tmp/pgdr-drill/app") and "/" not in plan.slug
    assert len(plan.restore_point) < 64
    for bad in ({"backup": "../x"}, {"validations": ["nope"]}, {"keep_minutes": True}, {"target_time": "noon"}):
        with pytest.raises(UsageError):
            plan_drill(c, "r1", bad)
    config = write_config(tmp_path / "c.yaml", {"app": {"repository": f"file://{tmp_path}/r"}})
    code, out, _ = pgdr("--json", "drill", "--cluster", "app", "--validations", "amcheck,nope", config=config)
    assert code == 2 and out["error"] == "usage" and "nope" in out["message"]
    assert not (tmp_path / "r").exists()  # refused before anything was touched


def test_teardown_removes_only_the_drills_own_directory(tmp_path):
    from pgdr.config import parse_config
    from pgdr.drill import MARKER, plan_drill, teardown
    from pgdr.errors import PgdrError

    c = parse_config({"clusters": {"app": {"repository": "file:///r", "run_as": "root",
                                           "drill": {"scratch_dir": str(tmp_path / "s")}}}}).cluster("app")
    plan = plan_drill(c, "run-1", {})
    run = Path(plan.scratch)
    run.mkdir(parents=True)
    (run / "precious").write_text("not the drill's")
    with pytest.raises(PgdrError, match="not this drill's scratch directory"):
        teardown(c, plan)
    assert (run / "precious").exists()
    (run / MARKER).write_text("another-run\n")
    with pytest.raises(PgdrError):
        teardown(c, plan)
    assert (run / "precious").exists()
    (run / MARKER).write_text("run-1\n")
    assert teardown(c, plan)["scratch_removed"] is True and not run.exists()
    assert teardown(c, plan)["scratch_removed"] is True  # again: nothing to do


def test_report_from_failed_steps_names_the_first_cause():
    from pgdr.config import parse_config
    from pgdr.drill import make_report, render_summary, summary_line

    c = parse_config({"clusters": {"app": {"repository": "file:///r"}}}).cluster("app")
    from pgdr.drill import plan_drill

    plan = plan_drill(c, "r", {})
    report = make_report(c, plan, {"mark": {"method": "lsn", "lsn": "0/3000000", "rpo_seconds": 0.5, "rpo_ok": True},
                                   "teardown": {"server": "stopped (fast)", "scratch_removed": True}},
                         {"restore": {"cause": "restore", "message": "restore failed: boom",
                                      "record": {"phases": {"restore": 1.5}}}})
    assert not report.ok and report.failures[0]["cause"] == "restore"
    assert report.rto["ok"] is None and report.rto["phases"]["restore"] == 1.5
    assert "failed: restore at step restore: restore failed: boom" in summary_line(report)
    assert "FAILED" in render_summary(report) and json.loads(report.to_json())["rpo"]["seconds"] == 0.5


def test_scratch_server_is_socket_only_archiving_off_and_torn_down_by_steps(sources):
    """The step API the DAG uses, in-process: a light drill's scratch server refuses TCP clients (even on
    loopback), does not archive, listens on loopback only; a teardown after a failed step stops it."""
    from pgdr import drill
    from pgdr.config import load_config
    from pgdr.errors import PgdrError

    src = sources(15, archive_timeout=0)
    cluster = load_config(src.cli).cluster("app")
    plan = drill.plan_drill(cluster, "steps-1", {}, light=True)
    mark = drill.mark_moment(cluster, None, src.storage(), plan)
    assert mark["method"] == "none"
    restored = drill.restore_scratch(cluster, src.storage(), plan, mark, config_path=str(src.cli))
    try:
        assert restored["backup"]["label"] == src.backup["label"]
        scratch = SandboxCluster(src.pg.bins, Path(restored["pgdata"]), restored["port"])
        with pytest.raises(PgdrError, match="pg_hba.conf"):
            scratch.psql("select 1")  # TCP on 127.0.0.1: no pg_hba.conf entry
        s = drill._Scratch(cluster, plan, restored, 15)
        with s.connect("app") as c:
            assert c.execute("show archive_mode").fetchone()[0] == "off"
            assert c.execute("show listen_addresses").fetchone()[0] == "127.0.0.1"
            assert c.execute("select count(*) from t").fetchone()[0] == 1000
        assert drill.server_processes(restored["pgdata"]) != []
    finally:
        # as after a validation that crashed: the teardown alone cleans up
        record = drill.teardown(cluster, plan, restored=restored)
    assert record["server"].startswith("stopped") and record["scratch_removed"] and record["socket_dir_removed"]
    assert drill.server_processes(restored["pgdata"]) == [] and not Path(plan.scratch).exists()
    assert not Path(restored["socket_dir"]).exists()
