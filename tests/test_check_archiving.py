"""`pgdr check` sees what breaks archiving and restores (issue 10, part 6): a failing archive_command
(pg_stat_archiver), a repository the server's OS user cannot write (probed as that user), in stream mode
the slot against the archive. Real PostgreSQL 15 with a real archive_command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from helpers import PGDR_FAST, pgdr, write_config
from pgdr.sandbox import SandboxCluster, free_port


def _wait(pg, sql, what, timeout=120):
    deadline = time.monotonic() + timeout
    while pg.psql(sql) != "t":
        assert time.monotonic() < deadline, f"{what}:\n" + (pg.datadir / "server.log").read_text()[-3000:]
        time.sleep(0.2)


def test_a_failing_archive_command_fails_check_naming_pg_stat_archiver(workdir):
    from conftest import _bins

    base = workdir / "check-archiver"
    repo = base / "repo"
    repo.mkdir(parents=True)
    repo.chmod(0o700)  # root's: the server's user (postgres) cannot write it
    config = write_config(base / "pgdr.yaml", {"app": {
        "dsn": "", "repository": f"file://{repo}", "wal": {"mode": "push"}}})
    config.chmod(0o644)
    archive = f"{sys.executable} -m pgdr --config {config} -q wal-push --cluster app %p"
    pg = SandboxCluster(_bins(15), base / "data", free_port())
    pg.init(extra_conf=f"archive_mode = on\narchive_command = '{archive}'\n").start()
    try:
        config = write_config(base / "pgdr.yaml", {"app": {
            "dsn": pg.dsn, "repository": f"file://{repo}", "wal": {"mode": "push"}}})
        config.chmod(0o644)
        pg.psql("create table t as select generate_series(1, 1000) g; select pg_switch_wal()")
        _wait(pg, "select failed_count > 0 from pg_stat_archiver", "archive_command never failed")

        code, report, err = pgdr("--json", "check", "--cluster", "app", config=config)
        assert code == 1, report
        checks = {c["name"]: c for c in report["checks"]}
        assert checks["repository_write"]["ok"]  # pgdr itself, as root, can write: not the point
        assert not checks["archiver"]["ok"] and checks["archiver"]["critical"]
        assert "pg_stat_archiver" in checks["archiver"]["detail"] and "failing" in checks["archiver"]["detail"]
        probe = checks["push_probe"]
        assert not probe["ok"] and probe["critical"]
        assert "as postgres" in probe["detail"] and "not writable by postgres" in probe["detail"], probe
        assert checks["wal_segment_size"]["ok"]

        # Fixed: the server's user may write the repository; once the archiver catches up, check is ready.
        shutil.chown(repo, "postgres", "postgres")
        pg.psql("select pg_switch_wal()")
        _wait(pg, "select last_archived_time > coalesce(last_failed_time, '-infinity') from pg_stat_archiver",
              "the archiver never recovered")
        code, report, err = pgdr("--json", "check", "--cluster", "app", config=config)
        checks = {c["name"]: c for c in report["checks"]}
        assert code == 0, report
        assert checks["archiver"]["ok"] and "earlier failures" in checks["archiver"]["detail"]
        assert checks["push_probe"]["ok"] and "as postgres" in checks["push_probe"]["detail"]

        # archive_command through the compiled front: the probe goes through it to the pgdr beside it; a front
        # copied away from its pgdr is named as the cause.
        lonely = base / "lonely" / "pgdr-fast"
        lonely.parent.mkdir()
        shutil.copy(PGDR_FAST, lonely)
        for command, ok in ((lonely, False), (PGDR_FAST, True)):
            pg.psql(f"alter system set archive_command = '{command} --config {config} -q wal-push --cluster app %p'")
            pg.psql("select pg_reload_conf()")
            code, report, err = pgdr("--json", "check", "--cluster", "app", config=config)
            probe = {c["name"]: c for c in report["checks"]}["push_probe"]
            assert probe["ok"] is ok and (code == 0) is ok, report
            if not ok:
                assert "pgdr-fast cannot run the pgdr beside it as postgres" in probe["detail"], probe
                assert str(lonely.parent / "pgdr") in probe["detail"], probe
    finally:
        pg.destroy()


def test_stream_mode_check_reports_the_slot_against_the_archive(pg15, tmp_path):
    config = write_config(tmp_path / "pgdr.yaml", {"checkslot": {"dsn": pg15.dsn, "repository": f"file://{tmp_path}/r"}})
    code, report, _ = pgdr("--json", "check", "--cluster", "checkslot", config=config)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 0 and checks["replication_slot"]["ok"] and "does not exist yet" in checks["replication_slot"]["detail"]
    # The archive holds WAL but the slot is gone (dropped, or lost in a failover): a gap, not "ready".
    from test_wal import completed_segments

    seg = completed_segments(pg15, 1)[0]
    assert pgdr("wal-push", "--cluster", "checkslot", seg, config=config)[0] == 0
    code, report, _ = pgdr("--json", "check", "--cluster", "checkslot", config=config)
    checks = {c["name"]: c for c in report["checks"]}
    slot = checks["replication_slot"]
    assert not slot["ok"] and "is missing" in slot["detail"] and "take a full backup" in slot["detail"]
    # Reported, not critical: a new full backup is the remedy, so check must not stop the backup DAG.
    assert code == 0 and not slot["critical"]


def test_a_wal_segment_size_other_than_16_mib_is_refused_by_check(workdir):
    from conftest import _bins
    from pgdr.pgbin import as_user

    pg = SandboxCluster(_bins(15), workdir / "check-segsize" / "data", free_port())
    pg.init()
    subprocess.run(as_user([pg.bins.tool("pg_resetwal"), "--wal-segsize=32", "-D", str(pg.datadir)], pg.user),
                   check=True, capture_output=True)
    pg.start()
    try:
        config = write_config(workdir / "check-segsize" / "pgdr.yaml", {"app": {
            "dsn": pg.dsn, "repository": f"file://{workdir}/check-segsize/repo"}})
        code, report, _ = pgdr("--json", "check", "--cluster", "app", config=config)
        seg = {c["name"]: c for c in report["checks"]}["wal_segment_size"]
        assert code == 1 and not seg["ok"] and seg["critical"]
        assert "33554432" in seg["detail"] and "16 MiB segments only" in seg["detail"]
        # ... and so is a backup, before anything reaches the repository.
        code, out, err = pgdr("--json", "backup", "--cluster", "app", config=config)
        assert code != 0 and "only 16 MiB" in out["message"], err
        assert not (workdir / "check-segsize" / "repo" / "app" / "backup").exists()
    finally:
        pg.destroy()
