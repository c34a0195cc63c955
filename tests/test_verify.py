"""`pgdr verify` names every kind of damage: a flipped byte, a truncated or deleted
object, a deleted or swapped WAL segment."""

from __future__ import annotations

import itertools

import pytest

from helpers import pgdr, write_config
from test_backup_restore import storage_of
from test_wal import completed_segments

_n = itertools.count()


@pytest.fixture
def verified_repo(pg15, workdir):
    """A repository with one backup and the WAL after it, verified clean."""
    repo = f"file://{workdir}/verify-{next(_n)}"
    config = write_config(workdir / f"verify-{next(_n)}.yaml", {"app": {"dsn": pg15.dsn, "repository": repo}})
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err
    for seg in completed_segments(pg15, 3):
        assert pgdr("wal-push", "--cluster", "app", seg, config=config)[0] == 0
    code, report, err = pgdr("--json", "verify", "--cluster", "app", "--backup", "all", config=config)
    assert code == 0 and report["ok"], report
    assert report["backups"][0]["pg_verifybackup"].startswith("ok (files, sizes, checksums")
    assert report["wal"]["segments_checked"] == 3 and report["bytes_read"] > 0
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)
    assert listing["backups"][0]["verification"]["ok"] is True
    return config, backup, storage_of(config)


def failures_of(config):
    code, report, _ = pgdr("--json", "verify", "--cluster", "app", "--backup", "all", "--no-pg-verify",
                           config=config)
    assert code == 1 and report["ok"] is False
    return [(f["object"], f["check"]) for b in report["backups"] for f in b["failures"]] + \
        [(f["object"], f["check"]) for f in report["wal"]["failures"]]


def test_flipped_byte(verified_repo):
    config, backup, storage = verified_repo
    key = f"app/backup/{backup['label']}/base.tar.00000.zst"
    data = bytearray(storage.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    storage.put_bytes(key, bytes(data))
    assert failures_of(config)[0][0] == key
    code, info, _ = pgdr("--json", "info", "--cluster", "app", "--backup", backup["label"], config=config)
    assert info["verification"]["ok"] is False and info["verification"]["failures"][0]["object"] == key


def test_truncated_object(verified_repo):
    config, backup, storage = verified_repo
    key = f"app/backup/{backup['label']}/base.tar.00000.zst"
    storage.put_bytes(key, storage.get_bytes(key)[:-1000])
    assert (key, "size") in failures_of(config)


def test_deleted_object(verified_repo):
    config, backup, storage = verified_repo
    key = f"app/backup/{backup['label']}/base.tar.00000.zst"
    storage.delete(key)
    assert failures_of(config) == [(key, "exists")]


def test_deleted_wal_segment(verified_repo):
    config, backup, storage = verified_repo
    keys = sorted(o.key for o in storage.list("app/wal/00000001/"))
    storage.delete(keys[1])
    name = keys[1].rsplit("/", 1)[-1][:24]
    assert (name, "continuity") in failures_of(config)


def test_swapped_wal_segments(verified_repo):
    config, backup, storage = verified_repo
    a, b = sorted(o.key for o in storage.list("app/wal/00000001/"))[:2]
    da, db = storage.get_bytes(a), storage.get_bytes(b)
    storage.put_bytes(a, db)
    storage.put_bytes(b, da)
    found = failures_of(config)
    assert {(a.rsplit("/", 1)[-1][:24], "segment"), (b.rsplit("/", 1)[-1][:24], "segment")} <= set(found)


def test_new_reads_only_what_arrived_since(verified_repo, pg15):
    config, backup, storage = verified_repo
    code, report, _ = pgdr("--json", "verify", "--cluster", "app", "--backup", "new", config=config)
    assert code == 0 and report["backups"] == [] and report["bytes_read"] == 0  # nothing new: nothing read
    assert report["wal"]["segments_checked"] == 0
    code, second, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err
    code, report, _ = pgdr("--json", "verify", "--cluster", "app", "--backup", "new", "--no-pg-verify", "--no-wal",
                           config=config)
    assert code == 0 and [b["label"] for b in report["backups"]] == [second["label"]]
    stored = sum(o.size for o in storage.list(f"app/backup/{second['label']}/") if ".tar." in o.key)
    assert report["bytes_read"] == stored
