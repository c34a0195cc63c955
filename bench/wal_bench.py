"""WAL capture under load: pgbench writes as fast as it can while `pgdr wal-stream`
runs; every two seconds the lag (server LSN against the newest LSN safely in the
repository) is sampled. Prints the WAL rate, the lag and the data-at-risk window.
With ``--handover-every S`` a new streamer starts every S seconds and takes the
slot over from the running one, as the WAL DAG's runs do: the window is then
measured across handovers too.

``--push`` measures push mode instead: archive_command = pgdr wal-push, a burst of
segments, and how many segments per second reach the repository, without and
with batching (``wal-push --batch``).

    make bench-wal                                  # one minute
    .venv/bin/python bench/wal_bench.py --seconds 20 --handover-every 10
    .venv/bin/python bench/wal_bench.py --push --segments 64

Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from pgdr.config import parse_config  # noqa: E402
from pgdr.lsn import parse_lsn  # noqa: E402
from pgdr.pgbin import probe  # noqa: E402
from pgdr.postgres import ConnInfo  # noqa: E402
from pgdr.sandbox import SandboxCluster, ensure_system_user, free_port  # noqa: E402
from pgdr.storage import open_storage  # noqa: E402
from pgdr.walstream import measure_lag  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--partial-interval", type=float, default=5.0)
    ap.add_argument("--workdir", default="/var/tmp/pgdr-wal-bench")
    ap.add_argument("--handover-every", type=float, default=0, metavar="S",
                    help="start a new streamer every S seconds, taking the slot over (as the WAL DAG's runs do)")
    ap.add_argument("--push", action="store_true", help="measure push mode (archive_command) in segments/s")
    ap.add_argument("--segments", type=int, default=64, help="with --push: segments in the burst")
    args = ap.parse_args()
    bins = probe("/usr/lib/postgresql/15/bin", "postgres")
    if bins is None:
        raise SystemExit("PostgreSQL 15 binaries are missing: apt-get install postgresql-15")
    ensure_system_user("postgres")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o755)
    if args.push:
        try:
            return push_bench(bins, work, args.segments)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    pg = SandboxCluster(bins, work / "source", free_port())
    config_path = work / "pgdr.yaml"
    raw = {"clusters": {"bench": {"dsn": pg.dsn, "repository": f"file://{work / 'repo'}",
                                  "wal": {"rpo_seconds": 60}}}}
    config_path.write_text(__import__("json").dumps(raw))
    cluster = parse_config(raw).cluster("bench")
    storage = open_storage(cluster.repository)
    streamer = None
    try:
        pg.init(extra_conf="fsync = on\nsynchronous_commit = on\nmax_wal_size = 2GB\n").start()
        subprocess.run([bins.tool("pgbench"), "-i", "-q", "-s", "20", "-h", "127.0.0.1", "-p", str(pg.port),
                        "-U", "postgres", "postgres"], check=True, capture_output=True)
        streamer = start_streamer(config_path, args.partial_interval)
        time.sleep(3)
        start_lsn = parse_lsn(pg.psql("select pg_current_wal_lsn()"))
        print(f"pgbench: {args.clients} clients for {args.seconds} s, WAL streamed with partial uploads every "
              f"{args.partial_interval:g} s", flush=True)
        bench = subprocess.Popen([bins.tool("pgbench"), "-c", str(args.clients), "-j", "2", "-T", str(args.seconds),
                                  "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "postgres"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        samples = []
        streamers = [streamer]
        next_handover = time.monotonic() + args.handover_every if args.handover_every else None
        while bench.poll() is None:
            time.sleep(2)
            if next_handover and time.monotonic() >= next_handover:
                streamer = start_streamer(config_path, args.partial_interval)  # the old one hands over
                streamers.append(streamer)
                next_handover = time.monotonic() + args.handover_every
            r = measure_lag(cluster, ConnInfo(pg.dsn), storage)
            samples.append((r.lag_bytes or 0, r.lag_seconds))
        out = bench.stdout.read()
        end_lsn = parse_lsn(pg.psql("select pg_current_wal_lsn()"))
        tps = next((ln for ln in out.splitlines() if ln.startswith("tps")), "tps = ?")
        # After the load stops, how long until everything is safe?
        t0 = time.monotonic()
        while (measure_lag(cluster, ConnInfo(pg.dsn), storage).lag_bytes or 0) > 0 and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        drain = time.monotonic() - t0
        wal_mb = (end_lsn - start_lsn) / 1e6
        lag_b = [b for b, _ in samples]
        lag_s = [s for _, s in samples if s is not None]
        print(f"\n{tps.strip()}")
        print(f"WAL generated: {wal_mb:.0f} MB in {args.seconds} s ({wal_mb / args.seconds:.1f} MB/s)")
        print(f"lag while loaded: max {max(lag_b) / 1e6:.1f} MB, mean {sum(lag_b) / len(lag_b) / 1e6:.1f} MB "
              f"({len(samples)} samples)")
        if lag_s:
            print(f"data-at-risk window while loaded: max {max(lag_s):.1f} s, mean {sum(lag_s) / len(lag_s):.1f} s")
        print(f"all WAL safe {drain:.1f} s after the load stopped")
        if args.handover_every:
            print(f"across {len(streamers) - 1} handovers between streamers")
        return 0
    finally:
        for proc in (streamers if "streamers" in locals() else [streamer]):
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=60)
        pg.destroy()
        shutil.rmtree(work, ignore_errors=True)


def start_streamer(config_path: Path, partial_interval: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pgdr", "--config", str(config_path), "-q", "--json",
                             "wal-stream", "--cluster", "bench", "--partial-interval", str(partial_interval)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)


def push_bench(bins, work: Path, segments: int) -> int:
    """A burst of ``segments`` WAL segments archived by archive_command = pgdr wal-push; segments/s."""
    import os
    from pgdr.pgbin import user_ids

    for batch in (0, 8, 32):
        repo = work / f"repo-{batch}"
        (repo / "bench").mkdir(parents=True)
        for d in (repo, repo / "bench"):
            os.chown(d, *user_ids("postgres"))
        config_path = work / f"push-{batch}.yaml"
        config_path.write_text(__import__("json").dumps({"clusters": {"bench": {
            "repository": f"file://{repo}", "wal": {"mode": "push"}}}}))
        config_path.chmod(0o644)
        command = f"{sys.executable} -m pgdr --config {config_path} -q wal-push --cluster bench --batch {batch} %p"
        pg = SandboxCluster(bins, work / f"push-{batch}" / "data", free_port())
        try:
            pg.init(extra_conf=f"archive_mode = on\narchive_command = '{command}'\nmax_wal_size = 4GB\n").start()
            pg.psql("create table t (i int)")
            first = pg.psql("select pg_walfile_name(pg_current_wal_lsn())")
            t0 = time.monotonic()
            pg.psql("; ".join(f"insert into t values ({i}); select pg_switch_wal()" for i in range(segments)))
            pg.psql("select pg_switch_wal()")
            last = pg.psql("select pg_walfile_name(pg_current_wal_lsn() - 1)")
            while (pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver") or "") < last:
                if time.monotonic() - t0 > 600:
                    raise SystemExit("archiving did not finish within 10 minutes")
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            count = int(last[16:], 16) - int(first[16:], 16) + 1
            failed = pg.psql("select failed_count from pg_stat_archiver")
            print(f"push mode, --batch {batch}: {count} segments archived in {elapsed:.1f} s = "
                  f"{count / elapsed:.1f} segments/s ({count * 16 / elapsed:.0f} MiB/s), {failed} archive_command "
                  "failures", flush=True)
        finally:
            pg.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
