"""Push mode through the push queue (pgdr.walpush): archive_command = pgdr wal-push, one pusher per server
archiving the backlog several at a time, each call acknowledged only once its own segment is durable.

Real PostgreSQL 15 servers run the real archive_command; S3 is moto over HTTP behind a proxy that can hold
one upload in flight (bench/latency_proxy.py)."""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import helpers
import pytest
from helpers import PGDR_FAST, archive_repo, pgdr, write_config
from pgdr.fast import identity
from pgdr.sandbox import SandboxCluster, free_port
from pgdr.wal import WalArchive
from pgdr.walpush import LOCK, SPOOL_DIR, Ack, answer_push, file_stamp
from test_backup_restore import storage_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from latency_proxy import LatencyProxy  # noqa: E402

_n = itertools.count(1)


def wait_for(condition, what, timeout=90.0):
    helpers.wait_for(condition, what, timeout, poll=0.05)  # archiving is fast: look often


def paused_archiver(workdir, tag):
    """A PostgreSQL 15 server with archive_mode on and no archive_command yet: WAL waits as .ready."""
    from conftest import _bins

    pg = SandboxCluster(_bins(15), workdir / f"{tag}-{next(_n)}" / "data", free_port())
    return pg.init(extra_conf="archive_mode = on\narchive_command = ''\nwal_keep_size = 1GB\n").start()


def write_backlog(pg, segments: int) -> list[str]:
    """``segments`` completed segments, each holding a committed row, all waiting to be archived."""
    pg.psql("create table if not exists backlog (i int)")
    pg.psql("select pg_switch_wal()")
    first = pg.psql("select pg_walfile_name(pg_current_wal_lsn() + 1)")  # (a boundary LSN names the segment before)
    pg.psql("; ".join(f"insert into backlog values ({i}); select pg_switch_wal()" for i in range(segments)))
    pg.psql("select pg_switch_wal()")  # one statement string is one transaction: its commit is in the next
    last = pg.psql("select pg_walfile_name(pg_current_wal_lsn() - 1)")
    status = pg.datadir / "pg_wal" / "archive_status"
    wait_for(lambda: (status / f"{last}.ready").exists() or (status / f"{last}.done").exists(),
             f"{last} marked ready", timeout=30)
    names = [first[:16] + f"{n:08X}" for n in range(int(first[16:], 16), int(last[16:], 16) + 1)]
    assert len(names) >= segments and all((status / f"{n}.ready").exists() or (status / f"{n}.done").exists()
                                          for n in names), names
    for f in status.iterdir():  # older WAL (initdb's, the table's): not part of this backlog
        if f.name.endswith(".ready") and f.name[:-6] < first:
            f.rename(f.with_suffix(".done"))
    return names


def push_config(workdir, tag, repository) -> Path:
    """A push-mode configuration the server's user (archive_command) can read."""
    config = write_config(workdir / f"{tag}-{next(_n)}.yaml", {"app": {"repository": repository,
                                                                       "wal": {"mode": "push"}}})
    config.chmod(0o644)
    return config


def start_archiving(pg, config, *extra, front: bool = False) -> None:
    pgdr_cmd = [str(PGDR_FAST)] if front else [sys.executable, "-m", "pgdr"]
    command = " ".join([*pgdr_cmd, "--config", str(config), "-q", "wal-push", "--cluster", "app", *extra, "%p"])
    pg.psql(f"alter system set archive_command = '{command}'")
    pg.psql("select pg_reload_conf()")


def state(pg, name: str) -> str:
    status = pg.datadir / "pg_wal" / "archive_status"
    return "done" if (status / f"{name}.done").exists() else "ready" if (status / f"{name}.ready").exists() else "?"


