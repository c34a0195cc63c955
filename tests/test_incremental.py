"""Incremental backups on PostgreSQL 18 (summarize_wal = on): a full and a chain of incrementals taken while
the data changes, each restored (in place, no staging) to exactly what the source held; PITR to a point
between two incrementals; a missing chain member named by verify and refused by restore; retention never
expiring a backup a kept one depends on; older servers falling back to a full, saying why."""

from __future__ import annotations

import itertools
import shutil
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from helpers import archive_repo, incremental_file, pgdr, server_setting, switch_and_wait_archived, write_config
from pgdr.labels import LABEL, chain_full, label_time
from pgdr.sandbox import SandboxCluster, free_port
from test_backup_restore import socket_dir

_n = itertools.count()
DBS = ("app", "postgres")


def _change(pg, step: int) -> None:
    """About 1% of pages changed, plus a new table, a dropped table, a truncation, new rows."""
    pg.psql(f"update accounts set balance = balance + {step} where id % 97 = {step}", dbname="app")
    pg.psql(f"insert into accounts select g, {step}, repeat('n', 80) from generate_series({step * 100000}, "
            f"{step * 100000 + 500}) g", dbname="app")
    pg.psql(f"create table t{step} as select g as id, md5(g::text) as v from generate_series(1, {step * 300}) g",
            dbname="app")
    if step >= 2:
        pg.psql(f"drop table t{step - 1}", dbname="app")
    if step == 2:
        pg.psql("truncate shrinking", dbname="app")
        pg.psql("insert into shrinking values (1, 'after truncate')", dbname="app")
    pg.psql(f"insert into ledger (step) values ({step})", dbname="app")


@pytest.fixture(scope="module")
def chain(workdir):
    """A PostgreSQL 18 server of its own (summarize_wal = on, archiving with pgdr wal-push); a full backup and
    three incrementals, the data changing between them; each backup's table hashes; a mark between the
    first and second incremental."""
    from conftest import _bins

    tag = "incr18"
    repo = archive_repo(workdir, tag, None)
    pg = SandboxCluster(_bins(18), workdir / tag / "data", free_port())
    config = write_config(workdir / f"{tag}.yaml", {"app": {"dsn": pg.dsn, "repository": repo}})
    config.chmod(0o644)
    archive_command = f"{sys.executable} -m pgdr --config {config} -q wal-push --cluster app %p"
    pg.init(extra_conf=f"summarize_wal = on\narchive_mode = on\narchive_command = '{archive_command}'\n").start()
    pg.psql("create database app")
    pg.psql("create table accounts (id int primary key, balance int, filler text)", dbname="app")
    pg.psql("insert into accounts select g, 0, repeat('x', 80) from generate_series(1, 40000) g", dbname="app")
    pg.psql("create table shrinking (id int, v text)", dbname="app")
    pg.psql("insert into shrinking select g, repeat('s', 200) from generate_series(1, 5000) g", dbname="app")
    pg.psql("create table ledger (id serial primary key, step int, at timestamptz default clock_timestamp())",
            dbname="app")
    backups, hashes = [], []

    def backup(kind, when):
        code, out, err = pgdr("--json", "backup", "--cluster", "app", "--type", kind, "--label", when, config=config)
        assert code == 0, err
        backups.append(out)
        hashes.append(pg.table_hashes(DBS))

    backup("full", "20261125-020000F")
    marks = {}
    for step, slot in ((1, "20261126-020000F"), (2, "20261127-020000F"), (3, "20261128-020000F")):
        _change(pg, step)
        if step == 2:
            # A point between the first and the second incremental: step 2's changes made, nothing after.
            time.sleep(1.1)
            marks["between"] = pg.psql("select clock_timestamp()")
            marks["between_hashes"] = pg.table_hashes(DBS)
            time.sleep(1.1)
            pg.psql("insert into ledger (step) values (20)", dbname="app")
        backup("incr", slot)
    switch_and_wait_archived(pg)
    yield {"pg": pg, "config": config, "backups": backups, "hashes": hashes, "marks": marks, "repo": repo}
    pg.destroy()


