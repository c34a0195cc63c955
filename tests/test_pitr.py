"""Point-in-time restore on PostgreSQL 15 and 18: archive_command = pgdr wal-push,
rows written in steps, and a restore to each kind of target must hold exactly
what had committed at that point."""

from __future__ import annotations

import itertools
import shutil
import sys
import time

import pytest

from helpers import archive_repo, pgdr, switch_and_wait_archived, write_config
from pgdr.sandbox import SandboxCluster, free_port
from test_backup_restore import socket_dir

_n = itertools.count()


def rows(cluster) -> list[tuple]:
    out = cluster.psql("select coalesce(string_agg(step || ':' || id, ',' order by id), '') from steps", dbname="app")
    return out.split(",") if out else []


@pytest.fixture(scope="module", params=[15, 18], ids=["pg15-file-push", "pg18-s3-push"])
def history(request, workdir):
    """A dedicated cluster archiving with `pgdr wal-push`, one backup, then three steps of writes."""
    major = request.param
    from conftest import _bins

    tag = f"pitr{major}"
    repo = archive_repo(workdir, tag, None if major == 15 else request.getfixturevalue("s3_server"))
    pg = SandboxCluster(_bins(major), workdir / tag / "data", free_port())
    config = write_config(workdir / f"{tag}.yaml", {"app": {"dsn": pg.dsn, "repository": repo}})
    config.chmod(0o644)
    archive_command = f"{sys.executable} -m pgdr --config {config} -q wal-push --cluster app %p"
    pg.init(extra_conf=f"archive_mode = on\narchive_command = '{archive_command}'\n").start()
    pg.psql("create database app")
    pg.psql("create table steps (id int primary key, step int)", dbname="app")
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err

    marks = {"backup": backup, "expected": {}}
    time.sleep(1.1)  # commit timestamps after the backup's end

    def step(n):
        pg.psql(f"insert into steps select g, {n} from generate_series({n * 100}, {n * 100 + 9}) g", dbname="app")

    step(1)
    marks["time1"] = pg.psql("select clock_timestamp()")
    marks["expected"]["step1"] = rows(pg)
    pg.psql("select pg_create_restore_point('after_step1')")
    time.sleep(0.2)
    xid = pg.psql(f"begin; insert into steps select g, 2 from generate_series(200, 209) g; "
                  f"select txid_current(); commit;", dbname="app")
    marks["xid2"] = xid.split()[-1] if xid else None
    marks["lsn2"] = pg.psql("select pg_current_wal_lsn()")
    marks["expected"]["step2"] = rows(pg)
    step(3)
    marks["expected"]["step3"] = rows(pg)
    switch_and_wait_archived(pg)
    yield pg, config, marks
    pg.destroy()


def restore(config, workdir, *target, expect=0):
    dest = workdir / f"pitr-restore-{next(_n)}"
    port = free_port()
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--start", "--port", port,
                          "--socket-dir", socket_dir(workdir), *target, config=config)
    assert code == expect, err
    return out, (SandboxCluster(_bins_of(config), dest, port) if code == 0 else None)


def _bins_of(config):
    from conftest import _bins

    return _bins(15 if "pitr15" in str(config) else 18)


@pytest.mark.parametrize("target, step, state", [
    (("--target-time", "TIME1"), "step1", "promoted"),
    (("--target-name", "after_step1"), "step1", "promoted"),
    (("--target-xid", "XID2"), "step2", "promoted"),
    (("--target-xid", "XID2", "--target-exclusive"), "step1", "promoted"),
    (("--target-lsn", "LSN2", "--target-action", "pause"), "step2", "paused"),
    (("--target", "latest"), "step3", "promoted"),
])
def test_restore_reaches_exactly_the_target(history, workdir, target, step, state):
    pg, config, marks = history
    target = tuple(t.replace("TIME1", marks["time1"].replace(" ", "T")).replace("XID2", marks["xid2"])
                   .replace("LSN2", marks["lsn2"]) for t in target)
    out, restored = restore(config, workdir, *target)
    try:
        assert out["recovery"]["state"] == state
        assert out["recovery"]["plan"]["backup"] == marks["backup"]["label"]
        assert rows(restored) == marks["expected"][step]
        assert out["recovery"]["reached_lsn"]
    finally:
        restored.destroy()


