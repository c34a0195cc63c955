"""A restore's success is measured, not assumed (issue 9, part 1).

One archive per PostgreSQL version (push mode: archive_command = pgdr wal-push): a backup, then four steps of
rows, each in its own archived segment. Every fault is made on a copy of that repository: a corrupted, an
unreadable and an undecryptable segment in the middle of the range, and the S3 server going away during
recovery. `restore --start` must fail naming the segment, never report a short recovery as success, leave the
target removed and no server running. A time target the archived WAL cannot reach is refused before anything is
written. And `pgdr wal-fetch` tells PostgreSQL "not archived" (1) apart from every failure (200).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from helpers import archive_repo, pgdr, switch_and_wait_archived, write_config
from pgdr.sandbox import SandboxCluster, free_port
from test_backup_restore import socket_dir

FETCH_FAILED = 200
_n = itertools.count()


def rows(cluster) -> list[str]:
    out = cluster.psql("select coalesce(string_agg(step || ':' || id, ',' order by id), '') from steps", dbname="app")
    return out.split(",") if out else []


@pytest.fixture(scope="module", params=[15, 18], ids=["pg15", "pg18"])
def world(request, workdir):
    """A cluster archiving with `pgdr wal-push` into a file repository: one backup, then steps 1-4, each step's
    rows in its own archived segment. The cluster is destroyed once the archive is complete."""
    from conftest import _bins

    major = request.param
    tag = f"truth{major}"
    repo = archive_repo(workdir, tag)
    pg = SandboxCluster(_bins(major), workdir / tag / "data", free_port())
    config = write_config(workdir / f"{tag}.yaml", {"app": {"dsn": pg.dsn, "repository": {"url": repo}}})
    config.chmod(0o644)
    archive_command = f"{sys.executable} -m pgdr --config {config} -q wal-push --cluster app %p"
    pg.init(extra_conf=f"archive_mode = on\narchive_command = '{archive_command}'\n").start()
    try:
        pg.psql("create database app")
        pg.psql("create table steps (id int primary key, step int)", dbname="app")
        code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config)
        assert code == 0, err
        time.sleep(1.1)  # commit timestamps after the backup's end
        marks = {"backup": backup, "segment": {}, "expected": {}}
        for n in (1, 2, 3, 4):
            pg.psql(f"insert into steps select g, {n} from generate_series({n * 100}, {n * 100 + 9}) g", dbname="app")
            marks["segment"][n] = pg.psql("select pg_walfile_name(pg_current_wal_lsn())")
            marks["expected"][n] = rows(pg)
            if n == 3:
                time.sleep(0.2)
                marks["time3"] = pg.psql("select clock_timestamp()").replace(" ", "T")  # before step 4 commits
                time.sleep(0.2)
            switch_and_wait_archived(pg)
        assert len(set(marks["segment"].values())) == 4, marks["segment"]
    finally:
        pg.destroy()
    time.sleep(2.5)  # "now" is then past every archive time (rounded up to the second)
    yield {"major": major, "repo": Path(repo[len("file://"):]), "config": config, **marks}


def _bins_for(world):
    from conftest import _bins

    return _bins(world["major"])


def copy_repo(world, workdir, tamper=None, **repo_extra) -> Path:
    """A copy of the world's repository (tampered with), and a config naming it."""
    tag = f"truth-copy-{next(_n)}"
    dest = workdir / tag
    shutil.copytree(world["repo"], dest)
    subprocess.run(["chown", "-R", "postgres:postgres", str(dest)], check=True)  # restore_command runs as postgres
    if tamper:
        tamper(dest)
    config = write_config(workdir / f"{tag}.yaml", {"app": {"repository": {"url": f"file://{dest}", **repo_extra}}})
    config.chmod(0o644)
    return config


def segment_file(repo: Path, name: str) -> Path:
    found = [p for p in (repo / "app" / "wal" / name[:8]).iterdir() if p.name.startswith(name + ".")]
    assert len(found) == 1, found
    return found[0]