def _restore(config, workdir, *args, expect=0):
    dest = workdir / f"incr-restore-{next(_n)}"
    port = free_port()
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--start", "--port", port,
                          "--socket-dir", socket_dir(workdir), *args, config=config)
    assert code == expect, err
    from conftest import _bins

    return out, (SandboxCluster(_bins(18), dest, port) if code == 0 else None), err, dest


def test_labels_manifests_and_sizes_encode_the_chain(chain):
    b = chain["backups"]
    assert [x["type"] for x in b] == ["full", "incr", "incr", "incr"]
    assert b[0]["label"] == "20261125-020000F"
    assert [x["label"] for x in b[1:]] == ["20261125-020000F_20261126-020000I", "20261125-020000F_20261127-020000I",
                                           "20261125-020000F_20261128-020000I"]
    assert all(LABEL.match(x["label"]) for x in b)
    assert [x["parent"] for x in b] == [None] + [x["label"] for x in b[:-1]]
    assert label_time(b[2]["label"]) == datetime(2026, 11, 27, 2, tzinfo=timezone.utc)
    code, info, err = pgdr("--json", "info", "--cluster", "app", "--backup", b[3]["label"], config=chain["config"])
    assert code == 0, err
    assert info["type"] == "incr" and info["parent"] == b[2]["label"] and info["full"] == b[0]["label"]
    assert chain_full(b[3]["label"]) == b[0]["label"]
    # An incremental after ~1% of the pages changed reads and stores a fraction of the full.
    assert b[1]["stored_size"] < b[0]["stored_size"] / 2, [(x["size"], x["stored_size"]) for x in b]


@pytest.mark.parametrize("member", [1, 3])
def test_restore_of_a_chain_member_equals_the_source_at_that_backup(chain, workdir, member):
    label = chain["backups"][member]["label"]
    out, restored, err, dest = _restore(chain["config"], workdir, "--backup", label)
    try:
        assert out["chain"] == [x["label"] for x in chain["backups"][:member + 1]]
        assert out["pg_verifybackup"].startswith("ok")
        assert restored.table_hashes(DBS) == chain["hashes"][member]
        # Nothing of the chain was staged: no INCREMENTAL. file is left, the dropped table's file is gone.
        assert not list(dest.rglob("INCREMENTAL.*"))
    finally:
        restored.destroy()


def test_pitr_to_a_point_between_two_incrementals(chain, workdir):
    mark = chain["marks"]["between"].replace(" ", "T")
    out, restored, err, dest = _restore(chain["config"], workdir, "--target-time", mark)
    try:
        assert out["recovery"]["state"] == "promoted"
        assert out["recovery"]["plan"]["backup"] == chain["backups"][1]["label"]
        assert out["chain"] == [chain["backups"][0]["label"], chain["backups"][1]["label"]]
        assert restored.table_hashes(DBS) == chain["marks"]["between_hashes"]
    finally:
        restored.destroy()


def test_verify_of_an_intact_chain_applies_it_and_runs_pg_verifybackup(chain):
    newest = chain["backups"][3]["label"]
    code, report, err = pgdr("--json", "verify", "--cluster", "app", "--backup", newest, "--no-wal",
                             config=chain["config"])
    assert code == 0, err
    (b,) = report["backups"]
    assert b["ok"] and b["label"] == newest and b["pg_verifybackup"].startswith("ok"), b


