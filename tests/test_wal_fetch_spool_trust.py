"""What restore_command may trust in the prefetch spool, and who may start a prefetcher (an adversarial
review's findings, each test failing before its fix). Synthetic 16 MiB segments in a file repository: no
server is needed to show who may write, take or answer what."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import ROOT, pgdr, write_config
from test_wal_prefetch import _alive, _prefetcher, _ready, _wait, remove_spool

SEG = 16 * 1024 * 1024
MAIN = ROOT / "plugins" / "pgdr" / "__main__.py"


def segment(tli: int, segno: int) -> bytes:
    """A segment whose long page header PostgreSQL and pgdr accept (system identifier, sizes)."""
    head = struct.pack("<HHIQI", 0xD110, 2, tli, segno * SEG, 0) + bytes(4) + struct.pack("<QII", 7300000000000000001,
                                                                                          SEG, 8192)
    return head + bytes([segno % 256]) * (SEG - len(head))


def seg_name(tli: int, segno: int) -> str:
    return f"{tli:08X}{segno // 256:08X}{segno % 256:08X}"


@pytest.fixture
def lab(tmp_path):
    """Segments 1-4 of timeline 1 archived for cluster app; 'other' has an empty archive."""
    config = write_config(tmp_path / "pgdr.yaml", {"app": {"repository": f"file://{tmp_path}/r-app"},
                                                  "other": {"repository": f"file://{tmp_path}/r-other"}})
    src = tmp_path / "src"
    src.mkdir()
    segs = []
    for n in (1, 2, 3, 4):
        p = src / seg_name(1, n)
        p.write_bytes(segment(1, n))
        code, _, err = pgdr("wal-push", "--cluster", "app", "--parallel", "0", p, config=config)
        assert code == 0, err
        segs.append(p)
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    yield config, segs, pg_wal
    if (pg_wal / ".pgdr-prefetch").exists():
        remove_spool(pg_wal / ".pgdr-prefetch")


def restore_command(config, name, dest, *extra, cwd="/"):
    """As PostgreSQL runs the command pgdr restore writes (python -S …/pgdr/__main__.py … %f %p)."""
    proc = subprocess.run([sys.executable, "-S", str(MAIN), "--config", str(config), "-q", "wal-fetch", "--cluster",
                           "app", *map(str, extra), name, str(dest)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    return proc.returncode, proc.stderr


def test_a_fetch_by_hand_starts_no_prefetcher_and_uses_no_spool(lab, tmp_path):
    """Only the server's own restore_command (into a pg_wal its user owns) gets a spool. Root fetching into
    another directory, or into a pg_wal of another user's, started a prefetcher there (root's, in the
    server's directory) and would have taken copies another user could plant."""
    config, segs, _ = lab
    elsewhere = tmp_path / "by-hand"
    elsewhere.mkdir()
    code, out, err = pgdr("--json", "wal-fetch", "--cluster", "app", segs[0].name, elsewhere / "x", config=config)
    assert code == 0 and (elsewhere / "x").read_bytes() == segs[0].read_bytes(), err
    theirs = tmp_path / "srv" / "pg_wal"
    theirs.mkdir(parents=True)
    shutil.chown(theirs, "postgres", "postgres")
    code, err = restore_command(config, segs[0].name, theirs / "RECOVERYXLOG")
    assert code == 0 and (theirs / "RECOVERYXLOG").read_bytes() == segs[0].read_bytes(), err
    time.sleep(0.5)  # a prefetcher, had one started, makes its spool at once
    assert not (elsewhere / ".pgdr-prefetch").exists()
    assert not (theirs / ".pgdr-prefetch").exists()