def corrupt(name):
    """Change one byte of the segment's WAL and store it again under the same name (so its SHA-256 no longer
    matches): what bit rot or a bad copy looks like."""
    def tamper(repo: Path):
        from pgdr.compression import compress_stream, decompress_stream

        path = segment_file(repo, name)
        data = bytearray(b"".join(decompress_stream([path.read_bytes()], "zstd")))
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(b"".join(compress_stream([bytes(data)], "zstd", 3)))
    return tamper


def unreadable(name):
    """The segment is listed but cannot be read (by the server's user, which runs restore_command)."""
    def tamper(repo: Path):
        segment_file(repo, name).chmod(0)
    return tamper


def missing(name):
    def tamper(repo: Path):
        segment_file(repo, name).unlink()
    return tamper


def sealed_with_a_foreign_key(name):
    """The segment re-stored encrypted with a master key the restore's keyring does not hold."""
    def tamper(repo: Path):
        from pgdr.compression import decompress_stream
        from pgdr.crypto import Keyring, generate_key
        from pgdr.storage.file import FileStorage
        from pgdr.wal import WalArchive

        path = segment_file(repo, name)
        data = b"".join(decompress_stream([path.read_bytes()], "zstd"))
        storage = FileStorage(repo)
        storage.keyring, storage.encrypt = Keyring.parse(generate_key("lost-key"), "test"), True
        sealed = b"".join(WalArchive(storage, "app")._pack([data], name))
        path.with_name(path.name + ".enc").write_bytes(sealed)
        path.unlink()
    return tamper


def server_processes(pgdata: Path) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = Path(os.readlink(entry / "cwd"))
            except OSError:
                continue
            if cwd == pgdata or pgdata in cwd.parents:
                out.append(int(entry.name))
    return out


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def restore(config, workdir, *target, env=None):
    dest = workdir / f"truth-restore-{next(_n)}"
    port = free_port()
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--start", "--port", port,
                          "--socket-dir", socket_dir(workdir), *target, config=config, env=env)
    return code, out, err, dest, port


def targets(world):
    return {"latest": ("--target", "latest"), "time": ("--target-time", world["time3"])}


def assert_failed_cleanly(code, out, err, dest, port, segments):
    """Exit 1, recovery_short naming one of ``segments``, both LSNs in the JSON, the new target directory
    removed, nothing left running there."""
    assert code == 1, f"exit {code}: {json.dumps(out)}\n{err[-3000:]}"
    assert out["error"] == "recovery_short", out
    assert out["segment"] in segments and out["segment"] in out["message"], out
    assert out["reached_lsn"] and out["expected_lsn"], out
    assert not dest.exists(), f"{dest} was left behind: {sorted(os.listdir(dest))}"
    assert server_processes(dest) == [] and not port_open(port)


# --- a healthy archive: success is measured and reported -------------------------------------------------

@pytest.mark.parametrize("kind", ["latest", "time"])
def test_a_full_recovery_reports_what_it_reached_and_expected(world, workdir, kind):
    config = copy_repo(world, workdir)
    code, out, err, dest, port = restore(config, workdir, *targets(world)[kind])
    assert code == 0, err
    restored = SandboxCluster(_bins_for(world), dest, port)
    try:
        assert rows(restored) == world["expected"][4 if kind == "latest" else 3]
        rec = out["recovery"]
        assert rec["reached_lsn"] and rec["expected_lsn"] == rec["plan"]["expected_lsn"]
        from pgdr.lsn import parse_lsn
        from pgdr.wal import parse_segment

        newest = parse_segment(world["segment"][4])[1]
        assert parse_lsn(rec["expected_lsn"]) == (newest + 1) * 16 * 1024 * 1024  # the end of step 4's segment
        if kind == "latest":
            assert (parse_lsn(rec["reached_lsn"]) - 1) // (16 * 1024 * 1024) >= newest
        else:
            assert "before commit" in rec["stopped_at"]
    finally:
        restored.destroy()