def test_a_missing_chain_member_is_named_by_verify_and_refused_by_restore(chain, workdir):
    src = chain["repo"].removeprefix("file://")
    copy = workdir / f"incr-broken-repo-{next(_n)}"
    shutil.copytree(src, copy)
    missing = chain["backups"][2]["label"]
    shutil.rmtree(copy / "app" / "backup" / missing)
    config = write_config(workdir / "incr-broken.yaml", {"app": {"dsn": chain["pg"].dsn,
                                                                 "repository": {"url": f"file://{copy}"}}})
    newest = chain["backups"][3]["label"]
    code, report, err = pgdr("--json", "verify", "--cluster", "app", "--backup", newest, "--no-wal", config=config)
    assert code != 0
    text = str(report) + err
    assert missing in text and "missing" in text
    out, restored, err, dest = _restore(config, workdir, "--backup", newest, expect=1)
    assert missing in err and "missing" in err
    assert not dest.exists() or not any(dest.iterdir())


def test_a_damaged_middle_member_stops_the_chain_restore_and_leaves_nothing(chain, workdir):
    """A stored byte changed in a middle member of the chain (its parent already applied in place) is found
    by its SHA-256 before any of that piece is applied: the restore fails naming it, and the target is left
    empty."""
    copy = workdir / f"incr-damaged-repo-{next(_n)}"
    shutil.copytree(chain["repo"].removeprefix("file://"), copy)
    damaged = chain["backups"][2]["label"]
    (part,) = (copy / "app" / "backup" / damaged).glob("base.tar.*")
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    config = write_config(workdir / "incr-damaged.yaml", {"app": {"dsn": chain["pg"].dsn,
                                                                  "repository": {"url": f"file://{copy}"}}})
    out, restored, err, dest = _restore(config, workdir, "--backup", chain["backups"][3]["label"], expect=1)
    assert damaged in err and "does not match its SHA-256" in err, err
    assert not dest.exists() or not any(dest.iterdir())


@pytest.mark.parametrize("piece", [1, 4096, 8191, 8193, 3 * 8192, 1 << 20])
def test_runs_of_blocks_land_at_their_offsets_however_the_stream_is_cut(tmp_path, piece):
    """Consecutive changed blocks are written as one run, straight from the stream's pieces; a block cut
    between two pieces, a run cut anywhere, a hole and a new length all rebuild the file pg_combinebackup
    would. A relation the applier knows it left at the incremental's length keeps its content."""
    import io
    import os
    import tarfile

    from pgdr.incremental import ChainApplier

    root = tmp_path / "pgdata"
    (root / "base" / "5").mkdir(parents=True)
    old = [bytes([i]) * 8192 for i in range(12)]
    (root / "base" / "5" / "16384").write_bytes(b"".join(old))
    unchanged = root / "base" / "5" / "2619"
    unchanged.write_bytes(b"u" * 2 * 8192)
    new = {n: os.urandom(8192) for n in (0, 1, 2, 3, 7, 9, 10, 13, 14)}
    members = [("base", tarfile.DIRTYPE, b""), ("base/5", tarfile.DIRTYPE, b""),
               ("base/5/INCREMENTAL.16384", tarfile.REGTYPE, incremental_file(new, 11)),
               ("base/5/INCREMENTAL.2619", tarfile.REGTYPE, incremental_file({}, 2))]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mode = kind, len(data), 0o600 if kind == tarfile.REGTYPE else 0o700
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    lengths = {"base/5/16384": 12 * 8192, "base/5/2619": 2 * 8192}
    applier = ChainApplier(root, lengths=lengths)
    try:
        for i in range(0, len(raw), piece):
            applier.feed(raw[i:i + piece])
        applier.close()
    finally:
        applier.release()
    # Truncated to 11 blocks, then blocks 0-3, 7, 9-10 and 13-14 written: 11 and 12 read as zeros.
    expected = [new.get(n, old[n] if n < 11 else bytes(8192)) for n in range(15)]
    assert (root / "base" / "5" / "16384").read_bytes() == b"".join(expected)
    assert lengths["base/5/16384"] == 15 * 8192 and applier.rebuilt == 2
    assert (root / "base" / "5" / "16384").stat().st_size == 15 * 8192
    assert unchanged.read_bytes() == b"u" * 2 * 8192 and lengths["base/5/2619"] == 2 * 8192


