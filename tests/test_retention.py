"""Retention: the pure planner over a synthetic 90-day catalog, and real expiry."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pgdr.errors import IntegrityError
from pgdr.retention import CatalogItem, RetentionPolicy, plan_retention

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def daily(days=90, **overrides):
    items = []
    for d in range(days, 0, -1):
        t = NOW - timedelta(days=d)
        label = t.strftime("%Y%m%d-%H%M%SF")
        items.append(CatalogItem(label, "ok", t + timedelta(minutes=5), f"0/{days + 1 - d:X}000000",
                                 **overrides.get(label, {})))
    return items


def expire_as_of(config, now):
    """`pgdr expire` as of a simulated later time (the CLI refuses a future --now unless --dry-run)."""
    from pgdr.config import load_config
    from pgdr.retention import run_expire
    from test_backup_restore import storage_of

    cluster = load_config(config).cluster("app")
    now = datetime.fromisoformat(now) if isinstance(now, str) else now
    return run_expire(cluster, storage_of(config), RetentionPolicy(cluster.retention_window_days,
                                                                   cluster.retention_min_full),
                      now, False, simulated_now=True)


def _content(snapshot):
    """A repository snapshot without the cluster lock's records (bookkeeping every locked run writes)."""
    return {k: v for k, v in snapshot.items() if "/lock/" not in k}


def decisions(plan):
    return {d["label"]: (d["action"], d["reason"]) for d in plan.decisions}


def test_window_and_its_base_are_kept_everything_older_expires():
    plan = plan_retention(daily(), RetentionPolicy(window_days=30, min_full=2), NOW)
    d = decisions(plan)
    kept = sorted(k for k, (a, _) in d.items() if a == "keep")
    assert len(kept) == 31  # 30 days in the window + the base backup just before it
    base = (NOW - timedelta(days=31)).strftime("%Y%m%d-%H%M%SF")
    assert d[base] == ("keep", "kept: base backup for the start of the recovery window")
    assert all(a == "expire" for k, (a, _) in d.items() if k < base)
    assert plan.keep_wal_from_lsn == "0/3C000000"  # the base backup's (day 31's) start: WAL before it may go


def test_minimum_count_pins_and_newest_verified_survive():
    items = [CatalogItem("20260101-000000F", "ok", datetime(2026, 1, 1, 0, 5, tzinfo=timezone.utc), "0/1000000",
                         pinned_until=datetime(2027, 1, 1, tzinfo=timezone.utc)),
             CatalogItem("20260201-000000F", "ok", datetime(2026, 2, 1, 0, 5, tzinfo=timezone.utc), "0/2000000",
                         verified_ok=True),
             CatalogItem("20260301-000000F", "ok", datetime(2026, 3, 1, 0, 5, tzinfo=timezone.utc), "0/3000000"),
             CatalogItem("20260401-000000F", "ok", datetime(2026, 4, 1, 0, 5, tzinfo=timezone.utc), "0/4000000"),
             CatalogItem("20260501-000000F", "ok", datetime(2026, 5, 1, 0, 5, tzinfo=timezone.utc), "0/5000000")]
    d = decisions(plan_retention(items, RetentionPolicy(window_days=30, min_full=2), NOW))
    assert d["20260101-000000F"][1].startswith("kept: pinned until 2027-01-01")
    assert d["20260201-000000F"][1] == "kept: the newest backup that passed verification"
    assert d["20260301-000000F"][0] == "expire"
    assert d["20260401-000000F"][1] == "kept: among the newest 2 full backups"
    assert d["20260501-000000F"][1] == "kept: base backup for the start of the recovery window"


def test_an_unreadable_manifest_stops_everything():
    items = daily(40) + [CatalogItem("20260101-000000F", "unreadable")]
    with pytest.raises(IntegrityError, match="before deleting anything: unreadable backup"):
        plan_retention(items, RetentionPolicy(), NOW)


def test_unfinished_leftovers_expire_after_the_grace_period():
    items = [CatalogItem("20261120-000000F", "unfinished", datetime(2026, 11, 20, tzinfo=timezone.utc)),
             CatalogItem("20261125-113000F", "unfinished", datetime(2026, 11, 25, 11, 30, tzinfo=timezone.utc))]
    d = decisions(plan_retention(items, RetentionPolicy(), NOW))
    assert d["20261120-000000F"][0] == "expire" and d["20261125-113000F"][0] == "keep"