# --- a fault in the middle of the range -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["latest", "time"])
@pytest.mark.parametrize("fault", ["corrupted", "unreadable", "undecryptable"])
def test_a_bad_segment_mid_range_fails_the_restore(world, workdir, fault, kind):
    middle = world["segment"][2]
    extra, env = {}, None
    if fault == "corrupted":
        tamper = corrupt(middle)
    elif fault == "unreadable":
        tamper = unreadable(middle)
    else:
        from pgdr.crypto import generate_key

        tamper = sealed_with_a_foreign_key(middle)
        extra = {"encryption": {"accept_unencrypted": True}}
        env = {"PGDR_KEYRING": generate_key("current-key")}
    config = copy_repo(world, workdir, tamper, **extra)
    code, out, err, dest, port = restore(config, workdir, *targets(world)[kind], env=env)
    assert_failed_cleanly(code, out, err, dest, port, {middle})
    assert "could not be fetched" in out["message"]


@pytest.mark.parametrize("kind", ["latest", "time"])
def test_a_missing_segment_is_refused_before_anything_is_written(world, workdir, kind):
    middle = world["segment"][2]
    config = copy_repo(world, workdir, missing(middle))
    code, out, err, dest, port = restore(config, workdir, *targets(world)[kind])
    assert code == 1 and out["error"] == "restore_refused" and middle in out["message"], err
    assert not dest.exists()


class CuttableProxy:
    """A TCP proxy in front of the S3 server that goes away for good — its port closed, every connection
    cut — the moment a request mentions ``trigger``: the S3 server stopping in the middle of a recovery."""

    def __init__(self, upstream: str, trigger: str):
        host, port = upstream.rsplit("//", 1)[-1].split(":")
        self.upstream = (host, int(port))
        self.trigger = trigger.encode()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cut = threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, up]
            threading.Thread(target=self._pump, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, False), daemon=True).start()

    def _pump(self, src, dst, watch):
        tail = b""
        try:
            while not self.cut.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if watch and self.trigger in tail + data:
                    self.stop()
                    return
                tail = data[-len(self.trigger):]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        self.cut.set()
        self.listener.close()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


@pytest.fixture(scope="module")
def s3_copy(world, s3_server):
    """The world's repository, copied into a bucket of the S3 server."""
    import boto3

    bucket = f"truth-s3-{world['major']}-{os.getpid()}"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for path in sorted(p for p in world["repo"].rglob("*") if p.is_file()):
        s3.put_object(Bucket=bucket, Key="r/" + path.relative_to(world["repo"]).as_posix(), Body=path.read_bytes())
    return bucket


@pytest.mark.parametrize("kind", ["latest", "time"])
def test_the_s3_server_going_away_during_recovery_fails_the_restore(world, workdir, s3_server, s3_copy, kind):
    middle = world["segment"][2]
    bucket = s3_copy
    proxy = CuttableProxy(s3_server, middle)
    config = write_config(workdir / f"truth-cut-{next(_n)}.yaml", {"app": {"repository": {
        "url": f"s3://{bucket}/r", "endpoint_url": proxy.url, "region": "us-east-1"}}})
    config.chmod(0o644)
    try:
        code, out, err, dest, port = restore(config, workdir, *targets(world)[kind])
    finally:
        proxy.stop()
    assert proxy.cut.is_set(), "the proxy never saw a request for the middle segment"
    # The first segment recovery could not get: the middle one, or one before it that the background prefetch
    # had not finished when the server went away.
    from pgdr.wal import parse_segment, segment_name

    tli, end = parse_segment(middle)
    first = parse_segment(world["segment"][1])[1] - 1
    assert_failed_cleanly(code, out, err, dest, port, {segment_name(tli, s) for s in range(first, end + 1)})


# --- a time target the archive cannot reach -------------------------------------------------------------

