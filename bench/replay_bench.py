"""WAL replay to ready: pgdr's restore_command beside pgBackRest's asynchronous archive-get, on the same WAL.

    .venv/bin/python bench/replay_bench.py                         # ~1 GB of pgbench WAL, 3 rounds
    .venv/bin/python bench/replay_bench.py --wal-mb 256 --rounds 1 # a quick look

A PostgreSQL 15 cluster archives every WAL segment to both tools in one
archive_command (pgdr wal-push, then pgbackrest archive-push), is backed up by
both (full, back to back), then pgbench writes ``--wal-mb`` of WAL, all of it
archived. Each tool's backup is then restored (not timed) to replay all that
WAL and promote: pgdr with its default restore (``pgdr restore --target latest``
writes ``restore_command = pgdr wal-fetch …``, one prefetcher, 8 segments
ahead), pgBackRest with ``archive-async=y``, ``process-max=2`` and a spool path
(its queue, ``archive-get-queue-max``, is 128 MiB: 8 segments ahead too). The
page cache is dropped before each start (as root). Timed: from starting
``postgres`` until it logs "ready to accept connections" (recovery over, the
end-of-recovery checkpoint done, promoted), confirmed by ``pg_is_in_recovery()``.
The restored servers run with fsync on, archiving off. Rounds alternate which
tool goes first. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

from bench import PG15, pg15_and_workdir, pgbackrest_setup, run  # noqa: E402
from pgdr.pgbin import as_user  # noqa: E402
from pgdr.sandbox import SandboxCluster, free_port  # noqa: E402

READY = "database system is ready to accept connections"
RESTORED = re.compile(r'restored log file "([0-9A-F]{24})" from archive')


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def generate_wal(bins, src, wal_mb: int, clients: int) -> tuple[str, str]:
    """pgbench until ``wal_mb`` of WAL is written; then switch and wait until both tools archived it all.
    Returns (first, last) LSN of the generated WAL."""
    start = src.psql("select pg_current_wal_lsn()")
    written = 0.0
    t0 = time.monotonic()
    while written < wal_mb:
        run([bins.tool("pgbench"), "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T", "5",
             "-h", "127.0.0.1", "-p", str(src.port), "-U", "postgres", "postgres"])
        written = float(src.psql(f"select pg_wal_lsn_diff(pg_current_wal_lsn(), '{start}') / 1048576"))
        print(f"  {written:.0f} MiB of WAL written ({time.monotonic() - t0:.0f} s)", flush=True)
    end = src.psql("select pg_current_wal_lsn()")
    last = src.psql("select pg_walfile_name(pg_current_wal_lsn())")
    src.psql("select pg_switch_wal()")
    deadline = time.monotonic() + 1800
    while True:
        archived, failed = src.psql("select coalesce(last_archived_wal, ''), failed_count "
                                    "from pg_stat_archiver").split("|")
        if archived[:24] >= last and len(archived) >= 24:
            break
        if int(failed):
            log = (src.datadir / "server.log").read_text(errors="replace")
            raise SystemExit(f"archive_command failed:\n{log[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"WAL not archived after 30 min (last archived {archived}, want {last})")
        time.sleep(0.5)
    return start, end


def start_and_wait(bins, target: Path, sock: Path, timeout: float) -> dict:
    """Start ``postgres`` on a restored directory; seconds until recovery is over and it accepts connections."""
    port = free_port()
    log = target / "replay.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    with open(log, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(as_user([bins.tool("postgres"), "-D", str(target), "-p", str(port), "-k", str(sock),
                                         "-c", "listen_addresses=127.0.0.1", "-c", "archive_mode=off",
                                         "-c", "fsync=on"], "postgres"),
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, cwd="/")
    try:
        while True:
            text = log.read_text(errors="replace")
            if READY in text:
                seconds = time.monotonic() - t0
                break
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise SystemExit(f"the server on {target} did not get ready:\n{text[-3000:]}")
            time.sleep(0.02)
        q = run([bins.tool("psql"), "-X", "-At", "-h", str(sock), "-p", str(port), "-U", "postgres",
                 "-c", "select pg_is_in_recovery(), pg_current_wal_lsn()"])
        in_recovery, lsn = q.stdout.strip().split("|")
        if in_recovery != "f":
            raise SystemExit(f"{target}: logged ready but still in recovery")
        segments = sorted(set(RESTORED.findall(text)))
        return {"seconds": seconds, "segments": len(segments), "last": segments[-1] if segments else None,
                "lsn": lsn}
    finally:
        run(as_user([bins.tool("pg_ctl"), "-D", str(target), "-m", "immediate", "-w", "stop"], "postgres"))
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wal-mb", type=int, default=1024, help="MiB of WAL to replay (default 1024)")
    ap.add_argument("--scale", type=int, default=50, help="pgbench scale (50 ≈ 750 MB)")
    ap.add_argument("--clients", type=int, default=4, help="pgbench clients while writing the WAL")
    ap.add_argument("--rounds", type=int, default=3, help="replays per tool, alternating which goes first")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--workdir", default="/var/tmp/pgdr-replay-bench")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    bins, work = pg15_and_workdir(args.workdir)
    pgbackrest = shutil.which("pgbackrest")
    if not pgbackrest:
        raise SystemExit("pgbackrest is not installed (apt-get install pgbackrest)")
    print(f"{os.cpu_count()} cores, {load()}", flush=True)
    repo = work / "repo-pgdr"
    repo.mkdir()
    spool = work / "spool-pgbackrest"
    spool.mkdir()
    for d in (repo, spool):
        shutil.chown(d, "postgres", "postgres")
    src = SandboxCluster(bins, work / "source", free_port())
    config = work / "pgdr.yaml"
    config.write_text(json.dumps({"clusters": {"bench": {
        "dsn": src.dsn, "repository": f"file://{repo}", "pg_bin_dir": PG15, "restore_roots": [str(work)]}}}))
    config.chmod(0o644)
    conf = work / "pgbackrest.conf"
    pgdr = [sys.executable, "-m", "pgdr", "--config", str(config)]
    archive = (f"{sys.executable} -m pgdr --config {config} -q wal-push --cluster bench %p"
               f" && {pgbackrest} --config={conf} --stanza=bench archive-push %p")
    try:
        # Checkpoints every 30 s: pgbench's WAL then carries full-page images, as a busy server's does.
        src.init(extra_conf=f"archive_mode = on\narchive_command = '{archive}'\nmax_wal_size = 2GB\n"
                            "checkpoint_timeout = 30s\nsynchronous_commit = off\n")
        src.start()
        pgbackrest_setup(pgbackrest, conf, work, src)
        # The restores' pgBackRest configuration: the same repository, asynchronous archive-get with a spool.
        restore_conf = work / "pgbackrest-restore.conf"
        restore_conf.write_text(conf.read_text().replace(
            "[global]\n", f"[global]\narchive-async=y\nspool-path={spool}\n", 1))
        restore_conf.chmod(0o644)
        print(f"building the cluster: pgbench scale {args.scale} …", flush=True)
        run([bins.tool("pgbench"), "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p", str(src.port),
             "-U", "postgres", "postgres"])
        src.psql("checkpoint")
        run(pgdr + ["-q", "backup", "--cluster", "bench"])
        run(as_user([pgbackrest, f"--config={conf}", "--stanza=bench", "--type=full", "backup"], "postgres"))
        print(f"writing {args.wal_mb} MiB of WAL with pgbench ({args.clients} clients) …", flush=True)
        first, last = generate_wal(bins, src, args.wal_mb, args.clients)
        src.stop()
        print(f"WAL {first} .. {last} archived by both; source stopped; {load()}", flush=True)

        def restore_pgdr(target: Path) -> None:
            run(pgdr + ["-q", "restore", "--cluster", "bench", "--pgdata", str(target), "--target", "latest"])

        def restore_pgbackrest(target: Path) -> None:
            target.mkdir(mode=0o700)
            shutil.chown(target, "postgres", "postgres")
            run(as_user([pgbackrest, f"--config={restore_conf}", "--stanza=bench", f"--pg1-path={target}",
                         "--type=default", "restore"], "postgres"))

        tools = [("pgdr (wal-fetch, prefetch 8)", restore_pgdr),
                 ("pgBackRest (archive-async, process-max 2)", restore_pgbackrest)]
        sock = work / "sock"
        sock.mkdir()
        shutil.chown(sock, "postgres", "postgres")
        results: dict[str, list[dict]] = {name: [] for name, _ in tools}
        dropped = True
        for r in range(args.rounds):
            for name, restore in (tools if r % 2 == 0 else tools[::-1]):
                target = work / f"replay-{r}-{'pgdr' if name.startswith('pgdr') else 'pgbackrest'}"
                restore(target)
                for f in spool.iterdir():
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
                dropped = drop_caches() and dropped
                before = load()
                m = start_and_wait(bins, target, sock, args.timeout)
                m["load"] = f"{before} -> {load()}"
                results[name].append(m)
                print(f"  round {r + 1}: {name}: {m['seconds']:.2f} s, {m['segments']} segments restored "
                      f"(last {m['last']}); {m['load']}", flush=True)
                shutil.copy(target / "replay.log", work / f"{target.name}.log")  # kept with --keep
                shutil.rmtree(target, ignore_errors=True)  # the spool goes too: pgdr's prefetcher leaves with it
                time.sleep(1)

        print(f"\nWAL replay of {args.wal_mb} MiB ({first} .. {last}) to ready, PostgreSQL 15, "
              f"{os.cpu_count()} cores; page cache {'dropped' if dropped else 'NOT dropped (not root)'} "
              f"before each start; {load()}")
        print(f"{'':44} {'median s':>9} {'each round':>22} {'segments':>9} {'MB/s':>7}")
        medians = {}
        for name, ms in results.items():
            secs = [m["seconds"] for m in ms]
            medians[name] = statistics.median(secs)
            segs = ms[0]["segments"]
            print(f"{name:44} {medians[name]:9.2f} {' '.join(f'{s:.2f}' for s in secs):>22} {segs:9d} "
                  f"{segs * 16.777216 / medians[name]:7.1f}")
        (a, pa), (b, pb) = medians.items()
        print(f"{'ratio pgdr / pgBackRest':44} {pa / pb:9.2f}x")
        return 0
    finally:
        src.stop("immediate")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