def test_a_copy_that_is_a_link_is_not_taken(lab, tmp_path):
    """A spool entry that is a symbolic link (to a file with the right content) was renamed into pg_wal as a
    link: PostgreSQL would later write through it."""
    config, segs, pg_wal = lab
    spool, dest = pg_wal / ".pgdr-prefetch", pg_wal / "RECOVERYXLOG"
    code, err = restore_command(config, segs[0].name, dest, "--prefetch", 2)
    assert code == 0, err
    assert _wait(lambda: _ready(spool) == [s.name for s in segs[1:3]])
    (copy,) = spool.glob(segs[1].name + ".*")
    outside = tmp_path / "outside"
    outside.write_bytes(copy.read_bytes())
    copy.unlink()
    copy.symlink_to(outside)
    code, err = restore_command(config, segs[1].name, dest)
    assert code == 0, err
    assert not dest.is_symlink() and dest.read_bytes() == segs[1].read_bytes()
    assert "not a plain file" in err, err


def test_the_prefetcher_is_pgdrs_own_not_the_working_directorys(lab, tmp_path):
    """The prefetcher was started as ``python -m pgdr`` in the caller's working directory: a ``pgdr``
    package there ran instead (as whoever fetched)."""
    config, segs, pg_wal = lab
    evil = tmp_path / "cwd"
    (evil / "pgdr").mkdir(parents=True)
    marker = tmp_path / "ran"
    (evil / "pgdr" / "__init__.py").write_text("")
    (evil / "pgdr" / "__main__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    os.chmod(evil, 0o755)
    code, err = restore_command(config, segs[0].name, pg_wal / "RECOVERYXLOG", "--prefetch", 2, cwd=evil)
    assert code == 0, err
    assert _wait(lambda: _ready(pg_wal / ".pgdr-prefetch") == [s.name for s in segs[1:3]])  # pgdr's own ran
    assert not marker.exists()


def test_a_spool_made_anew_is_not_served_by_the_old_prefetcher(lab):
    """A spool removed and made again at once (a restore's clean-up, then a call) kept its old prefetcher,
    holding the lock of the removed one, beside the new one: two writers of the same copies."""
    config, segs, pg_wal = lab
    spool = pg_wal / ".pgdr-prefetch"
    code, err = restore_command(config, segs[0].name, pg_wal / "RECOVERYXLOG", "--prefetch", 2)
    assert code == 0, err
    assert _wait(lambda: _prefetcher(spool) is not None)
    old = _prefetcher(spool)
    fresh = pg_wal / ".fresh"
    fresh.mkdir(mode=0o700)
    spool.rename(pg_wal / ".gone")
    fresh.rename(spool)  # no moment without a spool directory for the old prefetcher to notice
    shutil.rmtree(pg_wal / ".gone")
    assert _wait(lambda: not _alive(old), timeout=10), "the old prefetcher still runs"


def test_help_as_restore_command_stops_recovery():
    """``--help`` (or ``--version``) in restore_command exited 0 with nothing restored: PostgreSQL takes a
    missing file after exit 0 as "not archived" and ends recovery there."""
    for flag in ("--help", "--version"):
        proc = subprocess.run([sys.executable, "-m", "pgdr", "wal-fetch", "--cluster", "app", flag,
                               "000000010000000000000001", "/nonexistent/RECOVERYXLOG"], capture_output=True)
        assert proc.returncode == 200, flag
    assert subprocess.run([sys.executable, "-m", "pgdr", "wal-fetch", "--help"], capture_output=True).returncode == 0


def test_the_identity_follows_the_default_configuration_file(tmp_path, monkeypatch):
    """Without --config (pgdr restore writes none when none was given), an edit of the default file the
    command reads must make another identity: the spool's copies and answers were otherwise still trusted."""
    from pgdr import fast

    default = tmp_path / "pgdr.yaml"
    default.write_text("clusters: {}\n")
    monkeypatch.delenv("PGDR_CONFIG", raising=False)
    monkeypatch.setattr(fast, "SYSTEM_CONFIG", str(default))
    before = fast.identity("app", None)
    default.write_text("clusters: {app: {repository: 'file:///elsewhere'}}\n")
    os.utime(default, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert fast.identity("app", None) != before
    assert str(default) in before


def test_an_answer_is_read_only_from_a_prefetcher_of_the_same_configuration(tmp_path):
    """A "not archived" answer written by another cluster's or configuration's prefetcher (one that took the
    spool while the call waited) was read as the call's own: exit 1 with the file in its archive."""
    from pgdr.prefetch import Spool

    spool = Spool(tmp_path / ".pgdr-prefetch")
    spool.make()
    spool.answer("n1", "other|/etc/pgdr/other.yaml|1.2.3.4", "missing")
    assert spool.read_answer("n1", "app|/etc/pgdr/pgdr.yaml|1.2.3.4") is None
    assert spool.read_answer("n1", "other|/etc/pgdr/other.yaml|1.2.3.4") == ("missing", "")


def test_a_read_ahead_lookup_never_answers_not_archived(lab, monkeypatch):
    """The segment asked for is in the archive only as a streamed partial. A read-ahead lookup of it (which
    passes over partials) queued before the call asked but started after (a loaded machine: here its
    thread starts 50 ms late) answered the call "not archived": exit 1, recovery ended early."""
    import concurrent.futures

    from pgdr import prefetch
    from pgdr.config import load_config
    from pgdr.fast import identity
    from pgdr.storage import open_storage
    from pgdr.wal import WalArchive, run_prefetcher

    config, segs, pg_wal = lab
    c = load_config(config).cluster("app")
    archive = WalArchive(open_storage(c.repository), "app", c.compression, c.compression_level)
    partial = seg_name(1, 5)
    archive.push_partial_bytes(partial, segment(1, 5)[:8 << 20], 5 * SEG + (8 << 20) - 8192)
    spool = prefetch.Spool(pg_wal / ".pgdr-prefetch")
    spool.make()
    spool.want(seg_name(1, 4))  # PostgreSQL took segment 4 last: 5 is next, in the read-ahead
    queued = threading.Event()
    pool_class = concurrent.futures.ThreadPoolExecutor

    class LateStart(pool_class):
        def submit(self, fn, *a, **kw):
            if a[:2] == (partial, False) and not queued.is_set():
                queued.set()
                return super().submit(lambda *a, **kw: (time.sleep(0.05), fn(*a, **kw))[1], *a, **kw)
            return super().submit(fn, *a, **kw)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", LateStart)
    monkeypatch.setattr(prefetch, "_asked", False)
    worker = threading.Thread(target=run_prefetcher, args=(archive, Path(spool.path), 2,
                                                           identity("app", str(config)), 5.0), daemon=True)
    worker.start()
    try:
        assert queued.wait(10)
        code = prefetch.answer_fetch(["--config", str(config), "-q", "wal-fetch", "--cluster", "app", partial,
                                      str(pg_wal / "RECOVERYXLOG")])
        assert code != 1  # the full command then restores the partial (None here: it runs next)
    finally:
        shutil.rmtree(spool.path)
        worker.join(10)


def test_a_copy_written_to_after_the_prefetcher_checked_it_is_checked_in_full(lab):
    """The prefetcher records each copy it checked (inode, size, modification time): a call takes such a copy
    without reading it again, and any copy written to since (here: one byte, the size kept) is read in full
    and refused."""
    config, segs, pg_wal = lab
    spool, dest = pg_wal / ".pgdr-prefetch", pg_wal / "RECOVERYXLOG"
    code, err = restore_command(config, segs[0].name, dest, "--prefetch", 3)
    assert code == 0, err
    assert _wait(lambda: _ready(spool) == [s.name for s in segs[1:4]])
    assert _wait(lambda: len(list(spool.glob(".*.verified"))) == 3), sorted(os.listdir(spool))
    code, err = restore_command(config, segs[1].name, dest)
    assert code == 0 and dest.read_bytes() == segs[1].read_bytes(), err
    assert not list(spool.glob(f".{segs[1].name}.*.verified"))  # used up with its copy
    (copy,) = spool.glob(segs[2].name + ".*")
    with open(copy, "r+b") as f:
        f.seek(SEG // 2)
        f.write(b"\xff")
    code, err = restore_command(config, segs[2].name, dest)
    assert code == 0 and dest.read_bytes() == segs[2].read_bytes(), err
    assert "does not match its SHA-256" in err, err
