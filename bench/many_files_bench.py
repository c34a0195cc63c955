"""pgdr on a cluster of many small files (PostgreSQL 18): 50,000 tables with a primary key and a TOAST table,
about 200,000 files, nearly all empty or one page. Per-file work, not bytes, is what is timed here.

    .venv/bin/python bench/many_files_bench.py --pgbackrest /var/tmp/pgbr-build/build/src/pgbackrest
    .venv/bin/python bench/many_files_bench.py --tables 10000     # a quicker look

Rows, each side first in every other round, ``--rounds`` rounds, medians (every run in the notes):
- full backup with a cold page cache (sync, drop_caches): pgdr ``backup_method: local``, pgdr through
  ``pg_basebackup``, and pgBackRest (zst 3, process-max 2, bundle + block) when given;
- the same with a warm page cache (the backup right before read everything);
- restore of a full + 1 incremental (1,000 tables changed, or all if fewer) and of a full: wall and peak RSS, the per-file
  state a chain restore keeps (target: peak RSS under 256 MB).
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

from incr_bench import PgBackRest, drop_caches, pg18_source, timed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pgbackrest", default=os.environ.get("PGBACKREST"))
    ap.add_argument("--workdir", default="/var/tmp/pgdr-many-files-bench")
    args = ap.parse_args()

    bins, work, src = pg18_source(args.workdir, bool(args.pgbackrest))
    results = []

    def row(name, runs, extra=""):
        med = statistics.median(m["wall"] for m in runs)
        rss = max(m["rss_mb"] for m in runs)
        walls = ", ".join(f"{m['wall']:.2f}" for m in runs)
        results.append((name, med, rss, f"{extra}runs: {walls} s"))
        print(f"  {name}: {med:.2f} s, peak RSS {rss:.0f} MB ({extra}runs: {walls} s)", flush=True)
        return med

    try:
        print(f"building: {args.tables} tables …", flush=True)
        for first in range(0, args.tables, 1000):
            src.psql(f"do $$ begin for i in {first}..{min(first + 1000, args.tables) - 1} loop execute "
                     "format('create table t%s (id int primary key, v text)', i); end loop; end $$")
        src.psql("checkpoint")
        files = sum(len(f) for _, _, f in os.walk(src.datadir))
        print(f"{files} files in the data directory", flush=True)
        brest = PgBackRest(args.pgbackrest, work, src) if args.pgbackrest else None
        if brest:
            brest.setup()
            print(f"beside {brest.version()}", flush=True)
        config = work / "pgdr.yaml"
        base = {"dsn": src.dsn, "repository": f"file://{work / 'repo'}", "pg_bin_dir": bins.path,
                "restore_roots": [str(work)]}
        config.write_text(json.dumps({"clusters": {"bench": base, "bench_local": {**base, "backup_method": "local"}}}))
        pgdr = [sys.executable, "-m", "pgdr", "--config", str(config), "-q", "--json"]
        sides = {"pgdr, backup_method local": pgdr + ["backup", "--cluster", "bench_local", "--type", "full"],
                 "pgdr through pg_basebackup": pgdr + ["backup", "--cluster", "bench", "--type", "full"]}
        if brest:
            sides["pgBackRest (zst 3, process-max 2)"] = brest.cmd("--type=full", "backup")
        for cache in ("cold", "warm"):
            runs = {name: [] for name in sides}
            for r in range(args.rounds):
                order = list(sides.items())
                for name, cmd in (order if r % 2 == 0 else order[::-1]):
                    src.psql("checkpoint")
                    if cache == "cold":
                        drop_caches()
                    else:
                        timed(cmd)  # reads everything into the page cache
                    runs[name].append(timed(cmd))
            meds = {name: row(f"full backup, {cache} cache: {name}", ms) for name, ms in runs.items()}
            if brest:
                ratio = meds["pgdr, backup_method local"] / meds["pgBackRest (zst 3, process-max 2)"]
                print(f"  pgdr local ÷ pgBackRest, {cache}: {ratio:.2f}x", flush=True)

        def backup(kind):
            out = work / "last.json"
            with open(out, "w") as f:
                timed(pgdr + ["backup", "--cluster", "bench", "--type", kind], stdout=f)
            return json.loads(out.read_text())["label"]

        full = backup("full")
        src.psql(f"do $$ begin for i in 0..{min(1000, args.tables) - 1} loop execute "
                 "format('insert into t%s values (1, ''x'')', i); end loop; end $$")
        src.psql("checkpoint")
        chain = backup("incr")
        for name, label in (("restore of full + 1 incremental", chain), ("restore of the full", full)):
            runs = []
            for r in range(args.rounds):
                target = work / f"restore-{label}-{r}"
                drop_caches()
                runs.append(timed(pgdr + ["restore", "--cluster", "bench", "--backup", label, "--pgdata",
                                          str(target)]))
                shutil.rmtree(target)
            row(name, runs)
    finally:
        src.destroy()
    print(f"\n{args.tables} tables, {files} files; {os.cpu_count()} cores")
    print("\n| row | median s | peak RSS MB | notes |\n|---|---|---|---|")
    for name, wall, rss, extra in results:
        print(f"| {name} | {wall:.2f} | {rss:.0f} | {extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
