"""restore_command answered from the prefetch spool (pgdr.prefetch), before the CLI is imported: a verified
copy renamed into place, only a running prefetcher's of the same cluster and configuration file; "not in the
archive" only from a lookup begun after the call asked. Real PostgreSQL, real pgdr processes."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import archive_repo, pgdr, switch_and_wait_archived, table_hashes, write_config
from pgdr.sandbox import SandboxCluster, free_port
from test_wal import completed_segments
from test_wal_prefetch import _alive, _prefetcher, _ready, _wait, remove_spool

_n = itertools.count()
HEAVY = ("pgdr.cli", "pgdr.config", "pgdr.storage", "pgdr.wal", "boto3", "yaml")


def fetch(config, cluster, name, dest, *extra, importtime=False):
    """``pgdr wal-fetch`` as PostgreSQL runs it (no --json: the spool may answer): (exit code, stderr)."""
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "pgdr", "--config", str(config),
           "wal-fetch", "--cluster", cluster, name, str(dest), *map(str, extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def imported(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.fixture
def pushed(pg15, tmp_path):
    config = write_config(tmp_path / "pgdr.yaml", {
        "app": {"dsn": pg15.dsn, "repository": f"file://{tmp_path}/r"},
        "other": {"dsn": pg15.dsn, "repository": f"file://{tmp_path}/r-other"}})
    segs = completed_segments(pg15, 5)
    for seg in segs:
        assert pgdr("wal-push", "--cluster", "app", seg, config=config)[0] == 0
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    yield config, segs, pg_wal
    remove_spool(pg_wal / ".pgdr-prefetch")  # its prefetcher leaves with it


def test_a_prefetched_segment_is_renamed_into_place_without_importing_the_cli(pushed):
    config, segs, pg_wal = pushed
    spool, dest = pg_wal / ".pgdr-prefetch", pg_wal / "RECOVERYXLOG"
    code, err = fetch(config, "app", segs[0].name, dest, "--prefetch", 3)
    assert code == 0, err
    assert dest.read_bytes() == segs[0].read_bytes()
    assert _wait(lambda: _ready(spool) == [s.name for s in segs[1:4]])
    (copy,) = spool.glob(segs[1].name + ".*")
    before = copy.stat()
    code, err = fetch(config, "app", segs[1].name, dest, "--prefetch", 3, importtime=True)
    assert code == 0, err
    heavy = {m for m in imported(err) if m in HEAVY or m.split(".")[0] in HEAVY}
    assert not heavy, f"the call imported {sorted(heavy)}"
    assert dest.read_bytes() == segs[1].read_bytes()
    after = dest.stat()  # renamed into place, not read and written again: the same inode, as last modified
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # The prefetcher follows: the next segments are kept ready behind the one taken.
    assert _wait(lambda: _ready(spool) == [s.name for s in segs[2:5]])


def test_a_tampered_copy_is_not_used(pushed):
    config, segs, pg_wal = pushed
    spool, dest = pg_wal / ".pgdr-prefetch", pg_wal / "RECOVERYXLOG"
    assert fetch(config, "app", segs[0].name, dest, "--prefetch", 3)[0] == 0
    assert _wait(lambda: _ready(spool) == [s.name for s in segs[1:4]])
    (copy,) = spool.glob(segs[1].name + ".*")
    with open(copy, "r+b") as f:  # one byte changed, the size kept
        f.seek(8192)
        byte = f.read(1)
        f.seek(8192)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, err = fetch(config, "app", segs[1].name, dest)
    assert code == 0, err
    assert dest.read_bytes() == segs[1].read_bytes()  # from the archive, not the copy
    assert "does not match its SHA-256" in err, err
    (copy,) = spool.glob(segs[2].name + ".*")
    copy.write_bytes(copy.read_bytes()[:4096])  # cut short
    code, err = fetch(config, "app", segs[2].name, dest)
    assert code == 0 and dest.read_bytes() == segs[2].read_bytes(), err


def test_another_cluster_or_configurations_spool_is_not_used(pushed, tmp_path):
    """A spool filled for one cluster and configuration file never answers another: not while its prefetcher
    runs, nor what it left after it was killed. The other cluster's archive lacks the segments: 1."""
    config, segs, pg_wal = pushed
    spool, dest = pg_wal / ".pgdr-prefetch", pg_wal / "RECOVERYXLOG"
    config2 = write_config(tmp_path / "pgdr-2.yaml", {"app": {"repository": f"file://{tmp_path}/r-2"}})
    assert fetch(config, "app", segs[0].name, dest, "--prefetch", 3)[0] == 0
    assert _wait(lambda: _ready(spool) == [s.name for s in segs[1:4]])
    for cfg, cluster in ((config, "other"), (config2, "app")):
        code, err = fetch(cfg, cluster, segs[1].name, dest)
        assert code == 1, err
        assert dest.read_bytes() == segs[0].read_bytes()  # untouched
    assert _ready(spool) == [s.name for s in segs[1:4]]
    pid = _prefetcher(spool)
    os.kill(pid, signal.SIGKILL)
    assert _wait(lambda: not _alive(pid))
    assert _ready(spool) == [s.name for s in segs[1:4]]  # left behind
    code, err = fetch(config2, "app", segs[1].name, dest)
    assert code == 1, err
    assert dest.read_bytes() == segs[0].read_bytes()
    # The same cluster and configuration file again: its own prefetcher serves it.
    code, err = fetch(config, "app", segs[1].name, dest)
    assert code == 0 and dest.read_bytes() == segs[1].read_bytes(), err