def pusher_pid(pg) -> int | None:
    try:
        return int((pg.datadir / "pg_wal" / SPOOL_DIR / LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def assert_archived_once_and_intact(pg, config, names):
    """Each segment exactly once in the repository, its content (verified on read) the server's file."""
    archive = WalArchive(storage_of(config), "app")
    keys = archive.segment_keys()
    for name in names:
        assert len(keys.get(name, [])) == 1, (name, keys.get(name))
        data, source, _ = archive.read(name, allow_partial=False)
        assert source == "segment"
        assert hashlib.sha256(data).digest() == hashlib.sha256((pg.datadir / "pg_wal" / name).read_bytes()).digest()


def test_a_backlog_goes_up_in_parallel_and_each_call_is_acknowledged_only_once_durable_in_order(
        workdir, s3_server, s3_bucket):
    """One upload is held in flight at the S3 server's door. Later segments are stored meanwhile (the queue
    works ahead), yet PostgreSQL marks none of them archived: not the held one, which is not durable, and not
    the ones after it, which the archiver reaches only in order. Then the pusher is killed (SIGKILL) with that
    upload still held; the waiting archive_command starts another, which archives it again; the dead one's
    upload arrives late. Every segment ends in the repository exactly once, with the server's content."""
    pg = paused_archiver(workdir, "queue-s3")
    held = threading.Event()
    release = threading.Event()
    hold_name: list[str] = []

    def before_forward(method, path):
        if method == "PUT" and hold_name and hold_name[0] in path and not held.is_set():
            held.set()
            release.wait(120)  # this request only: the retry after the kill goes through

    proxy = LatencyProxy(s3_server, latency=0.01, before_forward=before_forward).start()
    try:
        names = write_backlog(pg, 14)
        hold_name.append(names[4])
        config = push_config(workdir, "queue-s3", {"url": f"s3://{s3_bucket}/r", "endpoint_url": proxy.url,
                                                   "region": "us-east-1"})
        start_archiving(pg, config, "--parallel", "4")
        wait_for(held.is_set, f"the upload of {names[4]} reached the S3 server")

        def stored_after_held():
            with proxy.lock:
                puts = [p for m, p, s in proxy.answered if m == "PUT" and s == 200]
            return [n for n in names[5:] if any(n in p for p in puts)]

        wait_for(lambda: len(stored_after_held()) >= 3, "later segments stored while one upload is held")
        wait_for(lambda: state(pg, names[3]) == "done", "the segments before the held one acknowledged")
        ahead = stored_after_held()
        assert state(pg, names[4]) == "ready", "acknowledged before its upload returned"
        for n in ahead:
            assert state(pg, n) == "ready", f"{n} acknowledged ahead of {names[4]}: out of order"
        assert (pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver") or "") < names[4]

        pid = pusher_pid(pg)
        assert pid, "no pusher holds the queue's lock"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (pusher_pid(pg) or pid) != pid, "the waiting archive_command started a new pusher")
        wait_for(lambda: state(pg, names[4]) == "done", f"{names[4]} archived after the pusher was killed")
        release.set()  # the killed pusher's upload reaches the store late
        wait_for(lambda: all(state(pg, n) == "done" for n in names), "the whole backlog archived")
        time.sleep(0.5)
        assert_archived_once_and_intact(pg, config, names)
    finally:
        release.set()
        proxy.stop()
        pg.destroy()


@pytest.mark.parametrize("front", [False, True], ids=["pgdr", "pgdr-fast"])
def test_pusher_killed_again_and_again_mid_backlog_loses_nothing_and_stores_nothing_twice(workdir, front):
    """The file repository: SIGKILL every pusher the moment it appears, five times, while 24 segments wait.
    PostgreSQL ends up with all of them archived, each stored once; the archive reaches the last; a
    pusher left alone goes away by itself once the server stops. The same through the compiled front
    (pgdr-fast), which answers the calls whose acknowledgement is there and hands the rest to pgdr."""
    pg = paused_archiver(workdir, "queue-kill")
    try:
        names = write_backlog(pg, 24)
        repo = archive_repo(workdir, f"queue-kill-{next(_n)}")
        config = push_config(workdir, "queue-kill", repo)
        start_archiving(pg, config, "--parallel", "3", front=front)
        killed: set[int] = set()
        while len(killed) < 5 and not all(state(pg, n) == "done" for n in names):
            pid = pusher_pid(pg)
            if pid and pid not in killed:
                time.sleep(0.05 * len(killed))  # let it get some uploads going
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed.add(pid)
            time.sleep(0.01)
        assert len(killed) >= 2, killed
        wait_for(lambda: all(state(pg, n) == "done" for n in names), "the whole backlog archived")
        assert_archived_once_and_intact(pg, config, names)
        code, report, err = pgdr("--json", "wal-check", "--cluster", "app", config=config)
        assert code == 0 and report["newest_lsn"], (report, err)
        pid = pusher_pid(pg)
        pg.stop()
        wait_for(lambda: not _alive(pid), "the pusher stopped after the server did", timeout=30)
    finally:
        pg.destroy()


def _alive(pid) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_failure_is_reported_by_the_call_and_retried_and_the_fast_answer_trusts_only_its_own_ack(workdir, tmp_path):
    """A repository the server's user cannot write: the pusher's failure comes back through archive_command
    (exit 1, the reason in the server log) and PostgreSQL retries; once writable, archiving resumes. The
    fast answer trusts an acknowledgement only from the same configuration and for the same file."""
    pg = paused_archiver(workdir, "queue-fail")
    try:
        names = write_backlog(pg, 3)
        repo = archive_repo(workdir, f"queue-fail-{next(_n)}")
        repo_dir = Path(repo.removeprefix("file://"))
        os.chown(repo_dir / "app", 0, 0)
        os.chmod(repo_dir / "app", 0o755)
        config = push_config(workdir, "queue-fail", repo)
        start_archiving(pg, config)
        wait_for(lambda: int(pg.psql("select failed_count from pg_stat_archiver")) > 0, "archive_command failed")
        log = (pg.datadir / "server.log").read_text()
        assert f"{names[0]} was not archived" in log and "ermission denied" in log, log[-3000:]
        assert state(pg, names[0]) == "ready"
        os.chown(repo_dir / "app", *_postgres_ids())
        wait_for(lambda: all(state(pg, n) == "done" for n in names), "archiving resumed after the repair",
                 timeout=120)
        assert_archived_once_and_intact(pg, config, names)
    finally:
        pg.destroy()

    # The fast answer, on its own: a pg_wal with a segment and a pusher that seems to run (a held lock).
    import fcntl

    wal = tmp_path / "pg_wal"
    (wal / "archive_status").mkdir(parents=True)
    (wal / SPOOL_DIR).mkdir()
    seg = wal / "000000010000000000000007"
    seg.write_bytes(b"x" * 1024)
    (wal / "archive_status" / f"{seg.name}.ready").touch()  # the server is waiting on it
    lock = os.open(wal / SPOOL_DIR / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        conf = str(tmp_path / "a.yaml")
        argv = ["--config", conf, "-q", "wal-push", "--cluster", "app", "--timeout", "0.3", str(seg)]
        ok = wal / SPOOL_DIR / f"{seg.name}.ok"
        Ack(identity("app", str(tmp_path / "b.yaml")), file_stamp(seg.stat()), "0" * 64, "k").write(str(ok))
        assert answer_push(argv) == 1 and ok.exists()  # another configuration's: waited, timed out
        Ack(identity("app", conf), "1 2 3 4", "0" * 64, "k").write(str(ok))
        assert answer_push(argv) == 1  # another file's (device, inode, size, mtime)
        Ack(identity("other", conf), file_stamp(seg.stat()), "0" * 64, "k").write(str(ok))
        assert answer_push(argv) == 1  # another cluster's
        assert answer_push(["--json"] + argv) is None  # --json wants the full result
        assert answer_push(argv[:-1] + ["--parallel", "0", str(seg)]) is None  # synchronous, asked for
        Ack(identity("app", conf), file_stamp(seg.stat()), "0" * 64, "k").write(str(ok))
        assert answer_push(argv) == 0 and not ok.exists()
        (wal / SPOOL_DIR / f"{seg.name}.error").write_text("the repository said no")
        assert answer_push(argv) == 1 and not (wal / SPOOL_DIR / f"{seg.name}.error").exists()
        outside = tmp_path / "000000010000000000000007"
        outside.write_bytes(b"x")
        assert answer_push(argv[:-1] + [str(outside)]) is None  # not in a pg_wal: archived in the calling process
        os.pwrite(lock, f"1234\n{identity('app', str(tmp_path / 'b.yaml'))}\n".encode(), 0)
        t0 = time.monotonic()
        slow = [a if a != "0.3" else "10" for a in argv]
        assert answer_push(slow) is None  # a pusher of another configuration that stays: in this process
        assert 3 <= time.monotonic() - t0 < 9  # (after giving it the time a pusher takes to see an edit)
        os.ftruncate(lock, 0)
        os.chown(wal, *_postgres_ids())
        assert answer_push(argv) is None  # root, on the server's pg_wal: the queue is the server user's
        os.chown(wal, 0, 0)
        (wal / "archive_status" / f"{seg.name}.ready").rename(wal / "archive_status" / f"{seg.name}.done")
        assert answer_push(argv) is None  # not waited on by the server (pushed by hand): the same
    finally:
        os.close(lock)


def _postgres_ids():
    from pgdr.pgbin import user_ids

    return user_ids("postgres")


def test_wal_push_usage_errors_exit_2(tmp_path):
    config = write_config(tmp_path / "u.yaml", {"app": {"repository": f"file://{tmp_path}/r"}})
    seg = tmp_path / "000000010000000000000001"
    seg.write_bytes(b"x")
    for bad in (["--parallel", "99"], ["--parallel", "-1"], ["--timeout", "0"]):
        code, out, _ = pgdr("--json", "wal-push", "--cluster", "app", *bad, seg, config=config)
        assert code == 2 and out["error"] == "usage", (bad, out)
    proc = subprocess.run([sys.executable, "-m", "pgdr", "--config", str(config), "wal-push", "--cluster", "app",
                           "--parallel", "x", str(seg)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--parallel" in proc.stderr


def test_an_edited_configuration_is_followed_by_the_next_segments(workdir):
    """The repository moves (the configuration file is edited) while WAL keeps coming: the running pusher
    stops within a second or so, and every segment after the edit is acknowledged only once it is in the new
    repository (before: the old pusher went on archiving into the old one for as long as WAL kept coming)."""
    pg = paused_archiver(workdir, "queue-edit")
    try:
        old_repo, new_repo = (archive_repo(workdir, f"queue-edit-{t}-{next(_n)}") for t in ("a", "b"))
        config = push_config(workdir, "queue-edit", old_repo)
        before = write_backlog(pg, 3)
        start_archiving(pg, config)
        wait_for(lambda: all(state(pg, n) == "done" for n in before), "the first segments archived")
        pid = pusher_pid(pg)
        write_config(config, {"app": {"repository": new_repo, "wal": {"mode": "push"}}})
        config.chmod(0o644)
        after = write_backlog(pg, 3)
        wait_for(lambda: all(state(pg, n) == "done" for n in after), "the segments after the edit archived")
        from pgdr.storage.file import FileStorage

        def names(url):
            return set(WalArchive(FileStorage(url.removeprefix("file://")), "app").segment_keys())
        # (The old pusher may have read ahead into the old repository before it noticed: harmless, its
        # acknowledgements name the old configuration and no call took them.)
        assert set(after) <= names(new_repo)
        assert set(before) <= names(old_repo) and not set(before) & names(new_repo)
        assert pusher_pid(pg) != pid
    finally:
        pg.destroy()


def test_a_stale_acknowledgement_for_an_earlier_file_of_that_name_is_replaced(workdir):
    """A standby restoring a segment it had streamed replaces the file (a new inode) and marks it ready again:
    the pusher's own acknowledgement for the earlier file must not stall it; it is pushed again (found
    archived) and acknowledged for the file as it is now."""
    pg = paused_archiver(workdir, "queue-stale")
    try:
        names = write_backlog(pg, 2)
        repo = archive_repo(workdir, f"queue-stale-{next(_n)}")
        config = push_config(workdir, "queue-stale", repo)
        wal = pg.datadir / "pg_wal"
        seg = wal / names[0]
        (wal / SPOOL_DIR).mkdir(mode=0o700)
        stale = Ack(identity("app", str(config)), "1 2 3 4", "0" * 64, "an earlier file's key")
        stale.write(str(wal / SPOOL_DIR / f"{seg.name}.ok"))
        subprocess.run(["chown", "-R", "postgres:postgres", str(wal / SPOOL_DIR)], check=True)
        start_archiving(pg, config, "--timeout", "5")
        wait_for(lambda: all(state(pg, n) == "done" for n in names), "archived despite the stale acknowledgement",
                 timeout=60)
        assert int(pg.psql("select failed_count from pg_stat_archiver")) == 0
        assert_archived_once_and_intact(pg, config, names)
    finally:
        pg.destroy()


def test_the_queue_stands_aside_for_a_pid1_postmaster_and_a_nearly_full_disk(tmp_path):
    """A pusher left to a postmaster that is PID 1 (a container's init) would, if killed, look like a crashed
    backend; a nearly full pg_wal disk needs archiving to go on without writing beside it. Both: the call
    archives in its own process (None: the full command)."""
    wal = tmp_path / "pg_wal"
    (wal / "archive_status").mkdir(parents=True)
    seg = wal / "000000010000000000000009"
    seg.write_bytes(b"x")
    (wal / "archive_status" / f"{seg.name}.ready").touch()
    argv = ["--config", str(tmp_path / "a.yaml"), "-q", "wal-push", "--cluster", "app", "--timeout", "0.2", str(seg)]
    (tmp_path / "postmaster.pid").write_text("1\n/var/lib/postgresql/data\n")
    assert answer_push(argv) is None
    assert not (wal / SPOOL_DIR).exists()
    (tmp_path / "postmaster.pid").write_text("4242\n")
    assert answer_push(argv) == 1  # (a pusher starts and cannot archive a 1-byte file in 0.2 s: timed out)

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(small)], check=True)
    try:
        wal = small / "pg_wal"
        (wal / "archive_status").mkdir(parents=True)
        seg = wal / "00000001000000000000000A"
        seg.write_bytes(b"x")
        (wal / "archive_status" / f"{seg.name}.ready").touch()
        assert answer_push(argv[:-1] + [str(seg)]) is None
        assert not (wal / SPOOL_DIR).exists()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_a_file_that_changes_while_read_is_not_stored(tmp_path):
    """The pusher reads ahead of PostgreSQL: a segment recycled under it must not be stored under its name."""
    import pytest

    from pgdr.storage.file import FileStorage
    from pgdr.walpush import push_file

    archive = WalArchive(FileStorage(str(tmp_path / "repo")), "app")
    hist = tmp_path / "00000002.history"
    hist.write_text("1\t0/3000000\tno recovery target specified\n")

    def changed():
        raise OSError("00000002.history changed while it was being archived; not stored")

    with pytest.raises(OSError, match="changed"):
        push_file(archive, str(hist), None, before_store=changed)
    assert archive.history_files() == []
    assert push_file(archive, str(hist), None).status == "archived"