def test_expire_real_backups_keeps_pins_fails_closed_and_restores_still_work(pg15, workdir):
    from datetime import datetime as dt

    from helpers import pgdr, repo_snapshot, table_hashes, write_config
    from test_backup_restore import restore_and_start, storage_of

    repo = f"file://{workdir}/retention-repo"
    config = write_config(workdir / "retention.yaml", {"app": {"dsn": pg15.dsn, "repository": repo,
                                                               "retention_window_days": 30, "retention_min_full": 1}})
    labels = []
    for label in ("20261101-000000F", "20261102-000000F", "20261103-000000F"):
        code, out, err = pgdr("--json", "backup", "--cluster", "app", "--label", label, config=config)
        assert code == 0, err
        labels.append(label)
    code, pin, _ = pgdr("--json", "keep", "--cluster", "app", "--backup", labels[0], "--until", "2099-01-01",
                        config=config)
    assert code == 0 and pin["until"].startswith("2099-01-01")
    later = (dt.now(timezone.utc) + timedelta(days=60)).isoformat()
    storage = storage_of(config)

    # Dry run: reasons, nothing deleted.
    before = repo_snapshot(storage)
    code, out, _ = pgdr("--json", "expire", "--cluster", "app", "--dry-run", "--now", later, config=config)
    d = {x["label"]: x for x in out["plan"]["decisions"]}
    assert code == 0 and d[labels[1]]["action"] == "expire" and d[labels[0]]["reason"].startswith("kept: pinned")
    assert d[labels[2]]["action"] == "keep" and repo_snapshot(storage) == before

    # One unreadable manifest: nothing at all is deleted.
    key = f"app/backup/{labels[2]}/manifest.json"
    good = storage.get_bytes(key)
    storage.put_bytes(key, b"{not json")
    with pytest.raises(IntegrityError, match="before deleting anything"):
        expire_as_of(config, later)
    storage.put_bytes(key, good)
    assert _content(repo_snapshot(storage)) == _content(before)

    out = expire_as_of(config, later)
    assert out["deleted_backups"] == [labels[1]]
    assert storage.list(f"app/backup/{labels[1]}/") == []
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)
    assert [b["label"] for b in listing["backups"]] == [labels[0], labels[2]]
    # The oldest surviving (pinned) backup still restores.
    expected = table_hashes(pg15)
    restored, _ = restore_and_start(config, workdir, pg15, labels[0])
    try:
        assert table_hashes(restored) == expected
    finally:
        restored.destroy()
    assert pgdr("--json", "unkeep", "--cluster", "app", "--backup", labels[0], config=config)[0] == 0
    code, out, _ = pgdr("--json", "expire", "--cluster", "app", "--dry-run", "--now", later, config=config)
    assert {x["label"]: x["action"] for x in out["plan"]["decisions"]}[labels[0]] == "expire"


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_after_expiry_the_oldest_point_in_the_window_still_restores(backend, workdir, request):
    """Real backups and archived WAL; expire with the clock a day on; then a point-in-time restore to the very
    start of the recovery window must hold exactly what had committed by then."""
    import sys
    import time
    from datetime import datetime as dt

    from conftest import _bins
    from helpers import archive_repo, pgdr, switch_and_wait_archived, write_config
    from pgdr.sandbox import SandboxCluster, free_port
    from test_backup_restore import socket_dir, storage_of

    tag = f"window-{backend}"
    repo = archive_repo(workdir, tag, None if backend == "file" else request.getfixturevalue("s3_server"))
    pg = SandboxCluster(_bins(15), workdir / tag / "data", free_port())
    config = write_config(workdir / f"{tag}.yaml", {"app": {"dsn": pg.dsn, "repository": repo,
                                                            "retention_window_days": 1, "retention_min_full": 1}})
    config.chmod(0o644)
    archive = f"{sys.executable} -m pgdr --config {config} -q wal-push --cluster app %p"
    pg.init(extra_conf=f"archive_mode = on\narchive_command = '{archive}'\n").start()
    try:
        pg.psql("create database app")
        pg.psql("create table t (id int primary key, step text)", dbname="app")

        def step(name, ids):
            pg.psql(f"insert into t select g, '{name}' from generate_series({ids[0]}, {ids[1]}) g", dbname="app")

        def backup(label):
            code, out, err = pgdr("--json", "backup", "--cluster", "app", "--label", label, config=config)
            assert code == 0, err

        backup("20261120-000000F")  # will fall out of the window
        step("s0", (1, 10))
        backup("20261121-000000F")  # the window's base
        step("s1", (11, 20))
        t1 = dt.fromisoformat(pg.psql("select to_char(clock_timestamp() at time zone 'utc', "
                                      "'YYYY-MM-DD\"T\"HH24:MI:SS.US+00:00')"))
        expected = pg.psql("select string_agg(id::text, ',' order by id) from t", dbname="app")
        time.sleep(1.5)
        backup("20261122-000000F")  # inside the window
        step("s2", (21, 30))
        switch_and_wait_archived(pg)

        window_start = t1 + timedelta(seconds=0.7)
        now = window_start + timedelta(days=1)
        out = expire_as_of(config, now)
        assert out["deleted_backups"] == ["20261120-000000F"] and out["deleted_wal_segments"], out
        assert dt.fromisoformat(out["plan"]["window_start"]) == window_start
        assert storage_of(config).list("app/backup/20261120-000000F/") == []

        dest, port = workdir / f"{tag}-restore", free_port()
        code, res, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--start", "--port", port,
                              "--socket-dir", socket_dir(workdir), "--target-time", window_start.isoformat(),
                              config=config)
        assert code == 0, err
        restored = SandboxCluster(pg.bins, dest, port)
        try:
            assert res["recovery"]["plan"]["backup"] == "20261121-000000F"
            assert restored.psql("select string_agg(id::text, ',' order by id) from t", dbname="app") == expected
            assert expected == ",".join(str(i) for i in range(1, 21))
        finally:
            restored.destroy()
    finally:
        pg.destroy()