def test_shutdown_action_leaves_the_server_stopped_at_the_target(history, workdir):
    pg, config, marks = history
    dest = workdir / f"pitr-shutdown-{next(_n)}"
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--start", "--port", free_port(),
                          "--socket-dir", socket_dir(workdir), "--target-name", "after_step1",
                          "--target-action", "shutdown", config=config)
    assert code == 0, err
    assert out["recovery"]["state"] == "shut down" and "after_step1" in out["recovery"]["stopped_at"]
    assert not (dest / "postmaster.pid").exists()
    shutil.rmtree(dest)


def test_immediate_target_is_the_backup_itself(history, workdir):
    pg, config, marks = history
    out, restored = restore(config, workdir, "--target", "immediate")
    try:
        assert rows(restored) == []
    finally:
        restored.destroy()


def test_unreachable_targets_are_refused_before_anything_is_written(history, workdir):
    pg, config, marks = history
    dest = workdir / "never-written"
    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest,
                        "--target-time", "2020-01-01T00:00:00+00:00", config=config)
    assert code == 1 and out["error"] == "restore_refused" and "before the end of the oldest backup" in out["message"]
    assert "reachable: from" in out["message"] and not dest.exists()
    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--target-lsn", "FF/0",
                        config=config)
    assert code == 1 and "after the newest archived WAL" in out["message"] and not dest.exists()
    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--target-time", "yesterday",
                        config=config)
    assert code == 2 and "ISO 8601" in out["message"]


def test_dry_run_prints_the_plan(history, workdir):
    pg, config, marks = history
    dest = workdir / "dry"
    code, plan, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--target", "latest",
                         "--dry-run", config=config)
    assert code == 0 and plan["backup"] == marks["backup"]["label"] and plan["wal_from"] == marks["backup"]["stop_lsn"]
    assert not dest.exists()


def test_restore_follows_a_later_timeline_after_a_promoted_restore(history, workdir):
    """Restore to step 1 and promote (timeline 2); that server archives into the same repository and
    takes new writes; a later restore to 'latest' follows timeline 2, not the original timeline 1."""
    pg, config, marks = history
    out, tl2 = restore(config, workdir, "--target-name", "after_step1", "--keep-archiving")
    try:
        assert out["recovery"]["timeline"] == 2  # archiving with the source's archive_command (pgdr wal-push)
        tl2.psql("insert into steps select g, 9 from generate_series(900, 904) g", dbname="app")
        expected = rows(tl2)
        tl2.psql("select pg_switch_wal()")
        for _ in range(300):
            if tl2.psql("select last_archived_wal like '00000002%' from pg_stat_archiver") == "t" and \
                    tl2.psql("select last_archived_wal >= pg_walfile_name(pg_current_wal_lsn() - 1) "
                             "from pg_stat_archiver") == "t":
                break
            time.sleep(0.1)
        assert tl2.psql("select failed_count from pg_stat_archiver") == "0"
    finally:
        tl2.destroy()
    code, check, _ = pgdr("--json", "wal-check", "--cluster", "app", config=config)
    assert "00000002.history" in check["history"]

    out, latest = restore(config, workdir, "--target", "latest")
    try:
        assert out["recovery"]["plan"]["timeline"] == 2
        assert rows(latest) == expected  # step 1 and the timeline-2 rows; not steps 2 and 3
    finally:
        latest.destroy()
    out, original = restore(config, workdir, "--target", "latest", "--target-timeline", "1")
    try:
        assert rows(original) == marks["expected"]["step3"]
    finally:
        original.destroy()