def test_the_combined_manifest_is_rewritten_line_by_line(tmp_path):
    """The newest member's backup_manifest, rewritten as pg_combinebackup would: an INCREMENTAL. entry becomes
    the rebuilt file with its new size and no checksum, backup_label loses its checksum, other entries and the
    WAL ranges stay, and the Manifest-Checksum covers the new text. A manifest pgdr does not understand (a
    garbled line, one cut short) is refused, naming the line, and the original is left as it was."""
    import hashlib
    import json

    from pgdr.errors import IntegrityError
    from pgdr.incremental import rewrite_backup_manifest

    # PostgreSQL's own layout (backup_manifest.c): "{ " and " }" around each entry, one a line.
    lines = ['{ "Path": "backup_label", "Size": 10, "Last-Modified": "2026-12-04 10:00:00 GMT", '
             '"Checksum-Algorithm": "CRC32C", "Checksum": "aaaaaaaa" }',
             '{ "Path": "base/5/INCREMENTAL.16384", "Size": 8204, "Last-Modified": "2026-12-04 10:00:01 GMT", '
             '"Checksum-Algorithm": "CRC32C", "Checksum": "bbbbbbbb" }',
             '{ "Encoded-Path": "62617365", "Size": 1, "Last-Modified": "2026-12-04 10:00:02 GMT" }',
             '{ "Path": "global/pg_control", "Size": 8192, "Last-Modified": "2026-12-04 10:00:03 GMT", '
             '"Checksum-Algorithm": "CRC32C", "Checksum": "cccccccc" }']
    entries = [json.loads(line) for line in lines]
    ranges = [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000120"}]
    body = ('{ "PostgreSQL-Backup-Manifest-Version": 2,\n"System-Identifier": 7715444862237826023,\n"Files": [\n'
            + ",\n".join(lines) + '\n],\n"WAL-Ranges": [\n'
            + '{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000120" }' + "\n],\n")
    original = body + '"Manifest-Checksum": "%s"}\n' % hashlib.sha256(body.encode()).hexdigest()
    path = tmp_path / "backup_manifest"
    (tmp_path / "backup_label").write_text("START WAL LOCATION: 0/2000028\n")
    path.write_text(original)
    (tmp_path / "base" / "5").mkdir(parents=True)
    (tmp_path / "base" / "5" / "16384").write_bytes(bytes(3 * 8192))  # as the chain's restore rebuilt it
    rebuilt = {"base/5/16384"}
    rewrite_backup_manifest(tmp_path, rebuilt)
    text = path.read_text()
    doc = json.loads(text)
    head, _, tail = text.rpartition('"Manifest-Checksum": ')
    assert json.loads(tail.rstrip().rstrip("}")) == hashlib.sha256(head.encode()).hexdigest()
    assert doc["System-Identifier"] == 7715444862237826023 and doc["WAL-Ranges"] == ranges
    assert doc["Files"] == [
        {"Path": "backup_label", "Size": 30, "Last-Modified": "2026-12-04 10:00:00 GMT"},
        {"Path": "base/5/16384", "Size": 3 * 8192, "Last-Modified": "2026-12-04 10:00:01 GMT"},
        entries[2], entries[3]]
    assert not (tmp_path / "backup_manifest.pgdr-tmp").exists()

    for broken, where in ((original.replace('"Size": 8204', '"Size": 82 04'), "line 5: unreadable"),
                          (original[:original.index('"WAL-Ranges"')], "ends early"),
                          (original.replace('"Files": [', '"Files": ['.lower()), "line 3: unexpected"),
                          (original.replace('"Size": 8192', '"Size": 8193'), "line 12: its Manifest-Checksum"),
                          (original.replace("global/pg_control", "global/pg_contr\udcff"), "line 7: not UTF-8")):
        path.write_bytes(broken.encode("utf-8", "surrogateescape"))
        with pytest.raises(IntegrityError, match=where):
            rewrite_backup_manifest(tmp_path, rebuilt)
        assert path.read_bytes() == broken.encode("utf-8", "surrogateescape")
        assert not (tmp_path / "backup_manifest.pgdr-tmp").exists()
    # The tar and the manifest disagree: an incremental file the tar held whole (names swapped with one it
    # held as incremental), or one more incremental file in the tar.
    for rebuilt_now, where in (({"global/pg_control"}, "which the incremental's tar did not hold as an "
                                                       "incremental file"),
                               ({"base/5/16384", "global/pg_control"}, "lists 1 incremental files, its tar held 2")):
        path.write_text(original)
        with pytest.raises(IntegrityError, match=where):
            rewrite_backup_manifest(tmp_path, rebuilt_now)
        assert path.read_text() == original


# ------------------------------------------------------------------------------------------------ retention

NOW = datetime(2026, 12, 30, 12, 0, tzinfo=timezone.utc)


def _item(label, days_ago, parent=None, **kw):
    from pgdr.retention import CatalogItem

    t = NOW - timedelta(days=days_ago)
    return CatalogItem(label, "ok", t, f"0/{100 - days_ago:X}000000", parent=parent, **kw)


def test_planner_keeps_every_backup_a_kept_incremental_depends_on():
    from pgdr.retention import RetentionPolicy, plan_retention

    f1 = "20261110-020000F"
    i = [f"{f1}_202611{d}-020000I" for d in (11, 12, 13)]
    f2 = "20261120-020000F"
    j = [f"{f2}_202611{d}-020000I" for d in (21, 22)]
    items = [_item(f1, 50), _item(i[0], 49, f1), _item(i[1], 48, i[0]),
             _item(i[2], 47, i[1], pinned_until=datetime.max.replace(tzinfo=timezone.utc)),
             _item(f2, 40, None), _item(j[0], 39, f2), _item(j[1], 38, j[0])]
    plan = plan_retention(items, RetentionPolicy(window_days=30, min_full=1), NOW)
    got = {d["label"]: (d["action"], d["reason"]) for d in plan.decisions}
    # The window's base is the newest incremental before it: its whole chain stays.
    assert got[j[1]][0] == "keep" and got[j[0]][0] == "keep" and got[f2][0] == "keep"
    assert "built on it" in got[j[0]][1]
    # A pinned incremental keeps its parents, back to the full, though none of them is otherwise kept.
    assert [got[x][0] for x in (f1, *i)] == ["keep"] * 4
    assert got[f1][1] == f"kept: kept incremental {i[0]} is built on it"
    assert plan.keep_wal_from_lsn == items[0].start_lsn
    # Without the pin the older chain expires whole.
    items[3] = _item(i[2], 47, i[1])
    plan = plan_retention(items, RetentionPolicy(window_days=30, min_full=1), NOW)
    assert plan.expired() == [f1, *i]


def test_expire_over_a_chain_keeps_what_a_kept_incremental_needs(chain, workdir):
    from pgdr.config import load_config
    from pgdr.retention import RetentionPolicy, run_expire
    from test_backup_restore import storage_of

    copy = workdir / f"incr-expire-repo-{next(_n)}"
    shutil.copytree(chain["repo"].removeprefix("file://"), copy)
    for result in (copy / "app" / "backup").glob("*/verify.json"):
        result.unlink()  # another test's verification would keep the newest incremental (and so its chain)
    config = write_config(workdir / "incr-expire.yaml", {"app": {"dsn": chain["pg"].dsn,
                                                                 "repository": {"url": f"file://{copy}"}}})
    b = [x["label"] for x in chain["backups"]]
    code, full2, err = pgdr("--json", "backup", "--cluster", "app", "--label", "20261129-020000F", config=config)
    assert code == 0, err
    code, _, err = pgdr("--json", "keep", "--cluster", "app", "--backup", b[1], config=config)
    assert code == 0, err
    later = datetime.now(timezone.utc) + timedelta(days=40)
    cluster = load_config(config).cluster("app")
    result = run_expire(cluster, storage_of(config), RetentionPolicy(1, 1), later, False, simulated_now=True)
    # The incrementals nobody needs go, the newest first; the pinned one keeps its parent, the full.
    assert result["deleted_backups"] == [b[3], b[2]]
    left = sorted(p.name for p in (copy / "app" / "backup").iterdir())
    assert left == sorted([b[0], b[1], "20261129-020000F"])
    code, report, err = pgdr("--json", "verify", "--cluster", "app", "--backup", b[1], "--no-wal", config=config)
    assert code == 0 and report["backups"][0]["ok"], err


def test_older_servers_fall_back_to_a_full_and_check_says_why(pg15, workdir):
    repo = workdir / f"incr-pg15-{next(_n)}"
    config = write_config(workdir / "incr-pg15.yaml", {"app": {"dsn": pg15.dsn, "repository": {"url": f"file://{repo}"},
                                                              "backup_type_policy": {"max_chain": 3}}})
    code, out, err = pgdr("--json", "backup", "--cluster", "app", "--type", "incr", config=config)
    assert code == 0, err
    assert out["type"] == "full" and out["label"].endswith("F")
    assert "PostgreSQL 15 has no incremental backups" in out["type_reason"] and "falling back" in err
    code, report, err = pgdr("--json", "check", "--cluster", "app", config=config)
    (item,) = [c for c in report["checks"] if c["name"] == "summarize_wal"]
    assert not item["ok"] and not item["critical"] and "falls back to a full" in item["detail"]


def test_check_reports_summarize_wal_on(chain):
    code, report, err = pgdr("--json", "check", "--cluster", "app", config=chain["config"])
    (item,) = [c for c in report["checks"] if c["name"] == "summarize_wal"]
    assert item["ok"] and "summarize_wal = on" in item["detail"]


def test_an_encrypted_chain_on_s3_backs_up_and_restores(chain, workdir, s3_server, s3_bucket):
    """The parent's sealed backup_manifest is opened for pg_basebackup --incremental; every member is
    sealed, and the chain restores through S3 (parallel ranged reads) to the source's tables."""
    from pgdr.crypto import generate_key

    pg = chain["pg"]
    env = {"PGDR_KEYRING": generate_key("k1")}
    config = write_config(workdir / "incr-enc.yaml", {"app": {"dsn": pg.dsn,
                                                              "repository": {
        "url": f"s3://{s3_bucket}/r", "endpoint_url": s3_server, "region": "us-east-1", "part_size_mb": 5,
        "encryption": {"key_env": "PGDR_KEYRING"}}}})
    code, full, err = pgdr("--json", "backup", "--cluster", "app", "--type", "incr", config=config, env=env)
    assert code == 0 and full["type"] == "full" and "no earlier backup" in full["type_reason"], err
    pg.psql("update accounts set balance = balance + 1000 where id <= 400", dbname="app")
    code, inc, err = pgdr("--json", "backup", "--cluster", "app", "--type", "incr", config=config, env=env)
    assert code == 0 and inc["type"] == "incr" and inc["parent"] == full["label"], err
    expected = pg.table_hashes(DBS)
    dest = workdir / f"incr-enc-restore-{next(_n)}"
    port = free_port()
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--start", "--port", port,
                          "--socket-dir", socket_dir(workdir), config=config, env=env)
    assert code == 0, err
    from conftest import _bins

    restored = SandboxCluster(_bins(18), dest, port)
    try:
        assert out["chain"] == [full["label"], inc["label"]]
        assert restored.table_hashes(DBS) == expected
    finally:
        restored.destroy()


