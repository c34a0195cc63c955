"""WAL capture under load: pgbench writes as fast as it can while `pgdr wal-stream`
runs; every two seconds the lag (server LSN against the newest LSN safely in the
repository) is sampled. Prints the WAL rate, the lag and the data-at-risk window.
With ``--handover-every S`` a new streamer starts every S seconds and takes the
slot over from the running one, as the WAL DAG's runs do: the window is then
measured across handovers too.

``--push`` measures push mode instead: archive_command = pgdr wal-push against
pgBackRest's archive-push (synchronous and archive-async), in segments per second
PostgreSQL's archiver gets acknowledged, on two backlogs (see push_bench).

    make bench-wal                                  # one minute
    .venv/bin/python bench/wal_bench.py --seconds 20 --handover-every 10
    .venv/bin/python bench/wal_bench.py --push --segments 64 --rounds 3

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
    ap.add_argument("--segments", type=int, default=64, help="with --push: segments in each backlog")
    ap.add_argument("--rounds", type=int, default=1, help="with --push: repeat every row (the median is shown)")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="with --push: only the backlogs and configurations whose name contains TEXT (repeatable)")
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
            return push_bench(bins, work, args.segments, args.rounds, args.only)
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


def push_bench(bins, work: Path, segments: int, rounds: int = 1, only: list[str] | None = None) -> int:
    """archive_command throughput in the archiver's own calling pattern, pgdr beside pgBackRest.

    One server, archiving paused (archive_command = '': PostgreSQL keeps the .ready files) while two
    backlogs are written: a burst of ``segments`` switches (nearly empty segments: what one call costs)
    and ``segments`` segments of real rows (what a segment costs). Then each configuration archives each
    backlog from scratch into its own fresh repository: its archive_command is set and reloaded, and the
    clock stops when PostgreSQL has marked the last segment done (.ready -> .done: acknowledged). Only the
    backlog measured is ready: its .done files go back to .ready before each row, and every other file stays
    done (a background process archiving ahead would otherwise work through the other backlog on the
    clock). Same WAL, same server, same page cache for every row."""
    import os

    import psutil

    from pgdr.pgbin import as_user, user_ids

    sys.path.insert(0, str(ROOT / "bench"))
    pgbackrest = shutil.which("pgbackrest")
    pg = SandboxCluster(bins, work / "push" / "data", free_port())
    pg.init(extra_conf="archive_mode = on\narchive_command = ''\nmax_wal_size = 8GB\nwal_keep_size = 8GB\n"
                       "fsync = on\n").start()
    status = pg.datadir / "pg_wal" / "archive_status"
    try:
        pg.psql("create table t (i int, p text)")

        def backlog(write) -> list[str]:
            pg.psql("select pg_switch_wal()")
            first = pg.psql("select pg_walfile_name(pg_current_wal_lsn())")
            write()
            pg.psql("select pg_switch_wal()")
            last = pg.psql("select pg_walfile_name(pg_current_wal_lsn() - 1)")
            return sorted(f.name[:-6] for f in status.iterdir() if f.name.endswith(".ready") and
                          first <= f.name[:24] <= last)

        burst = backlog(lambda: pg.psql("; ".join(f"insert into t values ({i}); select pg_switch_wal()"
                                                  for i in range(segments))))
        rows_per_segment = 115_000  # ~16 MiB of WAL each, md5 text: compresses ~2.5x, as busy tables do
        full = backlog(lambda: [pg.psql(f"insert into t select g, md5(g::text) || md5((-g)::text) "
                                        f"from generate_series(1, {rows_per_segment}) g")
                                for _ in range(segments)])
        print(f"backlogs: {len(burst)} nearly empty segments (a switch each), {len(full)} segments of rows "
              f"({len(full) * 16} MiB); {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
        for f in status.iterdir():  # nothing waits but the backlog being archived (archive() marks it ready)
            if f.name.endswith(".ready"):
                f.rename(f.with_suffix(".done"))

        def pgdr_cmd(tag: str, extra: str, front: str = "pgdr") -> str:
            repo = work / f"repo-{tag}"
            (repo / "bench").mkdir(parents=True)
            for d in (repo, repo / "bench"):
                os.chown(d, *user_ids("postgres"))
            conf = work / f"{tag}.yaml"
            conf.write_text(__import__("json").dumps({"clusters": {"bench": {
                "repository": f"file://{repo}", "wal": {"mode": "push"}}}}))
            conf.chmod(0o644)
            return f"{ROOT / '.venv' / 'bin' / front} --config {conf} -q wal-push --cluster bench {extra}%p"

        def pgbackrest_cmd(tag: str, asynchronous: bool) -> str:
            repo, conf = work / f"repo-{tag}", work / f"{tag}.conf"
            for d in (repo, work / f"spool-{tag}"):
                d.mkdir()
                shutil.chown(d, "postgres", "postgres")
            conf.write_text(
                f"[global]\nrepo1-path={repo}\nlog-path={repo}\nlock-path={repo}\nspool-path={work / f'spool-{tag}'}\n"
                "compress-type=zst\ncompress-level=3\nprocess-max=2\nlog-level-console=warn\n"
                f"archive-async={'y' if asynchronous else 'n'}\n"
                f"[bench]\npg1-path={pg.datadir}\npg1-port={pg.port}\npg1-socket-path={pg.socket_dir}\n")
            conf.chmod(0o644)
            proc = subprocess.run(as_user([pgbackrest, f"--config={conf}", "--stanza=bench", "stanza-create"],
                                          "postgres"), capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"pgbackrest stanza-create failed: {proc.stdout}{proc.stderr}")
            return f"{pgbackrest} --config={conf} --stanza=bench archive-push %p"

        def archive(command: str, names: list[str]) -> float:
            for n in names:
                done = status / f"{n}.done"
                if done.exists():
                    done.rename(status / f"{n}.ready")
            pg.psql(f"alter system set archive_command = '{command}'")
            t0 = time.monotonic()
            pg.psql("select pg_reload_conf()")
            peak[0], polls = 0, 0
            while any((status / f"{n}.ready").exists() for n in names):
                if time.monotonic() - t0 > 900:
                    raise SystemExit(f"archiving did not finish within 15 minutes: {command}")
                polls += 1
                if polls % 20 == 0:  # the pusher's (or pgBackRest's async process's) memory, every ~0.1 s
                    peak[0] = max([peak[0]] + [p.info["memory_info"].rss for p in psutil.process_iter(
                        ["cmdline", "memory_info"]) if p.info["cmdline"] and p.info["memory_info"] and
                        any(w in " ".join(p.info["cmdline"]) for w in ("wal-push-queue", "archive-push:async"))])
                time.sleep(0.005)
            elapsed = time.monotonic() - t0
            pg.psql("alter system set archive_command = ''")
            pg.psql("select pg_reload_conf()")
            return elapsed

        peak = [0]
        configs = [("pgdr, the push queue (default, 4 in flight)", lambda t: pgdr_cmd(t, "")),
                   ("pgdr-fast (compiled front), 4 in flight", lambda t: pgdr_cmd(t, "", "pgdr-fast")),
                   ("pgdr --parallel 8", lambda t: pgdr_cmd(t, "--parallel 8 ")),
                   ("pgdr --parallel 2", lambda t: pgdr_cmd(t, "--parallel 2 ")),
                   ("pgdr --parallel 0 (one process per segment)", lambda t: pgdr_cmd(t, "--parallel 0 "))]
        if pgbackrest:
            configs += [("pgBackRest archive-push (synchronous)", lambda t: pgbackrest_cmd(t, False)),
                        ("pgBackRest archive-async=y process-max=2", lambda t: pgbackrest_cmd(t, True))]
        else:
            print("pgbackrest is not installed (apt-get install pgbackrest): pgdr rows only")
        if only:
            configs = [c for c in configs if any(o in c[0] for o in only)] or configs
        backlogs = [b for b in (("burst", burst), ("rows", full)) if not only or any(o in b[0] for o in only)]
        n = 0
        results: dict[tuple[str, str], list[float]] = {}
        for r in range(rounds):
            for what, names in backlogs or (("burst", burst), ("rows", full)):
                for label, make in configs[r % len(configs):] + configs[:r % len(configs)]:  # fair order
                    n += 1
                    failed0 = int(pg.psql("select failed_count from pg_stat_archiver"))
                    elapsed = archive(make(f"c{n}"), names)
                    failed = int(pg.psql("select failed_count from pg_stat_archiver")) - failed0
                    results.setdefault((what, label), []).append(len(names) / elapsed)
                    print(f"  {what:5} {label}: {len(names)} segments in {elapsed:.2f} s = "
                          f"{len(names) / elapsed:.1f} segments/s{f', {failed} failures' if failed else ''}"
                          f"{f', background process peak RSS {peak[0] / 2**20:.0f} MB' if peak[0] else ''}",
                          flush=True)
                    subprocess.run(["pkill", "-f", "wal-push-queue"], capture_output=True)  # the pusher idles out
                    log = pg.datadir / "pg_wal" / ".pgdr-push" / "pusher.log"
                    if log.exists():  # kept for a look at a slow row; the next pusher starts a fresh one
                        shutil.move(log, Path(os.environ.get("PGDR_BENCH_LOGS", work)) / f"pusher-c{n}-{what}.log")
        print("\nsegments/s (median of rounds):")
        for what, desc in (("burst", f"{len(burst)} switched, nearly empty segments"),
                           ("rows", f"{len(full)} segments of rows")):
            if not any(w == what for w, _ in results):
                continue
            base = sorted(results.get((what, "pgBackRest archive-push (synchronous)"), [0]))
            base = base[len(base) // 2]
            print(f" {desc}:")
            for label, _ in configs:
                v = sorted(results[(what, label)])
                med = v[len(v) // 2]
                ratio = f"  ({med / base:.2f}x pgBackRest synchronous)" if base else ""
                print(f"   {label:45} {med:6.1f}{ratio}")
        return 0
    finally:
        pg.destroy()


if __name__ == "__main__":
    sys.exit(main())
