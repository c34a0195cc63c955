"""WAL capture that cannot lose data silently: the slot follows the repository, a
dropped slot is a reported gap, a partial segment counts only up to its safe LSN,
and push mode's archiver is watched. Real PostgreSQL 15 and 18, file and S3
repositories; each cluster here is this file's own (slots are dropped, settings
changed)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import archive_repo, archived_to, pgdr, restored_to_latest, start_streamer, wait_for, write_config
from pgdr.sandbox import SandboxCluster, free_port
from test_backup_restore import storage_of
from test_dags import airflow_db, connections, load_dag_module  # noqa: F401  (airflow_db: the session fixture)

_n = itertools.count()


def own_cluster(workdir, major, tag, extra_conf=""):
    from conftest import _bins

    name = f"{tag}{major}-{next(_n)}"
    return name, SandboxCluster(_bins(major), workdir / name / "data", free_port()).init(extra_conf=extra_conf).start()


def rows(c):
    return c.psql("select count(*) || ':' || coalesce(sum(id), 0) from capture_rows")


@pytest.mark.parametrize("major", [15, 18])
def test_killed_stream_with_wal_not_uploaded_loses_nothing_on_a_fresh_worker(workdir, major):
    """The streamer holds received WAL it cannot upload (the repository refuses writes) and is
    SIGKILLed; the next run starts on a "new worker" (a fresh, empty spool location). Because the
    slot was never told that WAL was flushed, the server still has it: PITR gets every row."""
    name, pg = own_cluster(workdir, major, "kill")
    repo = workdir / f"{name}-repo"
    config = write_config(workdir / f"{name}.yaml", {"app": {"dsn": pg.dsn, "repository": f"file://{repo}"}})
    streamer = None
    try:
        pg.psql("create table capture_rows (id int primary key, batch text)")
        log1 = workdir / f"{name}-1.log"
        # No partial uploads in this run: what it receives reaches the repository only as completed segments.
        streamer = start_streamer(config, workdir / f"{name}-spool-A", log1, "--partial-interval", "3600")
        wait_for(lambda: pg.psql("select count(*) from pg_stat_replication") == "1", "streaming started")
        assert pgdr("--json", "backup", "--cluster", "app", config=config)[0] == 0
        pg.psql("insert into capture_rows select g, 'A' from generate_series(1, 1000) g")
        pg.psql("select pg_switch_wal()")
        wait_for(lambda: archived_to(config, pg.psql("select pg_current_wal_lsn()")), "A archived")

        # The repository stops taking WAL (its timeline directory is replaced by a file: even root
        # cannot write below it). The server keeps sending; the streamer receives but cannot upload.
        tli_dir = repo / "app" / "wal" / "00000001"
        os.rename(tli_dir, tli_dir.with_name("aside"))
        tli_dir.write_text("not a directory")
        pg.psql("insert into capture_rows select g, 'B' from generate_series(1001, 2000) g")
        pg.psql("select pg_switch_wal()")
        pg.psql("insert into capture_rows select g, 'C' from generate_series(2001, 3000) g")
        pg.psql("select pg_switch_wal()")
        wait_for(lambda: streamer.poll() is not None or "fail" in log1.read_text(), "an upload failed")
        if streamer.poll() is None:
            os.kill(streamer.pid, signal.SIGKILL)  # no goodbye
        streamer.wait(30)
        tli_dir.unlink()
        os.rename(tli_dir.with_name("aside"), tli_dir)

        pg.psql("insert into capture_rows select g, 'D' from generate_series(3001, 4000) g")  # mid-segment
        streamer = start_streamer(config, workdir / f"{name}-spool-B", workdir / f"{name}-2.log")
        wait_for(lambda: archived_to(config, pg.psql("select pg_current_wal_lsn()")), "everything archived")
        streamer.send_signal(signal.SIGTERM)
        out, _ = streamer.communicate(timeout=60)
        assert streamer.returncode == 0, (workdir / f"{name}-2.log").read_text()[-2000:]
        result = json.loads(out)
        # The slot was only ever confirmed to segment boundaries the repository holds.
        assert result.get("confirmed_lsn") is None or result["confirmed_lsn"].endswith("000000")
    finally:
        if streamer is not None and streamer.poll() is None:
            streamer.kill()
    try:
        expected = rows(pg)
        assert expected == f"4000:{sum(range(1, 4001))}"
        with restored_to_latest(config, workdir, pg) as (restored, _):
            assert rows(restored) == expected  # every committed row, B and C included
    finally:
        pg.destroy()


def test_dropped_slot_is_a_reported_gap_that_triggers_a_backup(airflow_db, workdir, tmp_path, monkeypatch):
    """The slot is dropped between two runs and WAL moves on: the next run of the WAL DAG names the
    missing LSN range, triggers a full backup and fails its gap task; the slot comes back loudly."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session


    name, pg = own_cluster(workdir, 15, "drop")
    try:
        connections(monkeypatch, pg)
        repo = f"file://{tmp_path}/repo"
        cli = write_config(tmp_path / "cli.yaml", {"app": {"dsn": pg.dsn, "repository": repo}})
        config = write_config(tmp_path / "pgdr.yaml", {"app": {"conn_id": "pgdr_app", "repository": repo}})
        streamer = start_streamer(cli, tmp_path / "spool", tmp_path / "s.log", "--duration", "3")
        pg.psql("create table capture_rows as select generate_series(1, 1000) id")
        assert streamer.wait(60) == 0
        archived = pgdr("--json", "wal-check", "--cluster", "app", config=cli)[1]["newest_lsn"]

        pg.psql("select pg_drop_replication_slot('pgdr_app')")
        for _ in range(3):  # WAL moves on and is recycled: nothing keeps it for pgdr now
            pg.psql("insert into capture_rows select generate_series(1, 20000); select pg_switch_wal(); checkpoint")

        load_dag_module(monkeypatch, config, "pgdr_backup")  # the DAG to be triggered exists
        dag = load_dag_module(monkeypatch, config, "pgdr_wal").pgdr_app_wal
        for t in dag.tasks:
            t.retries = 0
        run = dag.test(run_conf={"duration_seconds": 2})
        assert run.state == "failed"
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert states["trigger_full_backup"] == "success" and states["archive_gap"] == "failed"
        assert states["stream"] == "skipped"
        slot_ti = next(ti for ti in run.get_task_instances() if ti.task_id == "slot")
        state = slot_ti.xcom_pull(task_ids="slot", key="slot_state")
        assert state["status"] == "gap" and state["gap_from"] == archived, state
        from pgdr.lsn import parse_lsn

        assert parse_lsn(state["gap_to"]) > parse_lsn(archived)
        assert archived in state["detail"] and "missing" in state["detail"]
        with create_session() as session:
            triggered = session.query(DagRun).filter(DagRun.dag_id == "pgdr_app_backup").all()
        assert any(r.run_id.startswith("pgdr_gap__") for r in triggered)

        # The CLI says the same, and the archive shows the hole once capture resumes.
        code, out, _ = pgdr("--json", "wal-lag", "--cluster", "app", config=cli)
        assert out["slot"]["exists"] is True  # created again, said out loud above
        pg.psql("select pg_drop_replication_slot('pgdr_app')")
        pg.psql("insert into capture_rows select generate_series(1, 20000); select pg_switch_wal(); checkpoint")
        code, out, _ = pgdr("--json", "wal-stream", "--cluster", "app", "--duration", "1", config=cli)
        assert code == 1 and out["error"] == "wal_gap" and "missing" in out["message"], out
    finally:
        pg.destroy()


