"""The WAL archive through the real CLI: push, fetch, check, with real segments."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from helpers import pgdr, repo_snapshot, write_config
from test_backup_restore import storage_of


def completed_segments(pg, count=3):
    """Force ``count`` segment switches with data in each; return copies of the completed segment files.

    Copies, taken while a replication slot holds the server's WAL: the session's servers do not archive, so
    any checkpoint (a timed one, mid-suite) may recycle a completed segment, renamed and later overwritten
    under the name the test holds."""
    import tempfile

    slot = f"pgdr_test_keep_{os.getpid()}"
    pg.psql(f"select pg_create_physical_replication_slot('{slot}', true)")
    try:
        for i in range(count):
            pg.psql(f"insert into customers values ({900000 + i}, 'wal test {i}')", dbname="app")
            pg.psql("select pg_switch_wal()")
        pg.psql("delete from customers where id >= 900000", dbname="app")
        pg.psql("select pg_switch_wal()")
        wal = pg.datadir / "pg_wal"
        current = pg.psql("select pg_walfile_name(pg_current_wal_lsn())")
        names = sorted(p.name for p in wal.iterdir() if len(p.name) == 24 and p.name < current)[-count:]
        copies = Path(tempfile.mkdtemp(prefix="segments-", dir=pg.datadir.parent))
        for name in names:
            shutil.copyfile(wal / name, copies / name)
    finally:
        pg.psql(f"select pg_drop_replication_slot('{slot}')")
    return [copies / name for name in names]


def archived_segments(pg, tmp_path, count):
    """(config, segments, pg_wal): ``count`` completed segments of ``pg`` archived with pgdr wal-push into a file
    repository in ``tmp_path``, and an empty ``tmp_path/pg_wal`` to fetch them into."""
    config = write_config(tmp_path / "pgdr.yaml", {"app": {"dsn": pg.dsn, "repository": f"file://{tmp_path}/r"}})
    segs = completed_segments(pg, count)
    for seg in segs:
        assert pgdr("wal-push", "--cluster", "app", seg, config=config)[0] == 0
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    return config, segs, pg_wal


@pytest.fixture
def wal_config(pg15, repo_url, tmp_path):
    return write_config(tmp_path / "pgdr.yaml", {"app": {"dsn": pg15.dsn, "repository": repo_url}})


def test_push_fetch_and_the_never_overwrite_rule(pg15, pg18, wal_config, tmp_path):
    segs = completed_segments(pg15)
    for seg in segs:
        code, out, err = pgdr("--json", "wal-push", "--cluster", "app", seg, config=wal_config)
        assert code == 0 and out["status"] == "archived" and out["name"] == seg.name, err
    storage = storage_of(wal_config)
    snapshot = repo_snapshot(storage)

    # The same segment again with the same content: success, nothing written.
    code, out, _ = pgdr("--json", "wal-push", "--cluster", "app", segs[0], config=wal_config)
    assert code == 0 and out["status"] == "already_archived"
    # The same name with different content: refused, loudly, nothing written.
    impostor = tmp_path / segs[0].name
    data = bytearray(segs[0].read_bytes())
    data[100_000] ^= 0xFF
    impostor.write_bytes(bytes(data))
    code, out, err = pgdr("--json", "wal-push", "--cluster", "app", impostor, config=wal_config)
    assert code == 1 and out["error"] == "integrity" and "DIFFERENT content" in out["message"]
    # WAL of another cluster: refused by system identifier.
    other = completed_segments(pg18, 1)[0]
    code, out, _ = pgdr("--json", "wal-push", "--cluster", "app", other, config=wal_config)
    assert code == 1 and "system identifier" in out["message"]
    assert repo_snapshot(storage) == snapshot

    dest = tmp_path / "RECOVERYXLOG"
    code, out, _ = pgdr("--json", "wal-fetch", "--cluster", "app", segs[1].name, dest, config=wal_config)
    assert code == 0 and out["source"] == "segment" and dest.read_bytes() == segs[1].read_bytes()
    code, out, _ = pgdr("--json", "wal-fetch", "--cluster", "app", "0000000100000099000000FF", tmp_path / "x",
                        config=wal_config)
    assert code == 1 and out["error"] == "wal_not_found" and not (tmp_path / "x").exists()
    code, out, _ = pgdr("--json", "wal-fetch", "--cluster", "app", "not-a-wal-name", tmp_path / "x", config=wal_config)
    assert code == 200  # wal-fetch: every failure but "not archived" stops recovery (> 125)


def test_fetch_detects_a_corrupted_or_misnamed_segment(pg15, tmp_path):
    config = write_config(tmp_path / "pgdr.yaml", {"app": {"dsn": pg15.dsn, "repository": f"file://{tmp_path}/r",
                                                           "compression": "none"}})
    a, b = completed_segments(pg15, 2)
    for seg in (a, b):
        assert pgdr("wal-push", "--cluster", "app", seg, config=config)[0] == 0
    storage = storage_of(config)
    key_a = next(o.key for o in storage.list("app/wal/") if a.name in o.key)
    key_b = next(o.key for o in storage.list("app/wal/") if b.name in o.key)
    storage.put_bytes(key_a, storage.get_bytes(key_b))  # swapped content
    code, out, _ = pgdr("--json", "wal-fetch", "--cluster", "app", a.name, tmp_path / "x", config=config)
    assert code == 200 and out["error"] == "integrity" and a.name in out["message"]
    assert not (tmp_path / "x").exists()


def test_wal_check_reports_ranges_and_gaps(pg15, tmp_path):
    config = write_config(tmp_path / "pgdr.yaml", {"app": {"dsn": pg15.dsn, "repository": f"file://{tmp_path}/r"}})
    segs = completed_segments(pg15, 4)
    for seg in segs[:2] + segs[3:]:  # leave a hole
        assert pgdr("wal-push", "--cluster", "app", seg, config=config)[0] == 0
    code, report, _ = pgdr("--json", "wal-check", "--cluster", "app", config=config)
    assert code == 1 and report["ok"] is False
    assert [(r["first"], r["last"], r["segments"]) for r in report["ranges"]] == [
        (segs[0].name, segs[1].name, 2), (segs[3].name, segs[3].name, 1)]
    (gap,) = report["gaps"]
    assert gap["missing_from"] == gap["missing_to"] == segs[2].name
    assert pgdr("wal-push", "--cluster", "app", segs[2], config=config)[0] == 0
    code, report, _ = pgdr("--json", "wal-check", "--cluster", "app", config=config)
    assert code == 0 and report["ok"] is True and report["gaps"] == []
    assert report["newest_lsn"] and len(report["ranges"]) == 1
    shutil.rmtree(tmp_path / "r")


def test_fetch_prefetches_the_next_segments_in_parallel(pg15, tmp_path):
    config, segs, pg_wal = archived_segments(pg15, tmp_path, 4)
    code, out, _ = pgdr("--json", "wal-fetch", "--cluster", "app", segs[0].name, pg_wal / "RECOVERYXLOG",
                        "--prefetch", "3", config=config)
    assert code == 0 and out["source"] == "segment"
    spool = pg_wal / ".pgdr-prefetch"
    import time

    def ready():
        return sorted(p.name[:24] for p in spool.glob("0*") if len(p.name) == 24 + 1 + 64)

    for _ in range(200):
        if len(ready()) == 3:
            break
        time.sleep(0.1)
    assert ready() == [s.name for s in segs[1:]]
    # The next fetch is served from the spool, verified, and leaves it.
    code, out, _ = pgdr("--json", "wal-fetch", "--cluster", "app", segs[1].name, pg_wal / "RECOVERYXLOG",
                        "--prefetch", "0", config=config)
    assert code == 0 and out["key"].startswith(".pgdr-prefetch/")
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == segs[1].read_bytes()
    # A prefetched copy that went bad on disk is discarded, and the archive is asked instead.
    bad = next(spool.glob(segs[2].name + ".*"))
    bad.write_bytes(b"garbage")
    code, out, _ = pgdr("--json", "wal-fetch", "--cluster", "app", segs[2].name, pg_wal / "RECOVERYXLOG",
                        "--prefetch", "0", config=config)
    assert code == 0 and not out["key"].startswith(".pgdr-prefetch/")
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == segs[2].read_bytes()


def test_two_contents_archived_under_one_name_are_refused_never_chosen_between(pg15, tmp_path):
    """Two servers archiving one segment name into one repository at once can each find nothing there and
    store their own: two copies, two contents. A fetch must not pick one (a restore would follow whichever
    sorted first): exit 200, recovery stops, both copies named, nothing written. Verify fails on it. The same
    content stored twice (a retry that lost its record) is one copy, and fetches."""
    repos = {k: tmp_path / k for k in ("r", "r2", "r3")}
    configs = {k: write_config(tmp_path / f"{k}.yaml", {"app": {"dsn": pg15.dsn, "repository": f"file://{r}"}})
               for k, r in repos.items()}
    (seg,) = completed_segments(pg15, 1)

    def copies(repo):
        return sorted(p for p in repo.rglob(seg.name + ".*") if p.is_file())

    assert pgdr("wal-push", "--cluster", "app", seg, config=configs["r"])[0] == 0
    (first,) = copies(repos["r"])
    impostor = tmp_path / "elsewhere" / seg.name
    impostor.parent.mkdir()
    data = bytearray(seg.read_bytes())
    data[100_000] ^= 0xFF
    impostor.write_bytes(bytes(data))
    assert pgdr("wal-push", "--cluster", "app", impostor, config=configs["r2"])[0] == 0
    (other,) = copies(repos["r2"])
    shutil.copy(other, first.parent / other.name)  # what the lost race leaves beside the first copy

    dest = tmp_path / "RECOVERYXLOG"
    for extra in ([], ["--json"]):
        code, out, err = pgdr(*extra, "wal-fetch", "--cluster", "app", seg.name, dest, config=configs["r"])
        assert code == 200, (out, err)
        message = out["message"] if extra else err
        assert "DIFFERENT content" in message and first.name in message and other.name in message
        assert not dest.exists()
    code, out, _ = pgdr("--json", "verify", "--cluster", "app", "--backup", "all", "--no-pg-verify", config=configs["r"])
    assert code == 1 and out["ok"] is False
    assert [(f["object"], "DIFFERENT content" in f["detail"]) for f in out["wal"]["failures"]] == [(seg.name, True)]

    # The same content twice (another archive time in its name): one copy, fetched.
    (first.parent / other.name).unlink()
    time.sleep(1.1)  # a later archive time
    assert pgdr("wal-push", "--cluster", "app", seg, config=configs["r3"])[0] == 0
    (again,) = copies(repos["r3"])
    assert again.name != first.name
    shutil.copy(again, first.parent / again.name)
    code, out, err = pgdr("--json", "wal-fetch", "--cluster", "app", seg.name, dest, config=configs["r"])
    assert code == 0, err
    assert dest.read_bytes() == seg.read_bytes()
