"""Expiry never races a writer, and the cluster lock is atomic (issue 10, part 4).

Real PostgreSQL 15, real storage (a directory, and moto over HTTP as S3); where a race needs a
particular interleaving, a thin wrapper around the real storage forces it (as tests/test_retention.py
does for a failing listing) and a pg_basebackup wrapper script holds a backup open until told to finish.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import pgdr.lock as lockmod
from helpers import pgdr, table_hashes, write_config
from pgdr.config import RepositoryConfig, load_config
from pgdr.errors import LockedError, RepositoryError
from pgdr.lock import ClusterLock
from pgdr.storage import open_storage

KEY = "app/lock.json"


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path):
    if request.param == "file":
        return open_storage(RepositoryConfig(url=f"file://{tmp_path}/repo"))
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(RepositoryConfig(url=f"s3://{bucket}/r", endpoint_url=server, region="us-east-1"))


def _crashed_holder(storage) -> None:
    """A real pgdr process that takes the lock and dies without releasing it."""
    code = ("import sys, os; from pgdr.config import RepositoryConfig; from pgdr.storage import open_storage; "
            "from pgdr.lock import ClusterLock; "
            "s = open_storage(RepositoryConfig(**__import__('json').loads(sys.argv[1]))); "
            f"ClusterLock(s, {KEY!r}, 'backup that crashed').acquire(); os._exit(0)")
    repo = {"url": storage.url}
    if getattr(storage, "endpoint_url", None):
        repo.update(endpoint_url=storage.endpoint_url, region="us-east-1")
    subprocess.run([sys.executable, "-c", code, json.dumps(repo)], check=True, timeout=60)


class _SlowSecondDelete:
    """The real storage, except that when two racers delete the lock, the second waits long enough for the
    first to delete AND re-create it: a slow network's worst interleaving."""

    def __init__(self, storage, barrier):
        self._s, self._barrier = storage, barrier

    def __getattr__(self, name):
        return getattr(self._s, name)

    def delete(self, key):
        if key.startswith("app/lock"):
            try:
                if self._barrier.wait(timeout=1) == 0:
                    time.sleep(0.5)
            except threading.BrokenBarrierError:
                pass
        return self._s.delete(key)


def test_racing_takeover_of_a_stale_lock_has_exactly_one_winner(storage):
    _crashed_holder(storage)
    start, deletes = threading.Barrier(2), threading.Barrier(2)
    results: dict[int, object] = {}
    locks = [ClusterLock(_SlowSecondDelete(storage, deletes), KEY, f"racer {i}") for i in range(2)]

    def race(i):
        start.wait()
        try:
            locks[i].acquire()
            results[i] = "won"
        except LockedError as e:
            results[i] = e

    threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        winners = [i for i, r in results.items() if r == "won"]
        assert len(winners) == 1, results
        loser = 1 - winners[0]
        assert isinstance(results[loser], LockedError) and f"racer {winners[0]}" in str(results[loser])
        assert locks[winners[0]].held()
        # A third comer sees the winner, alive and fresh: refused.
        with pytest.raises(LockedError, match=f"racer {winners[0]}"):
            ClusterLock(storage, KEY, "late").acquire()
    finally:
        for lk in locks:
            if results.get(locks.index(lk)) == "won":
                lk.release()


class _TakeoverAfterNextLockCall:
    """The real storage; once armed, right after the holder's next call on the lock, another process takes
    the lock over (as one would that judged the holder stale: a paused VM, a clock jump)."""

    def __init__(self, storage, takeover):
        self._s, self._takeover, self.armed = storage, takeover, False

    def __getattr__(self, name):
        attr = getattr(self._s, name)
        if not callable(attr) or name not in ("get_bytes", "get_stream", "list", "put_if_absent", "put_bytes",
                                              "exists"):
            return attr

        def call(*args, **kwargs):
            out = attr(*args, **kwargs)
            if self.armed and str(args[0] if args else "").startswith("app/lock"):
                self.armed = False
                if name == "get_stream":
                    out = iter(list(out))
                self._takeover()
            return out

        return call


def _take_over(storage, purpose="backup B") -> ClusterLock:
    stale_after = lockmod.STALE_AFTER
    lockmod.STALE_AFTER = timedelta(0)  # the taker judges the holder stale
    try:
        return ClusterLock(storage, KEY, purpose).acquire()
    finally:
        lockmod.STALE_AFTER = stale_after


def test_a_heartbeat_that_finds_its_lock_taken_over_stops(storage, monkeypatch):
    monkeypatch.setattr(lockmod, "HEARTBEAT_SECONDS", 0.1)
    taken: list[ClusterLock] = []
    wrapped = _TakeoverAfterNextLockCall(storage, lambda: taken.append(_take_over(storage)))
    holder = ClusterLock(wrapped, KEY, "backup A").acquire()
    wrapped.armed = True
    try:
        deadline = time.monotonic() + 30
        while not taken and time.monotonic() < deadline:
            time.sleep(0.05)
        assert taken, "the holder's heartbeat never touched the lock"
        holder._thread.join(30)  # the heartbeat must stop by itself
        assert not holder._thread.is_alive()
        # The taker holds the lock; the old holder knows it lost it and does not write over the taker.
        assert taken[0].held()
        assert holder.lost.is_set() and not holder.held()
        with pytest.raises(LockedError, match="lost"):
            holder.renew()
        assert taken[0].held()
    finally:
        holder.release()
        for t in taken:
            t.release()
    assert not taken[0].held()
    ClusterLock(storage, KEY, "after").acquire().release()  # released for real: free again