def test_leftover_partial_counts_only_to_its_safe_lsn(workdir, s3_server, s3_bucket):
    """A partial left behind, older than a backup's stop LSN: the backup (WAL from the archive)
    stays waiting_for_wal, and planning refuses a range the archive cannot replay; wal-check says
    so too. PostgreSQL 18 into S3."""
    from pgdr.lsn import parse_lsn
    from pgdr.wal import WalArchive, segment_name, segment_of

    name, pg = own_cluster(workdir, 18, "partial", "wal_keep_size = 1GB\n")  # every segment stays to be pushed
    try:
        repo = {"url": f"s3://{s3_bucket}/p", "endpoint_url": s3_server, "region": "us-east-1"}
        config = write_config(workdir / f"{name}.yaml", {"app": {"dsn": pg.dsn, "repository": repo,
                                                                  "backup_wal": "archive"}})
        embed = write_config(workdir / f"{name}-embed.yaml", {"app": {"dsn": pg.dsn, "repository": repo}})
        assert pgdr("--json", "backup", "--cluster", "app", "--label", "20261125-010000F", config=embed)[0] == 0
        code, report, _ = pgdr("--json", "wal-check", "--cluster", "app", config=embed)
        assert code == 1 and not report["ok"] and "is WAL capture running" in report["gaps"][0]["reason"]

        pg.psql("create table capture_rows as select generate_series(1, 5000) id")
        code, out, err = pgdr("--json", "backup", "--cluster", "app", "--label", "20261125-020000F",
                              "--wal-timeout", "1", config=config)
        assert code == 1 and "did not reach the archive" in out["message"], err
        from pgdr.repository import Repository

        waiting = Repository(storage_of(config), "app").manifest("20261125-020000F")
        assert waiting.status == "waiting_for_wal"
        start, stop = parse_lsn(waiting.start_lsn), parse_lsn(waiting.stop_lsn)
        seg = segment_name(waiting.timeline, segment_of(start))
        # The backup's segment as a streamer had it, good only up to its start: a leftover partial.
        archive = WalArchive(storage_of(config), "app")
        archive.push_partial_bytes(seg, (pg.datadir / "pg_wal" / seg).read_bytes(), start + 8)
        assert archive.missing_between(waiting.timeline, start, start + 8) == []  # up to the safe LSN: there
        assert archive.missing_between(waiting.timeline, start, stop) == [seg]  # past it: not

        code, out, err = pgdr("--json", "backup", "--cluster", "app", "--label", "20261125-020000F",
                              "--wal-timeout", "2", config=config)
        assert code == 1 and seg in out["message"], (out, err)
        code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)
        assert {b["label"]: b["status"] for b in listing["backups"]}["20261125-020000F"] == "waiting_for_wal"

        # Every other segment is archived (push); the leftover partial's segment is not: a hole.
        # WAL after the hole, whatever segment the backups left the server in (a switch in an empty
        # segment does nothing): write, switch, and again, so a completed segment follows the hole.
        for _ in range(2):
            pg.psql("create table if not exists after_hole (x int); insert into after_hole values (1)")
            pg.psql("select pg_switch_wal()")
        current = pg.psql("select pg_walfile_name(pg_current_wal_lsn())")
        pushed = []
        for path in sorted(p for p in (pg.datadir / "pg_wal").iterdir() if len(p.name) == 24):
            if path.name < current and path.name != seg:
                assert pgdr("wal-push", "--batch", "0", "--cluster", "app", path, config=config)[0] == 0
                pushed.append(path.name)
        assert max(pushed) > seg, (pushed, seg)
        code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--backup", "20261125-010000F",
                            "--pgdata", workdir / f"{name}-never", "--target", "latest", "--dry-run", config=config)
        assert code == 1 and out["error"] == "restore_refused" and seg in out["message"], out
        code, report, _ = pgdr("--json", "wal-check", "--cluster", "app", config=config)
        assert code == 1 and any(g["missing_from"] == seg for g in report["gaps"]), report
    finally:
        pg.destroy()


