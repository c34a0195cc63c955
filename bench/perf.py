"""Every performance row of issue 13, in one run: pgdr beside pgBackRest, each pair on the same cluster.

    make bench-perf                       # about 25 minutes on 2 cores (with --pgbackrest)
    make bench-perf BENCH_ARGS=--quick    # smaller clusters, a first look

Runs, one after another (nothing else should run on the machine meanwhile):

- bench/bench.py         full backup and restore, PostgreSQL 15, pgBackRest (Debian's package);
- bench/incr_bench.py    incremental at ~1% change, restore of full + 6 incrementals, S3 at 30 ms a request,
                         PostgreSQL 18 (pgBackRest beside it when --pgbackrest names a build supporting 18);
- bench/wal_bench.py     --push: archive_command throughput, a burst and a backlog, pgBackRest synchronous
                         and archive-async;
- bench/replay_bench.py  WAL replay of ~1 GB to a server ready for connections, pgBackRest archive-get async;
- bench/archive_scale_bench.py  one WAL lookup (each push and fetch makes one) in a file repository holding
                         up to 200,000 segments of a timeline;
- bench/many_files_bench.py  full backups of ~200,000 small files, cold and warm cache, pgdr local, through
                         pg_basebackup and pgBackRest; a chain's restore and its peak RSS;
- bench/manifest_rss.py  peak memory of rewriting a chain's backup_manifest for a million files.

Each bench's own output streams by; at the end its summary lines are printed again, together. Numbers are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller clusters and backlogs")
    ap.add_argument("--pgbackrest", default=os.environ.get("PGBACKREST"),
                    help="a pgBackRest build that supports PostgreSQL 18, for the incremental rows")
    args = ap.parse_args()
    q = args.quick
    runs = [
        ("full backup and restore (PostgreSQL 15)", "bench.py",
         ["--scale", "20", "--random-mb", "200"] if q else ["--scale", "60", "--random-mb", "500"]),
        ("incremental backups, chains, S3 latency (PostgreSQL 18)", "incr_bench.py",
         (["--scale", "10", "--random-mb", "50", "--s3-mb", "0"] if q else [])
         + (["--pgbackrest", args.pgbackrest] if args.pgbackrest else [])),
        ("WAL push (PostgreSQL 15)", "wal_bench.py", ["--push", "--segments", "32" if q else "64",
                                                      "--rounds", "1" if q else "3"]),
        ("WAL replay to ready (PostgreSQL 15)", "replay_bench.py", ["--wal-mb", "256", "--rounds", "1"] if q else []),
        ("WAL lookups in a large file repository", "archive_scale_bench.py",
         ["--sizes", "1000,10000"] if q else ["--sizes", "1000,10000,50000,200000"]),
        ("a cluster of many small files (PostgreSQL 18)", "many_files_bench.py",
         (["--tables", "5000", "--rounds", "1"] if q else [])
         + (["--pgbackrest", args.pgbackrest] if args.pgbackrest else [])),
        ("memory of a chain restore's manifest rewrite", "manifest_rss.py",
         ["--files", "100000"] if q else []),
    ]
    summaries = []
    started = time.monotonic()
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    for title, script, extra in runs:
        path = ROOT / "bench" / script
        if not path.exists():
            summaries.append((title, [f"(bench/{script} is missing)"]))
            continue
        print(f"\n=== {title}: bench/{script} {' '.join(extra)}", flush=True)
        proc = subprocess.Popen([sys.executable, str(path), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
        code = proc.wait()
        summaries.append((title, _summary(lines) + ([f"(exited {code})"] if code else [])))
    print(f"\n\n==== summary ({(time.monotonic() - started) / 60:.0f} min) ====")
    for title, lines in summaries:
        print(f"\n## {title}")
        print("\n".join(lines))
    return 0


def _summary(lines: list[str]) -> list[str]:
    """What a bench prints last, its table or its summary: from the last blank line before its final block."""
    end = len(lines)
    while end and not lines[end - 1].strip():
        end -= 1
    table = [ln for ln in lines if ln.startswith("|")]
    if table:
        return table
    start = end
    blank_seen = 0
    while start > 0 and blank_seen < 2:  # the last two blocks: a heading and its rows
        start -= 1
        if not lines[start].strip():
            blank_seen += 1
    return lines[start:end]


if __name__ == "__main__":
    sys.exit(main())
