"""Bad input gets a clear error, a non-zero exit, and leaves the repository as it was."""

from __future__ import annotations

import boto3

from helpers import pgdr, repo_snapshot, write_config
from pgdr.config import parse_config
from pgdr.sandbox import free_port
from pgdr.storage import open_storage
from test_backup_restore import config_for, storage_of


def backed_up(pg, repo, tmp_path):
    config = config_for(pg, repo, tmp_path)
    code, result, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err
    return config, result


def test_corrupted_byte_is_caught_and_target_left_empty(pg18, repo_url, tmp_path):
    config, result = backed_up(pg18, repo_url, tmp_path)
    storage = storage_of(config)
    key = f"app/backup/{result['label']}/base.tar.00000.zst"
    data = bytearray(storage.get_bytes(key))
    data[len(data) // 3] ^= 0x01
    storage.put_bytes(key, bytes(data))
    snapshot = repo_snapshot(storage)
    target = tmp_path / "target"
    target.mkdir()
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", target, config=config)
    assert code == 1
    assert out["error"] in ("integrity",) and key in out["message"]
    assert list(target.iterdir()) == []  # emptied again, not half-restored
    assert repo_snapshot(storage) == snapshot


def test_unknown_and_malformed_labels(pg15, tmp_path):
    config, _ = backed_up(pg15, f"file://{tmp_path}/repo", tmp_path)
    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--backup", "20200101-000000F",
                        "--pgdata", tmp_path / "t", config=config)
    assert code == 1 and out["error"] == "backup_not_found" and "20200101-000000F" in out["message"]
    code, out, _ = pgdr("--json", "info", "--cluster", "app", "--backup", "yesterday", config=config)
    assert code == 2 and out["error"] == "usage" and "not a backup label" in out["message"]
    assert not (tmp_path / "t").exists()


def test_unreachable_server_changes_nothing(tmp_path, workdir):
    repo = f"file://{tmp_path}/repo"
    config = write_config(tmp_path / "pgdr.yaml", {"app": {
        "dsn": f"host=127.0.0.1 port={free_port()} user=postgres dbname=postgres", "repository": repo}})
    code, out, _ = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 1 and out["error"] == "postgres" and "cannot connect to PostgreSQL at postgres@127.0.0.1" in out["message"]
    assert not (tmp_path / "repo").exists()
    code, report, _ = pgdr("--json", "check", "--cluster", "app", config=config)
    assert code == 1 and report["ok"] is False
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["connection"]["ok"] is False and checks["connection"]["critical"] is True
    assert checks["repository_write"]["ok"] is True


def test_unwritable_repository(pg15, tmp_path):
    (tmp_path / "plainfile").write_text("x")
    config = config_for(pg15, f"file://{tmp_path}/plainfile/repo", tmp_path)
    code, out, _ = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 1 and out["error"] == "repository" and "cannot write" in out["message"]
    assert (tmp_path / "plainfile").read_text() == "x"
    code, report, _ = pgdr("--json", "check", "--cluster", "app", config=config)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 1 and checks["repository_write"]["ok"] is False and checks["connection"]["ok"] is True


def test_missing_bucket(pg15, s3_server, tmp_path):
    config = config_for(pg15, {"url": "s3://bucket-that-does-not-exist/p", "endpoint_url": s3_server,
                               "region": "us-east-1"}, tmp_path)
    code, out, _ = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 1 and out["error"] == "repository" and "NoSuchBucket" in out["message"]


def test_non_empty_or_running_target_is_refused_untouched(pg15, tmp_path):
    config, _ = backed_up(pg15, f"file://{tmp_path}/repo", tmp_path)
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", target, config=config)
    assert code == 1 and out["error"] == "restore_refused" and "is not empty (precious.txt)" in out["message"]
    assert [p.name for p in target.iterdir()] == ["precious.txt"] and (target / "precious.txt").read_text() == "keep me"

    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", pg15.datadir, config=config)
    assert code == 1 and "running PostgreSQL server" in out["message"]
    assert pg15.psql("select 1") == "1"