def test_push_mode_lag_names_a_failing_archiver_and_passes_when_it_works(airflow_db, workdir, tmp_path, monkeypatch):
    """archive_command = pgdr wal-push into a repository the server's user cannot write: wal-lag
    and the WAL DAG's lag task fail naming pg_stat_archiver. Working archiving is not 'behind'."""
    tag = f"push-lag-{next(_n)}"
    repo = archive_repo(workdir, tag)
    good = write_config(workdir / f"{tag}.yaml", {"app": {"repository": repo, "wal": {"mode": "push"}}})
    good.chmod(0o644)  # archive_command runs as the server's user
    archive_command = f"{sys.executable} -m pgdr --config {good} -q wal-push --cluster app %p"
    name, pg = own_cluster(workdir, 15, "pushlag",
                           f"archive_mode = on\narchive_command = '{archive_command}'\n")
    try:
        cli = write_config(tmp_path / "cli.yaml", {"app": {"dsn": pg.dsn, "repository": repo,
                                                           "wal": {"mode": "push", "rpo_seconds": 600}}})
        from helpers import switch_and_wait_archived

        pg.psql("create table capture_rows as select generate_series(1, 1000) id")
        switch_and_wait_archived(pg)
        code, lag, err = pgdr("--json", "wal-lag", "--cluster", "app", config=cli)
        assert code == 0 and lag["ok"], (lag, err)
        pg.psql("insert into capture_rows select generate_series(1, 10)")  # the open segment: at risk by design
        code, lag, _ = pgdr("--json", "wal-lag", "--cluster", "app", config=cli)
        assert code == 0 and lag["ok"] and lag["mode"] == "push" and lag["archiver"]["failed_count"] == 0, lag

        # The repository becomes unwritable for the server's user: archive_command fails every time.
        repo_dir = repo.removeprefix("file://")
        os.chown(f"{repo_dir}/app", 0, 0)
        for p, dirs, files in os.walk(repo_dir):
            for d in dirs:
                os.chown(os.path.join(p, d), 0, 0)
        pg.psql("select pg_switch_wal()")
        wait_for(lambda: int(pg.psql("select failed_count from pg_stat_archiver")) > 0, "archive_command failed")
        code, lag, _ = pgdr("--json", "wal-lag", "--cluster", "app", config=cli)
        assert code == 1 and not lag["ok"]
        assert any("pg_stat_archiver" in p and "failing" in p for p in lag["problems"]), lag

        connections(monkeypatch, pg)
        dag_config = write_config(tmp_path / "dag.yaml", {"app": {"conn_id": "pgdr_app", "repository": repo,
                                                                  "wal": {"mode": "push"}}})
        dag = load_dag_module(monkeypatch, dag_config, "pgdr_wal").pgdr_app_wal
        assert [t.task_id for t in dag.tasks] == ["lag"]
        for t in dag.tasks:
            t.retries = 0
        run = dag.test()
        assert run.state == "failed"
        assert {ti.task_id: ti.state for ti in run.get_task_instances()} == {"lag": "failed"}
    finally:
        pg.destroy()