class _StoreUnreachable:
    """The real storage, until the network to it goes away."""

    def __init__(self, storage):
        self._s, self.down = storage, False

    def __getattr__(self, name):
        attr = getattr(self._s, name)
        if self.down and name in ("put_if_absent", "put_bytes", "get_bytes", "list"):
            def fail(*args, **kwargs):
                raise RepositoryError("cannot reach the repository: Connection timed out")
            return fail
        return attr


def test_a_holder_that_cannot_renew_for_half_the_stale_time_gives_up_before_anyone_may_take_over(tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.setattr(lockmod, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(lockmod, "STALE_AFTER", timedelta(seconds=1))
    flaky = _StoreUnreachable(open_storage(RepositoryConfig(url=f"file://{tmp_path}/repo")))
    holder = ClusterLock(flaky, KEY, "backup A").acquire()
    flaky.down = True
    assert holder.lost.wait(30), "the holder kept going without a renewed lock"
    assert "could not renew" in holder.lost_reason
    with pytest.raises(LockedError):
        holder.renew()
    holder.release()


# --- a backup held open by a pg_basebackup wrapper ---------------------------------------------------------

def _slow_bin_dir(pg, where: Path) -> Path:
    """A pg_bin_dir whose pg_basebackup streams the whole backup, then holds its output open until the file
    ``go`` appears (``streamed`` marks the moment; ``pid`` is its process)."""
    d = where / "bin"
    d.mkdir(parents=True)
    for tool in Path(pg.bins.path).iterdir():
        if tool.name != "pg_basebackup":
            (d / tool.name).symlink_to(tool)
    real = Path(pg.bins.path) / "pg_basebackup"
    (d / "pg_basebackup").write_text(f"""#!/bin/bash
if [ "$1" = "--version" ]; then exec "{real}" --version; fi
echo $$ > "{where}/pid"
"{real}" "$@" || exit $?
touch "{where}/streamed"
while [ ! -e "{where}/go" ]; do sleep 0.1; done
""")
    (d / "pg_basebackup").chmod(0o755)
    return d


def _wait_for(path: Path, thread: threading.Thread, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert thread.is_alive(), "the backup ended before its pg_basebackup finished streaming"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _backup_in_thread(config, label, part_size):
    from pgdr.backup import run_backup
    from pgdr.postgres import ConnInfo

    cluster = load_config(config).cluster("app")
    storage = open_storage(cluster.repository)
    out: dict = {}

    def run():
        try:
            out["result"] = run_backup(cluster, ConnInfo(dsn=cluster.dsn), storage, label=label, part_size=part_size)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out, storage


def test_expire_while_a_backup_with_an_old_label_runs(pg15, workdir, tmp_path):
    from test_backup_restore import restore_and_start

    # In the suite's workdir, which the postgres user can traverse: the restore below starts the server from
    # this pg_bin_dir, and a private one would be copied to /var/tmp and left there.
    slow = workdir / f"slow-{tmp_path.name}"
    config = write_config(tmp_path / "pgdr.yaml", {"app": {
        "dsn": pg15.dsn, "repository": f"file://{tmp_path}/repo", "pg_bin_dir": str(_slow_bin_dir(pg15, slow)),
        "retention_window_days": 1, "retention_min_full": 1}})
    expected = table_hashes(pg15)
    label = "20200101-000000F"  # an old label: "unfinished for six years" by its name
    thread, out, storage = _backup_in_thread(config, label, part_size=4 * 1024 * 1024)
    try:
        _wait_for(slow / "streamed", thread)
        assert len(storage.list(f"app/backup/{label}/")) >= 2  # parts already stored, no manifest yet
        code, res, err = pgdr("--json", "expire", "--cluster", "app", config=config)
        assert code == 1 and res["error"] == "locked" and f"backup {label}" in res["message"], (res, err)
    finally:
        (slow / "go").touch()
        thread.join(300)
    assert "error" not in out, out.get("error")
    assert out["result"].status == "ok"
    restored, _ = restore_and_start(config, workdir, pg15, label)
    try:
        assert table_hashes(restored) == expected
    finally:
        restored.destroy()


def test_a_backup_whose_lock_is_taken_over_stops_and_commits_nothing(pg15, repo_url, tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod, "HEARTBEAT_SECONDS", 0.2)
    slow = tmp_path / "slow"
    config = write_config(tmp_path / "pgdr.yaml", {"app": {
        "dsn": pg15.dsn, "repository": repo_url, "pg_bin_dir": str(_slow_bin_dir(pg15, slow))}})
    label = "20261125-030000F"
    thread, out, storage = _backup_in_thread(config, label, part_size=4 * 1024 * 1024)
    taker = None
    try:
        _wait_for(slow / "streamed", thread)
        taker = _take_over(storage, "backup on another host")
        thread.join(60)  # stopped by the lost lock, not by "go"
        assert not thread.is_alive(), "the backup kept running after its lock was taken over"
        assert isinstance(out.get("error"), LockedError), out
        assert "nothing was committed" in str(out["error"])
        assert not storage.exists(f"app/backup/{label}/manifest.json")
        assert not (slow / "go").exists()
        pid = int((slow / "pid").read_text())
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        assert taker.held()  # and the new holder's lock was left alone
    finally:
        (slow / "go").touch()
        thread.join(300)
        if taker:
            taker.release()


# --- expiry ------------------------------------------------------------------------------------------------

def test_future_now_is_refused_unless_dry_run(tmp_path):
    config = write_config(tmp_path / "pgdr.yaml", {"app": {"repository": f"file://{tmp_path}/repo"}})
    later = (datetime.now(timezone.utc) + timedelta(days=3)).isoformat()
    code, out, _ = pgdr("--json", "expire", "--cluster", "app", "--now", later, config=config)
    assert code == 2 and out["error"] == "usage" and "in the future" in out["message"]
    code, out, _ = pgdr("--json", "expire", "--cluster", "app", "--now", later, "--dry-run", config=config)
    assert code == 0 and out["dry_run"] is True


def test_a_leftover_is_judged_by_its_last_write_not_its_label(tmp_path):
    config = write_config(tmp_path / "pgdr.yaml", {"app": {"repository": f"file://{tmp_path}/repo"}})
    storage = open_storage(load_config(config).cluster("app").repository)
    key = "app/backup/20200101-000000F/base.tar.00000.zst"
    storage.put_bytes(key, b"part of a backup that is still being written")
    code, out, _ = pgdr("--json", "expire", "--cluster", "app", config=config)
    assert code == 0 and out["deleted_backups"] == [] and storage.exists(key)
    reason = {d["label"]: d["reason"] for d in out["plan"]["decisions"]}["20200101-000000F"]
    assert reason.startswith("kept: unfinished")
    two_days_ago = time.time() - 2 * 86400
    os.utime(tmp_path / "repo" / key, (two_days_ago, two_days_ago))
    code, out, _ = pgdr("--json", "expire", "--cluster", "app", config=config)
    assert code == 0 and out["deleted_backups"] == ["20200101-000000F"] and not storage.exists(key)
    assert "last written" in {d["label"]: d["reason"] for d in out["plan"]["decisions"]}["20200101-000000F"]


class _FailAfterFirstDelete:
    """The real storage, failing every delete of backup objects after the first: an expiry interrupted
    (a crash, an outage) right after it began deleting a backup."""

    def __init__(self, storage):
        self._s, self.deleted = storage, []

    def __getattr__(self, name):
        return getattr(self._s, name)

    def delete(self, key):
        if "/backup/" in key:
            if self.deleted:
                raise RepositoryError(f"cannot delete {key}: InternalError: We encountered an internal error")
            self.deleted.append(key)
        return self._s.delete(key)


def test_an_interrupted_expiry_leaves_no_manifest_with_missing_parts(pg15, repo_url, tmp_path):
    from pgdr.repository import Repository
    from pgdr.retention import RetentionPolicy, run_expire

    config = write_config(tmp_path / "pgdr.yaml", {"app": {"dsn": pg15.dsn, "repository": repo_url,
                                                           "retention_window_days": 1, "retention_min_full": 1}})
    labels = ["20261101-000000F", "20261102-000000F"]
    for label in labels:
        assert pgdr("backup", "--cluster", "app", "--label", label, config=config)[0] == 0
    cluster = load_config(config).cluster("app")
    storage = open_storage(cluster.repository)
    later = datetime.now(timezone.utc) + timedelta(days=3)
    failing = _FailAfterFirstDelete(storage)
    with pytest.raises(RepositoryError, match="InternalError"):
        run_expire(cluster, failing, RetentionPolicy(1, 1), later, False, simulated_now=True)
    assert len(failing.deleted) == 1

    repo = Repository(storage, "app")
    for entry in repo.catalog():
        if entry.manifest is not None:  # every backup still offered has all its parts
            present = {o.key for o in storage.list(repo.backup_prefix(entry.label))}
            missing = [f.name for f in entry.manifest.files if repo.key(entry.label, f.name) not in present]
            if not {repo.key(entry.label, "backup_manifest"), repo.key(entry.label, "backup_manifest.enc")} & present:
                missing.append("backup_manifest")  # pg_verifybackup needs it to prove a restore
            assert not missing, f"{entry.label} is committed but {missing} are gone"
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)
    assert [(b["label"], b["status"]) for b in listing["backups"]] == [(labels[0], "unfinished"), (labels[1], "ok")]
    # The next expiry finishes the job: the half-deleted backup is a leftover whose last write is old.
    out = run_expire(cluster, storage, RetentionPolicy(1, 1), later + timedelta(days=2), False,
                     simulated_now=True)
    assert storage.list(repo.backup_prefix(labels[0])) == [] and labels[0] in out["deleted_backups"]