def test_no_prefetcher_is_left_to_a_pid1_postmaster(pushed):
    """Under a postmaster that is PID 1 (a container's init) a detached prefetcher becomes its child, and
    one that exits badly looks like a crashed backend (every session restarted). There each call fetches its
    own file, and the server log says once why prefetch is off."""
    config, segs, pg_wal = pushed
    spool, dest = pg_wal / ".pgdr-prefetch", pg_wal / "RECOVERYXLOG"
    (pg_wal.parent / "postmaster.pid").write_text("1\n/var/lib/postgresql/data\n")
    errs = []
    for seg in segs[:3]:
        code, err = fetch(config, "app", seg.name, dest, "--prefetch", 3)
        assert code == 0, err
        assert dest.read_bytes() == seg.read_bytes()
        errs.append(err)
    time.sleep(1)  # a prefetcher, had one started, would have taken its lock and fetched by now
    assert _prefetcher(spool) is None and _ready(spool) == []
    assert not (spool / "prefetcher.lock").exists()
    assert ["PID 1" in e for e in errs] == [True, False, False], errs


def test_exit_codes_with_the_spool_answering(pg15, tmp_path):
    """Not archived when the prefetcher last looked, archived since: restored (0), never "not archived" from an
    older lookup. Missing: 1. Damaged in the archive: 200, the full command's error."""
    config = write_config(tmp_path / "pgdr.yaml", {"app": {"dsn": pg15.dsn, "repository": f"file://{tmp_path}/r"}})
    segs = completed_segments(pg15, 4)
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    spool, dest = pg_wal / ".pgdr-prefetch", pg_wal / "RECOVERYXLOG"
    assert pgdr("wal-push", "--cluster", "app", segs[0], config=config)[0] == 0
    code, err = fetch(config, "app", segs[0].name, dest)
    assert code == 0, err
    assert _wait(lambda: _prefetcher(spool))
    time.sleep(1.5)  # the prefetcher has looked for segs[1] (not archived) by now, or will look later
    assert pgdr("wal-push", "--cluster", "app", segs[1], config=config)[0] == 0
    code, err = fetch(config, "app", segs[1].name, dest)
    assert code == 0, err
    assert dest.read_bytes() == segs[1].read_bytes()
    code, err = fetch(config, "app", segs[2].name, dest)
    assert code == 1 and "not in the archive" in err, err
    code, err = fetch(config, "app", "0000000A.history", dest)
    assert code == 1, err
    # Damaged before the prefetcher can see it (it looks for segs[3] every second): archived through a second
    # repository, damaged there, and moved into place whole.
    aside = write_config(tmp_path / "aside.yaml", {"app": {"dsn": pg15.dsn, "repository": f"file://{tmp_path}/r2"}})
    assert pgdr("wal-push", "--cluster", "app", segs[3], config=aside)[0] == 0
    (obj,) = [p for p in (tmp_path / "r2").rglob(segs[3].name + "*") if p.is_file()]
    obj.write_bytes(b"damaged")
    into = tmp_path / "r" / obj.relative_to(tmp_path / "r2")
    into.parent.mkdir(parents=True, exist_ok=True)
    os.replace(obj, into)
    pid = _prefetcher(spool)
    code, err = fetch(config, "app", segs[3].name, dest)
    assert code == 200 and "pgdr ERROR" in err, err
    assert dest.read_bytes() == segs[1].read_bytes()
    assert _prefetcher(spool) == pid  # the same prefetcher answered all along
    remove_spool(spool)