class _ListingFails:
    """A real repository whose listing of one prefix fails, as an S3 outage or a permission change would."""

    def __init__(self, storage, prefix):
        self._s, self._prefix = storage, prefix

    def __getattr__(self, name):
        return getattr(self._s, name)

    def list(self, prefix=""):
        from pgdr.errors import RepositoryError

        if prefix.startswith(self._prefix):
            raise RepositoryError(f"cannot list {prefix}: SlowDown: Please reduce your request rate")
        return self._s.list(prefix)


@pytest.mark.parametrize("fail_on", ["app/backup/", "app/backup/20261101-000000F/", "app/wal/"])
def test_a_failed_listing_deletes_nothing(pg15, repo_url, workdir, fail_on):
    from helpers import pgdr, repo_snapshot, write_config
    from pgdr.config import load_config
    from pgdr.errors import RepositoryError
    from pgdr.retention import run_expire
    from test_backup_restore import storage_of
    from test_wal import completed_segments

    config = write_config(workdir / f"failed-listing-{fail_on.count('/')}-{id(repo_url)}.yaml", {"app": {
        "dsn": pg15.dsn, "repository": repo_url, "retention_window_days": 30, "retention_min_full": 1}})
    for seg in completed_segments(pg15, 2):  # WAL older than every backup: expirable
        assert pgdr("wal-push", "--cluster", "app", seg, config=config)[0] == 0
    for label in ("20261101-000000F", "20261102-000000F"):
        assert pgdr("backup", "--cluster", "app", "--label", label, config=config)[0] == 0
    storage = storage_of(config)
    before = repo_snapshot(storage)
    later = datetime.now(timezone.utc) + timedelta(days=60)
    cluster = load_config(config).cluster("app")
    with pytest.raises(RepositoryError, match="SlowDown"):
        run_expire(cluster, _ListingFails(storage, fail_on), RetentionPolicy(30, 1), later, dry_run=False,
                   simulated_now=True)
    assert _content(repo_snapshot(storage)) == _content(before)
    # With the store healthy again the same run deletes the old backup and the WAL before the kept one.
    out = run_expire(cluster, storage, RetentionPolicy(30, 1), later, dry_run=False, simulated_now=True)
    assert out["deleted_backups"] == ["20261101-000000F"] and len(out["deleted_wal_segments"]) >= 2