def test_the_drill_restores_a_chain_through_the_same_path(chain, workdir):
    """A drill of the newest incremental: restored through run_restore (the chain applied in place), replayed
    to the drill's mark, validated."""
    scratch = workdir / f"incr-drill-{next(_n)}"
    scratch.mkdir()
    scratch.chmod(0o755)
    config = write_config(workdir / "incr-drill.yaml", {"app": {
        "dsn": chain["pg"].dsn, "repository": chain["repo"], "drill": {"scratch_dir": str(scratch)}}})
    config.chmod(0o644)
    pg = chain["pg"]
    with server_setting(pg, "archive_timeout", "2"):  # the drill's mark must reach the archive soon
        code, report, err = pgdr("--json", "drill", "--cluster", "app", "--run-id", "chain-1", config=config)
    assert code == 0, err
    assert report["ok"] is True and report["failures"] == [], report["failures"]
    assert report["backup"]["label"] == chain["backups"][-1]["label"]


def test_the_policy_decides_full_or_incremental_per_run():
    from pgdr.backup import choose_type
    from pgdr.config import BackupTypePolicy
    from pgdr.manifest import BackupManifest

    def m(label, parent=None):
        return BackupManifest(cluster="app", label=label, type="incr" if parent else "full", status="ok",
                              pg_version=180001, pg_version_text="18.1", system_identifier="1", timeline=1,
                              start_lsn="0/1000000", stop_lsn="0/2000000", start_time="", stop_time="",
                              compression="zstd", compression_level=3, parent=parent,
                              full=chain_full(label) if parent else None)

    policy = BackupTypePolicy(full_every_days=7, max_chain=2)
    ok = (True, "summarize_wal = on")
    f = "20261101-020000F"
    day = lambda d: datetime(2026, 11, d, 2, tzinfo=timezone.utc)  # noqa: E731
    assert choose_type("auto", [], policy, day(2), ok).type == "full"
    d = choose_type("auto", [m(f)], policy, day(2), ok)
    assert d.type == "incr" and d.parent.label == f
    chain2 = [m(f), m(f + "_20261102-020000I", f), m(f + "_20261103-020000I", f + "_20261102-020000I")]
    d = choose_type("auto", chain2, policy, day(4), ok)
    assert d.type == "full" and "max_chain 2" in d.reason
    d = choose_type("auto", chain2[:2], policy, day(8), ok)
    assert d.type == "full" and "7 day(s) old" in d.reason
    assert choose_type("auto", [m(f)], None, day(2), ok).type == "full"  # no policy: always full
    assert choose_type("incr", chain2, policy, day(4), ok).type == "incr"  # asked for: the policy's limits aside
    d = choose_type("incr", [m(f)], policy, day(2), (False, "summarize_wal = off: …"))
    assert d.type == "full" and d.reason.startswith("falling back to a full backup: summarize_wal = off")
    assert choose_type("incr", [m(f)], policy, day(2), ok, pg_major=17).type == "full"  # another major


def test_deleting_a_backup_an_incremental_is_built_on_is_refused(chain, workdir):
    from pgdr.config import load_config
    from pgdr.delete import DeleteRefused, delete_backup
    from pgdr.repository import Repository
    from test_backup_restore import storage_of

    copy = workdir / f"incr-delete-repo-{next(_n)}"
    shutil.copytree(chain["repo"].removeprefix("file://"), copy)
    config = write_config(workdir / "incr-delete.yaml", {"app": {"dsn": chain["pg"].dsn,
                                                                 "repository": {"url": f"file://{copy}"}}})
    repo = Repository(storage_of(config), load_config(config).cluster("app").name)
    b = [x["label"] for x in chain["backups"]]
    for label in b[:3]:
        with pytest.raises(DeleteRefused, match="parent of incremental"):
            delete_backup(repo, label)
    assert sorted(p.name for p in (copy / "app" / "backup").iterdir()) == sorted(b)
