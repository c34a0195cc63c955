"""pgdr drill benchmark: each phase of a DR drill beside pgBackRest restore + start for the same data.

    .venv/bin/python bench/drill_bench.py                         # pgbench scale 20 (~300 MB)
    .venv/bin/python bench/drill_bench.py --scale 130             # ~2 GB, as bench.py

A PostgreSQL 15 cluster archives every WAL segment twice (archive_command =
pgdr wal-push, then pgbackrest archive-push when pgBackRest is installed) and
is backed up by both. `pgdr drill` then marks the moment with pgbench writing,
restores into a scratch cluster, validates and tears down; its report gives
each phase's seconds. pgBackRest restores the same backup to the same restore
point (--type=name) and starts it until promoted: its restore and its start +
promotion are the comparable rows (pgBackRest does no validation).
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

from bench import PG15, pg15_and_workdir, run  # noqa: E402
from pgdr.pgbin import as_user  # noqa: E402
from pgdr.sandbox import SandboxCluster, free_port  # noqa: E402



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=20, help="pgbench scale (20 ≈ 300 MB)")
    ap.add_argument("--workdir", default="/var/tmp/pgdr-drill-bench")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    bins, work = pg15_and_workdir(args.workdir)
    repo = work / "repo-pgdr"
    repo.mkdir()
    shutil.chown(repo, "postgres", "postgres")
    port = free_port()
    src = SandboxCluster(bins, work / "source", port)
    config = work / "pgdr.yaml"
    config.write_text(json.dumps({"clusters": {"bench": {
        "dsn": src.dsn, "repository": f"file://{repo}", "pg_bin_dir": PG15, "rpo_seconds": 120,
        "drill": {"scratch_dir": str(work / "scratch"), "jobs": 2, "canary": True}}}}))
    config.chmod(0o644)
    pgbackrest = shutil.which("pgbackrest")
    conf = work / "pgbackrest.conf"
    archive = f"{sys.executable} -m pgdr --config {config} -q wal-push --cluster bench %p"
    if pgbackrest:
        archive += f" && {pgbackrest} --config={conf} --stanza=bench archive-push %p"
    else:
        print("pgbackrest is not installed (apt-get install pgbackrest): only pgdr's phases are measured")
    try:
        src.init(extra_conf=f"archive_mode = on\narchive_command = '{archive}'\narchive_timeout = 2\n"
                            "max_wal_size = 4GB\nfsync = on\n")
        src.start()
        if pgbackrest:
            from bench import pgbackrest_setup

            pgbackrest_setup(pgbackrest, conf, work, src)
        print(f"building the cluster: pgbench scale {args.scale} …", flush=True)
        run([bins.tool("pgbench"), "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p", str(port),
             "-U", "postgres", "postgres"])
        src.psql("checkpoint")
        size = int(src.psql("select sum(pg_database_size(datname)) from pg_database"))
        pgdr = [sys.executable, "-m", "pgdr", "--config", str(config)]
        run(pgdr + ["-q", "backup", "--cluster", "bench"])
        if pgbackrest:
            run(as_user([pgbackrest, f"--config={conf}", "--stanza=bench", "--type=full", "backup"], "postgres"))
        bench = subprocess.Popen([bins.tool("pgbench"), "-c", "2", "-T", "600", "-R", "100", "-n", "-h", "127.0.0.1",
                                  "-p", str(port), "-U", "postgres", "postgres"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(5)
            t0 = time.monotonic()
            proc = subprocess.run(pgdr + ["--json", "drill", "--cluster", "bench", "--run-id", "bench"],
                                  capture_output=True, text=True)
            drill_wall = time.monotonic() - t0
        finally:
            bench.terminate()
            bench.wait(30)
        report = json.loads(proc.stdout)
        if not report.get("ok"):
            raise SystemExit(f"the drill failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [(f"pgdr drill: {k.replace('_', ' ')}", v) for k, v in report["rto"]["phases"].items()]
        rows.append(("pgdr drill: RTO total (restore begins -> validated)", report["rto"]["total_seconds"]))
        rows.append(("pgdr drill: measured RPO (mark -> WAL archived)", report["rpo"]["seconds"]))
        rows.append(("pgdr drill: wall time, mark to torn down", drill_wall))
        for v in report["validations"]:
            rows.append((f"  validation {v['name']}", v["seconds"]))

        if pgbackrest:
            target = work / "restore-pgbackrest"
            target.mkdir(mode=0o700)
            shutil.chown(target, "postgres", "postgres")
            t0 = time.monotonic()
            run(as_user([pgbackrest, f"--config={conf}", "--stanza=bench", f"--pg1-path={target}", "--type=name",
                         f"--target={report['mark']['name']}", "--target-action=promote", "restore"], "postgres"))
            rows.append(("pgbackrest restore (process-max 2)", time.monotonic() - t0))
            bport = free_port()
            sock = work / "sock-pgbackrest"
            sock.mkdir()
            shutil.chown(sock, "postgres", "postgres")
            t0 = time.monotonic()
            run(as_user([bins.tool("pg_ctl"), "-D", str(target), "-w", "-t", "600", "-l", str(sock / "pgbr.log"),
                         "-o", f"-p {bport} -k {sock} -c archive_mode=off -c listen_addresses=127.0.0.1",
                         "start"], "postgres"))
            while True:
                q = subprocess.run([bins.tool("psql"), "-X", "-At", "-h", str(sock), "-p", str(bport), "-U", "postgres",
                                    "-c", "select pg_is_in_recovery()"], capture_output=True, text=True)
                if q.stdout.strip() == "f":
                    break
                time.sleep(0.05)
            rows.append(("pgbackrest start + WAL replay + promotion", time.monotonic() - t0))
            rows.append(("pgbackrest restore + start (no validation)", rows[-1][1] + rows[-2][1]))
            subprocess.run(as_user([bins.tool("pg_ctl"), "-D", str(target), "-m", "immediate", "stop"], "postgres"),
                           capture_output=True)
        print(f"\ncluster {size / 1e6:.0f} MB (pgbench scale {args.scale}); {os.cpu_count()} cores")
        print(f"{'':58} {'seconds':>8}")
        for name, secs in rows:
            print(f"{name:58} {secs:8.2f}")
        v = report["rto"]["phases"]["validation"]
        print(f"\nvalidation share of the drill's RTO: {v / report['rto']['total_seconds'] * 100:.0f}% "
              "(pg_amcheck and the full read run in parallel)")
        return 0
    finally:
        src.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    sys.exit(main())
