"""WAL fetch with one long-lived prefetcher per recovery (not a process per segment): it keeps the next
segments ready while PostgreSQL asks for them, is started once, and goes away when the spool does. The
fetch's own exit codes are untouched: the prefetcher only ever fills the spool, errors are only logged."""

from __future__ import annotations

import os
import shutil
import time

from helpers import pgdr
from test_wal import archived_segments


def _ready(spool):
    return sorted(p.name[:24] for p in spool.glob("0*") if len(p.name) == 24 + 1 + 64)


def remove_spool(spool):
    """What a restore does when recovery ended; the prefetcher may be writing into it meanwhile."""
    assert _wait(lambda: shutil.rmtree(spool, ignore_errors=True) or not spool.exists())


def _prefetcher(spool):
    """The pid of the prefetcher serving ``spool`` (the first line of its lock file), None while none does."""
    try:
        first = (spool / "prefetcher.lock").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(first) if first.isdigit() and _alive(int(first)) else None


def _wait(pred, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_one_prefetcher_follows_recovery_and_leaves_with_the_spool(pg15, tmp_path):
    config, segs, pg_wal = archived_segments(pg15, tmp_path, 6)
    spool = pg_wal / ".pgdr-prefetch"

    def fetch(seg, prefetch=2):
        code, out, err = pgdr("--json", "wal-fetch", "--cluster", "app", seg.name, pg_wal / "RECOVERYXLOG",
                              "--prefetch", prefetch, config=config)
        assert code == 0, err
        assert (pg_wal / "RECOVERYXLOG").read_bytes() == seg.read_bytes()
        return out

    fetch(segs[0])
    assert _wait(lambda: _ready(spool) == [s.name for s in segs[1:3]])
    pid = _prefetcher(spool)
    for i in (1, 2, 3):
        out = fetch(segs[i])
        assert out["key"].startswith(".pgdr-prefetch/")  # served from the spool
        # The same prefetcher moves ahead with PostgreSQL and drops what it passed.
        assert _wait(lambda: _ready(spool) == [s.name for s in segs[i + 1:i + 3]])
        assert _prefetcher(spool) == pid
    os.kill(pid, 0)
    # Recovery ended: the spool is removed, and the prefetcher goes with it.
    remove_spool(spool)
    assert _wait(lambda: not _alive(pid))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_with_a_prefetcher_running_missing_is_still_1_and_damaged_200(pg15, tmp_path):
    config, segs, pg_wal = archived_segments(pg15, tmp_path, 2)
    spool = pg_wal / ".pgdr-prefetch"
    # The next segment is damaged in the archive before the prefetcher can take it.
    (obj,) = [p for p in (tmp_path / "r").rglob(segs[1].name + "*") if p.is_file()]
    obj.write_bytes(b"damaged")
    code, _, err = pgdr("wal-fetch", "--cluster", "app", segs[0].name, pg_wal / "RECOVERYXLOG", config=config)
    assert code == 0, err
    assert _wait(lambda: _prefetcher(spool))
    time.sleep(1)  # the prefetcher tried segs[1], failed, and put nothing in the spool
    assert _ready(spool) == []
    code, _, err = pgdr("wal-fetch", "--cluster", "app", segs[1].name, pg_wal / "RECOVERYXLOG", config=config)
    assert code == 200, err
    code, _, err = pgdr("wal-fetch", "--cluster", "app", "000000010000FFFF000000FE", pg_wal / "RECOVERYXLOG",
                        config=config)
    assert code == 1, err
    remove_spool(spool)


def test_a_copy_left_in_pg_wal_by_a_killed_call_is_removed_by_the_next_prefetcher(pg15, tmp_path):
    """A call claims its copy by renaming it into pg_wal (``.RECOVERYXLOG.pgdr-claim-PID``) before it checks it
    and renames it to RECOVERYXLOG. Killed in between, it left 16 MiB there for good: the next prefetcher
    removes the claims of calls no longer running, and only those: not a running call's, not a link, not a
    file linked elsewhere too, not the full command's own download (``.RECOVERYXLOG.pgdr-HEX``, which can be
    all digits), nothing else."""
    config, segs, pg_wal = archived_segments(pg15, tmp_path, 2)
    gone = [4194305 + i for i in range(6)]  # above any pid_max: no process has these numbers
    abandoned = pg_wal / f".RECOVERYXLOG.pgdr-claim-{gone[0]}"
    abandoned.write_bytes(segs[0].read_bytes())
    running = pg_wal / f".RECOVERYXLOG.pgdr-claim-{os.getpid()}"  # a call still at work
    running.write_bytes(b"in use")
    outside = tmp_path / "outside"
    outside.write_bytes(b"outside pg_wal")
    link = pg_wal / f".RECOVERYXLOG.pgdr-claim-{gone[1]}"
    link.symlink_to(outside)
    shared = tmp_path / "shared"
    shared.write_bytes(b"linked twice")
    os.link(shared, pg_wal / f".RECOVERYXLOG.pgdr-claim-{gone[2]}")
    others = [pg_wal / f"RECOVERYXLOG.pgdr-claim-{gone[3]}", pg_wal / f".{gone[4]}",
              pg_wal / f".RECOVERYXLOG.pgdr-{gone[5]}", pg_wal / segs[1].name]  # not claims
    for path in others:
        path.write_bytes(b"keep")
    code, _, err = pgdr("wal-fetch", "--cluster", "app", segs[0].name, pg_wal / "RECOVERYXLOG", config=config)
    assert code == 0, err
    spool = pg_wal / ".pgdr-prefetch"
    assert _wait(lambda: _prefetcher(spool))
    assert _wait(lambda: not abandoned.exists())
    assert running.read_bytes() == b"in use"
    assert link.is_symlink() and outside.read_bytes() == b"outside pg_wal"
    assert (pg_wal / f".RECOVERYXLOG.pgdr-claim-{gone[2]}").read_bytes() == shared.read_bytes() == b"linked twice"
    assert all(path.read_bytes() == b"keep" for path in others)
    assert (pg_wal / "RECOVERYXLOG").read_bytes() == segs[0].read_bytes()
    log = (spool / "prefetcher.log").read_text()
    assert f"removed {abandoned.name}" in log and log.count("removed .RECOVERYXLOG") == 1
    remove_spool(spool)


def test_claims_are_looked_for_only_in_a_pg_wal_of_this_users(tmp_path):
    from pgdr.prefetch import remove_abandoned_claims

    name = ".RECOVERYXLOG.pgdr-claim-4194305"  # above any pid_max: its call is gone
    elsewhere = tmp_path / "not_pg_wal"
    elsewhere.mkdir()
    (elsewhere / name).write_bytes(b"x")
    assert remove_abandoned_claims(elsewhere) == [] and (elsewhere / name).exists()
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    (pg_wal / name).write_bytes(b"x")
    os.chown(pg_wal, 54321, 54321)  # another user's server
    assert remove_abandoned_claims(pg_wal) == [] and (pg_wal / name).exists()
    os.chown(pg_wal, os.geteuid(), os.getegid())
    assert remove_abandoned_claims(pg_wal) == [name] and not (pg_wal / name).exists()
