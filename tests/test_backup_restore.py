"""End to end through the real CLI: PostgreSQL 15 and 18, file and S3 repositories.

Data restored must equal data written: every table's content hash is compared
with the source at backup time.
"""

from __future__ import annotations

import itertools

import pytest

from helpers import pgdr, repo_snapshot, table_hashes, write_config
from pgdr.config import parse_config
from pgdr.lsn import parse_lsn
from pgdr.sandbox import SandboxCluster, free_port
from pgdr.storage import open_storage

_n = itertools.count()


def config_for(pg, repo, tmp_path, **extra):
    return write_config(tmp_path / "pgdr.yaml", {"app": {"dsn": pg.dsn, "repository": repo, **extra}})


def storage_of(config):
    return open_storage(parse_config(__import__("yaml").safe_load(config.read_text())).cluster("app").repository)


def socket_dir(workdir):
    d = workdir / "sockets"
    d.mkdir(exist_ok=True)
    d.chmod(0o1777)
    return d


def restore_and_start(config, workdir, pg, label="latest", *extra):
    target = workdir / f"restore-{next(_n)}"
    port = free_port()
    code, result, err = pgdr("--json", "restore", "--cluster", "app", "--backup", label, "--pgdata", target,
                             "--start", "--port", port, "--socket-dir", socket_dir(workdir), *extra, config=config)
    assert code == 0, err
    return SandboxCluster(pg.bins, target, port), result


def test_backup_and_restore_round_trip(pg, repo_url, workdir, tmp_path):
    config = config_for(pg, repo_url, tmp_path)
    before = table_hashes(pg)
    assert {"app.public.blobs", "app.public.customers", "billing.ledger.invoices"} <= set(before)

    code, result, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err
    assert result["status"] == "ok" and result["label"].endswith("F")
    assert result["pg_version"].startswith(str(pg.bins.major))
    assert result["size"] > 4_000_000 and 0 < result["stored_size"] < result["size"]
    assert result["start_lsn"] and result["stop_lsn"] and result["timeline"] == 1
    assert "backup" in err and "committed" in err  # operators' log on stderr

    # Written after the backup: must not come back.
    pg.psql("insert into customers values (999999, 'after the backup')", dbname="app")
    try:
        code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)
        assert [b["label"] for b in listing["backups"]] == [result["label"]]
        code, info, _ = pgdr("--json", "info", "--cluster", "app", "--backup", "latest", config=config)
        assert info["label"] == result["label"] and len(info["files"][0]["sha256"]) == 64
        assert info["system_identifier"] == result["system_identifier"]

        restored, rres = restore_and_start(config, workdir, pg, result["label"])
        try:
            assert rres["pg_verifybackup"] == "ok (files, sizes, WAL)" and rres["started"] is True
            assert table_hashes(restored) == before
        finally:
            restored.destroy()
    finally:
        pg.psql("delete from customers where id = 999999", dbname="app")


@pytest.mark.parametrize("compression", ["lz4", "gzip", "none"])
def test_every_codec_restores(pg18, workdir, tmp_path, compression):
    config = config_for(pg18, f"file://{tmp_path}/repo", tmp_path, compression=compression)
    before = table_hashes(pg18)
    code, result, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err
    assert result["compression"] == compression
    restored, _ = restore_and_start(config, workdir, pg18)
    try:
        assert table_hashes(restored) == before
    finally:
        restored.destroy()


def test_backup_split_into_parts_restores(pg15, workdir, tmp_path):
    from pgdr.backup import run_backup
    from pgdr.postgres import ConnInfo

    config = config_for(pg15, f"file://{tmp_path}/repo", tmp_path)
    cluster = parse_config(__import__("yaml").safe_load(config.read_text())).cluster("app")
    before = table_hashes(pg15)
    result = run_backup(cluster, ConnInfo(pg15.dsn), storage_of(config), part_size=8 * 1024 * 1024)
    assert result.parts >= 3
    restored, rres = restore_and_start(config, workdir, pg15, "latest", "--verify-checksums")
    try:
        assert rres["parts_verified"] == result.parts
        assert rres["pg_verifybackup"] == "ok (files, sizes, checksums, WAL)"
        assert table_hashes(restored) == before
    finally:
        restored.destroy()