def test_wal_segment_size_other_than_16mib_is_refused(workdir, tmp_path):
    from conftest import _bins
    from pgdr.pgbin import as_user

    bins = _bins(18)
    pg = SandboxCluster(bins, workdir / f"segsize-{next(_n)}" / "data", free_port())
    pg.datadir.mkdir(parents=True, mode=0o700)
    pg.socket_dir.mkdir(exist_ok=True)
    os.chown(pg.datadir, *__import__("pgdr.pgbin", fromlist=["user_ids"]).user_ids("postgres"))
    os.chown(pg.socket_dir, *__import__("pgdr.pgbin", fromlist=["user_ids"]).user_ids("postgres"))
    subprocess.run(as_user([bins.tool("initdb"), "-D", str(pg.datadir), "-U", "postgres", "-A", "trust",
                            "--wal-segsize=1", "--no-sync"], "postgres"), check=True, capture_output=True)
    with open(pg.datadir / "postgresql.conf", "a") as f:
        f.write(f"\nport = {pg.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{pg.socket_dir}'\n"
                "wal_level = replica\nmax_wal_senders = 10\nfsync = off\n")
    pg.start()
    try:
        config = write_config(tmp_path / "seg.yaml", {"app": {"dsn": pg.dsn, "repository": f"file://{tmp_path}/r"}})
        pg.psql("create table t as select 1; select pg_switch_wal()")
        seg = sorted(p for p in (pg.datadir / "pg_wal").iterdir() if len(p.name) == 24)[0]
        code, out, _ = pgdr("--json", "wal-push", "--cluster", "app", seg, config=config)
        assert code == 1 and "16 MiB" in out["message"] and "wal_segment_size" in out["message"], out
        code, out, _ = pgdr("--json", "wal-stream", "--cluster", "app", "--duration", "1", config=config)
        assert code == 1 and "16 MiB" in out["message"], out
        assert not list(storage_of(config).list("app/wal/"))
    finally:
        pg.destroy()


def test_next_run_takes_the_slot_over_from_the_running_one(workdir):
    """Two streamers, as two overlapping WAL DAG runs: the second waits for the slot, the first sees
    it waiting, uploads what it holds and lets go; the second takes over. No gap, nothing twice."""
    name, pg = own_cluster(workdir, 18, "handover")
    config = write_config(workdir / f"{name}.yaml", {"app": {"dsn": pg.dsn, "repository": f"file://{workdir}/{name}-r"}})
    first = second = None
    try:
        pg.psql("create table capture_rows (id int primary key)")
        first = start_streamer(config, workdir / f"{name}-a", workdir / f"{name}-a.log")
        wait_for(lambda: pg.psql("select count(*) from pg_stat_replication") == "1", "first streaming")
        assert pgdr("--json", "backup", "--cluster", "app", config=config)[0] == 0
        pg.psql("insert into capture_rows select generate_series(1, 1000); select pg_switch_wal()")
        pg.psql("insert into capture_rows select generate_series(1001, 2000)")
        second = start_streamer(config, workdir / f"{name}-b", workdir / f"{name}-b.log")
        out, _ = first.communicate(timeout=120)  # the first ends by itself: it saw the second waiting
        assert first.returncode == 0, (workdir / f"{name}-a.log").read_text()[-2000:]
        assert json.loads(out)["stopped_because"] == "handed over to the next run"
        pg.psql("insert into capture_rows select generate_series(2001, 3000); select pg_switch_wal()")
        pg.psql("insert into capture_rows select generate_series(3001, 4000)")
        wait_for(lambda: archived_to(config, pg.psql("select pg_current_wal_lsn()")), "the second run archives")
        assert second.poll() is None  # still streaming, on the slot
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
        with restored_to_latest(config, workdir, pg) as (restored, _):
            assert rows(restored) == rows(pg) == f"4000:{sum(range(1, 4001))}"
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
        pg.destroy()