def test_a_time_after_the_newest_archived_wal_is_refused_before_anything_is_written(world, workdir):
    when = (datetime.now(timezone.utc) - timedelta(seconds=0.2)).isoformat()
    dest = workdir / f"truth-never-{next(_n)}"
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--start", "--port",
                          free_port(), "--socket-dir", socket_dir(workdir), "--target-time", when,
                          config=copy_repo(world, workdir))
    assert code == 1 and out["error"] == "restore_refused", err
    assert "after the newest archived WAL" in out["message"] and "reachable: from" in out["message"], out
    assert not dest.exists()
    # The bound is the archive time: a target before it is still planned (dry run).
    code, plan, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--dry-run",
                           "--target-time", world["time3"], config=copy_repo(world, workdir))
    assert code == 0 and plan["archived_by"], err


# --- wal-fetch's exit codes -------------------------------------------------------------------------------

def test_wal_fetch_exit_codes(world, workdir):
    from pgdr.wal import parse_segment, segment_name

    good = copy_repo(world, workdir)
    bad = copy_repo(world, workdir, corrupt(world["segment"][2]))
    out = workdir / f"truth-fetched-{next(_n)}"
    tli, newest = parse_segment(world["segment"][4])

    def fetch(config, name, *extra):
        return subprocess.run([sys.executable, "-m", "pgdr", *(["--config", str(config)] if config else []), "-q",
                               "wal-fetch", "--cluster", "app", "--prefetch", "0", *extra, name, str(out)],
                              capture_output=True, text=True, timeout=300)

    assert fetch(good, world["segment"][2]).returncode == 0 and out.stat().st_size == 16 * 1024 * 1024
    assert fetch(good, segment_name(tli, newest + 5)).returncode == 1  # not archived: recovery may end
    assert fetch(good, "00000009.history").returncode == 1
    proc = fetch(bad, world["segment"][2])
    assert proc.returncode == FETCH_FAILED and "SHA-256" in proc.stderr, proc.stderr
    unreachable = write_config(workdir / f"truth-unreachable-{next(_n)}.yaml", {"app": {"repository": {
        "url": "s3://nowhere/r", "endpoint_url": f"http://127.0.0.1:{free_port()}", "region": "us-east-1"}}})
    assert fetch(unreachable, world["segment"][2]).returncode == FETCH_FAILED
    broken = workdir / f"truth-broken-{next(_n)}.yaml"
    broken.write_text("clusters: [this is: not a mapping\n")
    assert fetch(broken, world["segment"][2]).returncode == FETCH_FAILED
    assert fetch(workdir / "no-such-config.yaml", world["segment"][2]).returncode == FETCH_FAILED
    assert fetch(good, world["segment"][2], "--no-such-option").returncode == FETCH_FAILED
    proc = subprocess.run([sys.executable, "-m", "pgdr", "--config", str(good), "wal-fetch", "--cluster", "app"],
                          capture_output=True, text=True)
    assert proc.returncode == FETCH_FAILED  # usage: %f and %p missing


# --- the measurement itself, without a server -------------------------------------------------------------

def _plan(expected: str):
    from pgdr.recovery import RecoveryPlan

    return RecoveryPlan(backup="20261125-000000F", backup_stop_lsn="0/2000100", backup_stop_time="", timeline=1,
                        wal_from="0/2000100", wal_to=None, archived_lsn=expected, reachable="", expected_lsn=expected)