def test_backups_asked_for_within_one_second_are_each_taken(pg15, tmp_path):
    """Labels are to the second. A backup asked for with no label, within the second of the last one, waits
    for the next second's label (as pgBackRest's do) instead of answering "already exists" with the backup
    taken a moment ago, which holds nothing of what changed since."""
    import time

    from pgdr.backup import run_backup
    from pgdr.postgres import ConnInfo

    config = config_for(pg15, f"file://{tmp_path}/repo", tmp_path)
    cluster = parse_config(__import__("yaml").safe_load(config.read_text())).cluster("app")
    storage = storage_of(config)
    run_backup(cluster, ConnInfo(pg15.dsn), storage)  # imports and first connection out of the way
    time.sleep(1.02 - time.time() % 1.0)  # a second begins: the next two backups of this small cluster fit in it
    first = run_backup(cluster, ConnInfo(pg15.dsn), storage)
    pg15.psql("insert into customers values (990001, 'after the first backup')", dbname="app")
    try:
        second = run_backup(cluster, ConnInfo(pg15.dsn), storage)
    finally:
        pg15.psql("delete from customers where id = 990001", dbname="app")
    assert (first.status, second.status) == ("ok", "ok")
    assert second.label > first.label
    assert parse_lsn(second.start_lsn) > parse_lsn(first.stop_lsn)  # taken after the insert, not the first again
    # A label given is a retry's: answered with the backup it names.
    assert run_backup(cluster, ConnInfo(pg15.dsn), storage, label=first.label).status == "already_exists"


def test_a_label_taken_within_this_second_waits_for_the_next_seconds():
    from datetime import datetime, timedelta, timezone

    from pgdr.backup import label_now
    from pgdr.labels import make_incr_label, make_label

    now = [datetime(2026, 12, 4, 10, 0, 0, 300000, tzinfo=timezone.utc)]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += timedelta(seconds=seconds)

    def clock():
        return now[0]

    taken = {"20261204-100000F", "20261201-000000F_20261204-100001I"}
    assert label_now(make_label, taken.__contains__, clock, sleep) == "20261204-100001F"
    assert len(slept) == 1 and 0.700 < slept[0] <= 0.702  # to just past the next second, no longer
    slept.clear()
    assert label_now(make_label, taken.__contains__, clock, sleep) == "20261204-100001F" and slept == []
    # An incremental's label too (its chain's full, then the second).
    assert label_now(lambda t: make_incr_label("20261201-000000F", t), taken.__contains__, clock,
                     sleep) == "20261201-000000F_20261204-100002I" and len(slept) == 1
    # A clock that does not move: three waits, then the label as it is (the backup answers "already exists").
    slept.clear()
    assert label_now(make_label, lambda label: True, clock, slept.append) == "20261204-100002F"
    assert len(slept) == 3


def test_same_label_is_idempotent_and_unfinished_leftovers_are_replaced(pg18, tmp_path):
    config = config_for(pg18, f"file://{tmp_path}/repo", tmp_path)
    storage = storage_of(config)
    storage.put_bytes("app/backup/20261125-020000F/base.tar.00000.zst", b"half-written junk")
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)
    assert listing["backups"][0]["status"] == "unfinished"
    code, _, err = pgdr("--json", "restore", "--cluster", "app", "--backup", "20261125-020000F",
                        "--pgdata", tmp_path / "x", config=config)
    assert code == 1 and "no backup 20261125-020000F" in err

    code, first, err = pgdr("--json", "backup", "--cluster", "app", "--label", "20261125-020000F", config=config)
    assert code == 0 and first["status"] == "ok", err
    assert storage.get_bytes("app/backup/20261125-020000F/base.tar.00000.zst") != b"half-written junk"
    snapshot = repo_snapshot(storage)
    code, second, err = pgdr("--json", "backup", "--cluster", "app", "--label", "20261125-020000F", config=config)
    assert code == 0 and second["status"] == "already_exists" and second["stop_lsn"] == first["stop_lsn"]
    assert repo_snapshot(storage) == snapshot
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)
    assert [(b["label"], b["status"]) for b in listing["backups"]] == [("20261125-020000F", "ok")]
