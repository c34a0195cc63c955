"""Test helpers: seed data, per-table content hashes, config files, running the CLI, WAL streaming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PGDR_FAST = Path(sys.executable).parent / "pgdr-fast"  # archive_command's compiled front, beside pgdr (make venv)

# (database, statement): several databases, known rows, and ~4 MB of random
# bytes that no codec can shrink.
SEED_SQL = [
    ("postgres", "create database app"),
    ("postgres", "create database billing"),
    ("app", "create table customers (id int primary key, name text, created timestamptz default now())"),
    ("app", "insert into customers select g, 'customer ' || g from generate_series(1, 20000) g"),
    ("app", "create table blobs (id int primary key, payload bytea)"),
    ("app", "insert into blobs select g, decode(string_agg(lpad(to_hex((random() * 4294967295)::bigint), 8, '0'), ''), 'hex') "
            "from generate_series(1, 1000) g, generate_series(1, 1024) r group by g"),
    ("billing", "create schema ledger"),
    ("billing", "create table ledger.invoices (id bigserial primary key, amount numeric(12,2), note text)"),
    ("billing", "insert into ledger.invoices (amount, note) select g * 1.25, repeat('x', g % 50) "
                "from generate_series(1, 30000) g"),
]


def table_hashes(cluster, databases=("app", "billing", "postgres")) -> dict:
    """{db.schema.table: md5 of all rows in a stable order} for every user table."""
    return cluster.table_hashes(databases)


def write_config(path: Path, clusters: dict, **top) -> Path:
    # Tests restore into their own scratch directories: allow those (pgdr's default root is /var/lib/pgdr/restore).
    top["defaults"] = {"restore_roots": ["/tmp"], **(top.get("defaults") or {})}
    path.write_text(yaml.safe_dump({"clusters": clusters, **top}))
    return path


def pgdr(*args, config: Path | None = None, env: dict | None = None, check: bool = False):
    """Run the real ``pgdr`` CLI; returns (exit code, parsed JSON or None, stderr)."""
    cmd = [sys.executable, "-m", "pgdr"]
    if config:
        cmd += ["--config", str(config)]
    cmd += [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        data = None
    if check and proc.returncode != 0:
        raise AssertionError(f"pgdr {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc.returncode, data, proc.stderr


def archive_repo(workdir: Path, tag: str, s3_server: str | None = None):
    """A repository that archive_command, running as postgres, can write into: a postgres-owned directory,
    or (given the S3 server) a fresh bucket."""
    if s3_server is None:
        import shutil

        repo_dir = workdir / f"{tag}-repo"
        (repo_dir / "app").mkdir(parents=True)
        for d in (repo_dir, repo_dir / "app"):
            shutil.chown(d, "postgres", "postgres")
        return f"file://{repo_dir}"
    import boto3

    bucket = f"{tag}-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"url": f"s3://{bucket}/r", "endpoint_url": s3_server, "region": "us-east-1"}


def switch_and_wait_archived(pg, timeout: float = 30) -> None:
    """Switch WAL segments and wait until archive_command has archived the one switched away from;
    fail, with the server log, if archiving ever failed."""
    import time

    pg.psql("select pg_switch_wal()")
    want = pg.psql("select pg_walfile_name(pg_current_wal_lsn() - 1)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver") or "") >= want:
            break
        time.sleep(0.1)
    assert pg.psql("select failed_count from pg_stat_archiver") == "0", \
        "archive_command failed:\n" + (pg.datadir / "server.log").read_text()[-3000:]


def repo_snapshot(storage) -> dict:
    """{key: sha256} of every object: to prove an operation changed nothing. The bookkeeping every
    operation adds on purpose is left out: audit and other reports (<cluster>/reports/, refused operations
    included), the catalog cache (<cluster>/catalog.json) and the cluster lock's generations
    (<cluster>/lock/), which any writer takes and releases."""
    import hashlib

    return {o.key: hashlib.sha256(storage.get_bytes(o.key)).hexdigest() for o in storage.list("")
            if "/reports/" not in o.key and "/lock/" not in o.key and not o.key.endswith("/catalog.json")}


@contextmanager
def server_setting(pg, name: str, value: str):
    """``ALTER SYSTEM SET name = value`` on server ``pg``, reloaded, for the block; reset and reloaded after."""
    pg.psql(f"alter system set {name} = '{value}'")
    pg.psql("select pg_reload_conf()")
    try:
        yield
    finally:
        pg.psql(f"alter system reset {name}")
        pg.psql("select pg_reload_conf()")


def wait_for(condition, what: str, timeout: float = 90, poll: float = 0.3) -> None:
    """Until ``condition()`` is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise AssertionError(f"never happened: {what}")


def start_streamer(config: Path, spool: Path, log_file: Path, *extra) -> subprocess.Popen:
    """``pgdr --json wal-stream`` for cluster ``app``, uploading the open segment every 0.5 s: its result
    on stdout (a pipe), its log in ``log_file`` (a file, so a long run never blocks on a full pipe)."""
    cmd = [sys.executable, "-m", "pgdr", "--config", str(config), "--json", "wal-stream", "--cluster", "app",
           "--spool", str(spool), "--partial-interval", "0.5", *extra]
    with open(log_file, "w") as log:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)


def archived_to(config: Path, lsn: str) -> bool:
    """Whether the archive of cluster ``app`` (segments or the partial one) holds WAL up to ``lsn``."""
    from pgdr.lsn import parse_lsn

    code, report, _ = pgdr("--json", "wal-check", "--cluster", "app", config=config)
    return bool(report and report.get("newest_lsn") and parse_lsn(report["newest_lsn"]) >= parse_lsn(lsn))


@contextmanager
def restored_to_latest(config: Path, workdir: Path, pg):
    """The archive of cluster ``app`` has no gap; its newest backup restores to the end of the archived WAL
    and starts. Yields (the restored cluster, restore's JSON result); the cluster is removed afterwards."""
    from test_backup_restore import restore_and_start  # a test module that imports this one

    code, report, _ = pgdr("--json", "wal-check", "--cluster", "app", config=config)
    assert code == 0 and report["gaps"] == [], report
    restored, result = restore_and_start(config, workdir, pg, "latest", "--target", "latest")
    try:
        yield restored, result
    finally:
        restored.destroy()


def incremental_file(blocks: dict[int, bytes], truncation: int) -> bytes:
    """An INCREMENTAL.<name> file as pg_basebackup sends it: magic, count, truncation length, block numbers,
    padding to a block boundary (when there are blocks), the blocks."""
    import struct

    numbers = sorted(blocks)
    head = struct.pack(f"<III{len(numbers)}I", 0xD3AE1F0D, len(numbers), truncation, *numbers)
    if numbers:
        head += bytes(-len(head) % 8192)
    return head + b"".join(blocks[n] for n in numbers)