def test_a_promotion_short_of_the_newest_archived_segment_is_a_failure():
    """Whatever made PostgreSQL end recovery early (a restore_command that said "not archived" for a file the
    archive holds), a `latest` restore that stopped before the last archived segment is recovery_short."""
    from pgdr.errors import RecoveryShort
    from pgdr.recovery import RecoveryOutcome, RecoveryTarget, measure_recovery

    latest = RecoveryTarget("latest")
    with pytest.raises(RecoveryShort) as short:
        measure_recovery(_plan("0/6000000"), latest, RecoveryOutcome("promoted", reached_lsn="0/4000000"))
    assert short.value.to_dict()["reached_lsn"] == "0/4000000" and short.value.expected_lsn == "0/6000000"
    assert short.value.segment == "000000010000000000000004" and "000000010000000000000005" in str(short.value)
    # Into the last archived segment (a record ending exactly at its end, or a partial's safe LSN): reached.
    measure_recovery(_plan("0/6000000"), latest, RecoveryOutcome("promoted", reached_lsn="0/6000000"))
    measure_recovery(_plan("0/6000000"), latest, RecoveryOutcome("promoted", reached_lsn="0/5FFFFD8"))
    measure_recovery(_plan("0/5123456"), latest, RecoveryOutcome("promoted", reached_lsn="0/5100000"))
    with pytest.raises(RecoveryShort):
        measure_recovery(_plan("0/5123456"), latest, RecoveryOutcome("promoted", reached_lsn="0/5000000"))
    with pytest.raises(RecoveryShort):  # not measured is not reached
        measure_recovery(_plan("0/6000000"), latest, RecoveryOutcome("promoted"))
    # Targets: PostgreSQL must say it stopped there; an LSN target may also be passed.
    name = RecoveryTarget("name", "before_upgrade")
    with pytest.raises(RecoveryShort):
        measure_recovery(_plan("0/6000000"), name, RecoveryOutcome("promoted", reached_lsn="0/5000000"))
    measure_recovery(_plan("0/6000000"), name, RecoveryOutcome("promoted", reached_lsn="0/5000000",
                                                               stopped_at='at restore point "before_upgrade"'))
    lsn = RecoveryTarget("lsn", "0/5000100")
    measure_recovery(_plan("0/6000000"), lsn, RecoveryOutcome("paused", reached_lsn="0/5000200"))
    with pytest.raises(RecoveryShort) as short:
        measure_recovery(_plan("0/6000000"), lsn, RecoveryOutcome("paused", reached_lsn="0/5000000"))
    assert short.value.expected_lsn == "0/5000100"


def test_archive_times_round_up():
    from pgdr.wal import archive_stamp, parse_archived_at

    t = datetime(2026, 11, 25, 14, 3, 0, 1, tzinfo=timezone.utc)
    assert archive_stamp(t) == "20261125T140301Z" and parse_archived_at(archive_stamp(t)) >= t
    assert archive_stamp(t.replace(microsecond=0)) == "20261125T140300Z"


def test_the_archive_time_of_the_newest_wal_counts_a_streamed_partial_and_not_legacy_names(tmp_path):
    from pgdr.lsn import parse_lsn
    from pgdr.storage.file import FileStorage
    from pgdr.wal import ARCHIVED, WalArchive

    archive = WalArchive(FileStorage(tmp_path / "r"), "app")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    result = archive._push_bytes("000000010000000000000003", b"wal" * 100)
    assert ARCHIVED.match(result.key.rsplit("/", 1)[-1]).group("at")
    lsn, when = archive.archived_by(1)
    assert lsn == 4 * 16 * 1024 * 1024 and before <= when <= datetime.now(timezone.utc) + timedelta(seconds=1)
    partial = tmp_path / "000000010000000000000004.partial"
    partial.write_bytes(b"more" * 100)
    archive.push_partial(partial, parse_lsn("0/4001000"))
    lsn, when_partial = archive.archived_by(1)
    assert lsn == parse_lsn("0/4001000") and when_partial >= before  # its upload time
    assert archive.archived_by(2) is None
    # A newer segment archived before archive times were recorded: the bound is unknown, not the older one.
    legacy = WalArchive(FileStorage(tmp_path / "legacy"), "app")
    legacy._push_bytes("000000010000000000000003", b"wal" * 100)
    legacy.storage.put_bytes("app/wal/00000001/000000010000000000000005." + "0" * 64 + ".zst", b"")
    assert legacy.archived_by(1) is None


def test_a_restore_command_that_cannot_work_is_refused_before_anything_is_written(world, workdir):
    """The configuration readable by root only: every wal-fetch of the started server would fail, so the
    restore refuses before writing (it used to restore, replay nothing and report success)."""
    config = copy_repo(world, workdir)
    config.chmod(0o600)
    code, out, err, dest, port = restore(config, workdir, "--target", "latest")
    assert code == 1 and out["error"] == "restore_refused", err
    assert "restore_command" in out["message"] and "as user postgres" in out["message"], out
    assert not dest.exists()