# --- a whole recovery through the spool ------------------------------------------------------------------

RESTORED = re.compile(r'restored log file "([0-9A-F]{24})" from archive')
FROM_SPOOL = re.compile(r"pgdr: restored ([0-9A-F]{24}) from the prefetch spool")


def test_recovery_reaches_the_end_through_the_spool(workdir):
    """A restored PostgreSQL 15 replays eight segments; restore_command (pgdr wal-fetch, as written by pgdr
    restore, without -q so each answer is logged) restores every one from the prefetch spool, and the
    promoted server holds the source's data."""
    from conftest import _bins

    tag = f"fastfetch{next(_n)}"
    repo = archive_repo(workdir, tag)
    bins = _bins(15)
    pg = SandboxCluster(bins, workdir / tag / "data", free_port())
    config = write_config(workdir / f"{tag}.yaml", {"app": {"dsn": pg.dsn, "repository": repo}})
    config.chmod(0o644)
    archive_command = f"{sys.executable} -m pgdr --config {config} -q wal-push --cluster app %p"
    pg.init(extra_conf=f"archive_mode = on\narchive_command = '{archive_command}'\n").start()
    restored = None
    try:
        pg.psql("create database app")
        pg.psql("create table t (id int primary key, payload text)", dbname="app")
        code, _, err = pgdr("--json", "backup", "--cluster", "app", config=config)
        assert code == 0, err
        for i in range(8):
            pg.psql(f"insert into t select g, md5(g::text) from generate_series({i * 1000}, {i * 1000 + 999}) g",
                    dbname="app")
            pg.psql("select pg_switch_wal()")
        switch_and_wait_archived(pg)
        expected = table_hashes(pg, ("app",))

        dest = workdir / f"{tag}-restored"
        code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--target", "latest",
                              config=config)
        assert code == 0 and out["recovery"]["state"].startswith("configured"), err
        auto = dest / "postgresql.auto.conf"
        text = auto.read_text()
        assert " -q wal-fetch " in text
        auto.write_text(text.replace(" -q wal-fetch ", " wal-fetch ") + "archive_mode = off\n")
        restored = SandboxCluster(bins, dest, free_port())
        restored.start()
        deadline = time.monotonic() + 300
        while restored.psql("select pg_is_in_recovery()") != "f":
            assert time.monotonic() < deadline, (dest / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        log = (dest / "server.log").read_text()
        assert table_hashes(restored, ("app",)) == expected
        segments = set(RESTORED.findall(log))
        assert len(segments) >= 8, log[-3000:]
        assert segments <= set(FROM_SPOOL.findall(log)), log[-5000:]
        assert "pgdr ERROR" not in log, log[-3000:]  # the full command never had to answer
    finally:
        if restored is not None:
            restored.destroy()
        pg.destroy()