def test_another_cluster_cannot_write_into_the_same_repository(pg15, pg18, tmp_path):
    repo = f"file://{tmp_path}/repo"
    backed_up(pg15, repo, tmp_path)
    storage = open_storage(parse_config({"clusters": {"app": {"repository": repo}}}).cluster("app").repository)
    snapshot = repo_snapshot(storage)
    config = config_for(pg18, repo, tmp_path)
    code, out, _ = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 1 and "refusing to mix" in out["message"]
    assert repo_snapshot(storage) == snapshot


def test_held_lock_refuses_a_second_backup(pg15, tmp_path):
    from pgdr.lock import ClusterLock

    config = config_for(pg15, f"file://{tmp_path}/repo", tmp_path)
    storage = storage_of(config)
    with ClusterLock(storage, "app/lock.json", "backup by someone else"):
        code, out, _ = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 1 and out["error"] == "locked" and "backup by someone else" in out["message"]
    assert [o.key for o in storage.list("app/backup/")] == []


def test_s3_corruption_on_the_server_side_is_named(pg15, s3_server, s3_bucket, tmp_path):
    """Same as the byte flip above, but done behind pgdr's back with a raw S3 client."""
    config, result = backed_up(pg15, {"url": f"s3://{s3_bucket}/r", "endpoint_url": s3_server,
                                      "region": "us-east-1"}, tmp_path)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    key = f"r/app/backup/{result['label']}/base.tar.00000.zst"
    body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=s3_bucket, Key=key, Body=body[:-100])  # truncated
    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", tmp_path / "t", config=config)
    assert code == 1 and out["error"] == "integrity" and "base.tar.00000.zst" in out["message"]
    assert not (tmp_path / "t").exists()


def test_tablespaces_are_refused_with_a_clear_message(pg15, tmp_path, workdir):
    import os
    import shutil

    config = config_for(pg15, f"file://{tmp_path}/repo", tmp_path)
    location = workdir / "tblspc"
    location.mkdir()
    shutil.chown(location, "postgres", "postgres")
    os.chmod(location, 0o700)
    pg15.psql(f"create tablespace extra location '{location}'")
    try:
        code, out, _ = pgdr("--json", "backup", "--cluster", "app", config=config)
        assert code == 1 and "extra tablespaces (extra)" in out["message"] and "refuses" in out["message"]
        code, report, _ = pgdr("--json", "check", "--cluster", "app", config=config)
        checks = {c["name"]: c for c in report["checks"]}
        assert code == 1 and checks["tablespaces"]["ok"] is False
        assert [o.key for o in storage_of(config).list("app/backup/")] == []
    finally:
        pg15.psql("drop tablespace extra")


def test_a_light_drill_refuses_validations_it_would_not_run(tmp_path):
    """--light runs no validations besides 'started and queried': asking for some is a usage error, not
    silently ignored."""
    config = write_config(tmp_path / "d.yaml", {"app": {"repository": f"file://{tmp_path}/r"}})
    code, out, _ = pgdr("--json", "drill", "--cluster", "app", "--light", "--validations", "amcheck", config=config)
    assert code == 2 and out["error"] == "usage" and "--light" in out["message"], out


def test_a_wal_name_with_a_trailing_newline_is_not_a_wal_name(tmp_path):
    """Python's ``$`` also matches before a final newline: "<24 hex digits>\\n" passed for a segment name, and
    wal-fetch looked it up (a key holding a newline) instead of refusing it."""
    config = write_config(tmp_path / "d.yaml", {"app": {"repository": f"file://{tmp_path}/r"}})
    bad = "000000010000000000000001\n"
    code, out, _ = pgdr("--json", "wal-fetch", "--cluster", "app", "--prefetch", "0", bad, str(tmp_path / "x"),
                        config=config)
    assert code == 200 and out["error"] == "usage" and "not a WAL segment" in out["message"], (code, out)
    assert not (tmp_path / "x").exists()
