"""pgdr benchmark: backup and restore speed and memory, beside the stream limit
and pgBackRest, on a PostgreSQL 15 cluster built for the purpose.

    make bench                                 # ~3 GB: pgbench scale 130 + 1 GB of random rows
    make bench BENCH_ARGS="--scale 10 --random-mb 100"   # a quick look

Prints one table: wall time, MB/s (database size / wall time) and peak RSS of
the measured process (and of its whole process tree, pg_basebackup and tar
included). Targets: pgdr backup and restore wall time no more than
pgBackRest's (zstd, process-max 2); pgdr peak RSS under 256 MB at any size.
Numbers are printed, never asserted: the test suite has no timing checks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from pgdr.pgbin import as_user, probe  # noqa: E402
from pgdr.sandbox import SandboxCluster, ensure_system_user, free_port  # noqa: E402

PG15 = "/usr/lib/postgresql/15/bin"


def fresh_workdir(workdir: str) -> Path:
    """An empty work directory the server's user can enter (the bench's user postgres created if missing)."""
    ensure_system_user("postgres")
    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o755)
    return work


def pg15_and_workdir(workdir: str):
    """PostgreSQL 15's binaries and an empty work directory."""
    bins = probe(PG15, "postgres")
    if bins is None:
        raise SystemExit("PostgreSQL 15 binaries are missing: apt-get install postgresql-15")
    return bins, fresh_workdir(workdir)


def run(cmd, **kw):
    """A command that must succeed: its output, or the bench stops with its tail."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                         f"{proc.stderr[-3000:]}")
    return proc


def measure(cmd: list[str], env=None, stdout=subprocess.DEVNULL) -> dict:
    t0 = time.monotonic()
    errfile = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=errfile)
    top = psutil.Process(proc.pid)
    peak_top = peak_tree = 0
    while proc.poll() is None:
        try:
            procs = [top] + top.children(recursive=True)
            rss = {p.pid: p.memory_info().rss for p in procs if p.is_running()}
            # runuser/sh wrappers: count the process doing the work as "top"
            main = max(rss.values()) if cmd[0] in ("runuser", "sh") else rss.get(top.pid, 0)
            peak_top = max(peak_top, main)
            peak_tree = max(peak_tree, sum(rss.values()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.monotonic() - t0
    errfile.seek(0)
    err = errfile.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall": wall, "rss_mb": peak_top / 2**20, "tree_rss_mb": peak_tree / 2**20}


def build(bins, src, args) -> None:
    print(f"building the cluster: pgbench scale {args.scale} + {args.random_mb} MB of random rows …", flush=True)
    subprocess.run([bins.tool("pgbench"), "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1",
                    "-p", str(src.port), "-U", "postgres", "postgres"], check=True, capture_output=True)
    src.psql("create extension if not exists pgcrypto")
    src.psql("create table noise (id int primary key, payload bytea)")
    src.psql("alter table noise alter column payload set storage external")
    rows = args.random_mb * 128  # 8 KiB each
    for start in range(0, rows, 16384):
        src.psql(f"insert into noise select g, {' || '.join(['gen_random_bytes(1024)'] * 8)} "
                 f"from generate_series({start + 1}, {min(start + 16384, rows)}) g")
    src.psql("checkpoint")


def pgbackrest_setup(pgbackrest, conf, work, src, extra: str = ""):
    """A pgBackRest stanza 'bench' for ``src``: zst level 3, process-max 2 (``extra``: more [global] lines)."""
    conf.write_text(
        f"[global]\nrepo1-path={work / 'repo-pgbackrest'}\nlog-path={work / 'repo-pgbackrest'}\n"
        f"lock-path={work / 'repo-pgbackrest'}\n"
        f"compress-type=zst\ncompress-level=3\nprocess-max=2\nstart-fast=y\nlog-level-console=warn\n{extra}"
        f"[bench]\npg1-path={src.datadir}\npg1-port={src.port}\npg1-socket-path={src.socket_dir}\n")
    (work / "repo-pgbackrest").mkdir()
    shutil.chown(work / "repo-pgbackrest", "postgres", "postgres")
    os.chmod(conf, 0o644)
    proc = subprocess.run(as_user([pgbackrest, f"--config={conf}", "--stanza=bench", "stanza-create"], "postgres"),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pgbackrest stanza-create failed: {proc.stdout}{proc.stderr}")


def head_to_head(rounds: int, pgdr: list[str], pgbackrest: list[str], work: Path, settle, walls: dict) -> list[str]:
    """More rounds of the four rows compared with pgBackRest (the first round is the table's), each tool first
    in every other round: single runs here vary by ±10%, more than some of the differences measured."""
    runs = {"backup": {"pgdr": [walls["pgdr backup (zstd level 3)"]],
                       "pgBackRest": [walls["pgbackrest backup (zstd 3, process-max 2)"]]},
            "restore": {"pgdr": [walls["pgdr restore (SHA-256 + pg_verifybackup -s)"]],
                        "pgBackRest": [walls["pgbackrest restore (process-max 2)"]]}}

    def side(tool: str, r: int) -> None:
        target = work / f"restore-{tool}-{r}"
        if tool == "pgdr":
            backup, restore = pgdr + ["backup", "--cluster", "bench"], pgdr + ["restore", "--cluster", "bench",
                                                                             "--pgdata", str(target)]
        else:
            target.mkdir(mode=0o700)
            shutil.chown(target, "postgres", "postgres")
            backup = as_user([*pgbackrest, "--type=full", "backup"], "postgres")
            restore = as_user([*pgbackrest, f"--pg1-path={target}", "restore"], "postgres")
        for what, cmd in (("backup", backup), ("restore", restore)):
            settle()
            runs[what][tool].append(measure(cmd)["wall"])
        shutil.rmtree(target)

    for r in range(1, rounds):
        for tool in (("pgdr", "pgBackRest") if r % 2 else ("pgBackRest", "pgdr")):
            side(tool, r)
    lines = [f"head to head, median of {rounds} rounds (each tool first in every other round):"]
    for what, by_tool in runs.items():
        a, b = statistics.median(by_tool["pgdr"]), statistics.median(by_tool["pgBackRest"])
        lines.append(f"  {what:8} pgdr {a:5.1f} s, pgBackRest {b:5.1f} s: {a / b:.2f}x  "
                     f"(pgdr {', '.join(f'{w:.1f}' for w in by_tool['pgdr'])}; "
                     f"pgBackRest {', '.join(f'{w:.1f}' for w in by_tool['pgBackRest'])})")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=130, help="pgbench scale (130 ≈ 2 GB)")
    ap.add_argument("--random-mb", type=int, default=1024, help="MB of poorly compressible rows")
    ap.add_argument("--workdir", default="/var/tmp/pgdr-bench")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (and the built cluster)")
    ap.add_argument("--reuse", action="store_true", help="reuse the cluster a --keep run left behind")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of pgdr's and pgBackRest's backup and restore "
                                                          "side by side (each first in every other round)")
    args = ap.parse_args()

    bins = probe(PG15, "postgres")
    if bins is None:
        raise SystemExit("PostgreSQL 15 binaries are missing: apt-get install postgresql-15")
    ensure_system_user("postgres")
    work = Path(args.workdir)
    reuse = args.reuse and (work / "source" / "PG_VERSION").exists()
    if reuse:  # keep the built cluster, drop every earlier result
        port = int((work / "port").read_text())
        for entry in work.iterdir():
            if entry.name not in ("source", "port", f"sock-{port}"):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    else:
        port = free_port()
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        work.chmod(0o755)
        (work / "port").write_text(str(port))
    pgbackrest = shutil.which("pgbackrest")
    conf = work / "pgbackrest.conf"
    h2h: list[str] = []
    archive = ""
    if pgbackrest:
        archive = (f"archive_mode = on\narchive_command = '{pgbackrest} --config={conf} --stanza=bench "
                   "archive-push %p'\n")
    src = SandboxCluster(bins, work / "source", port)
    try:
        if not reuse:
            src.init(extra_conf=archive + "max_wal_size = 4GB\nfsync = on\n")
        src.start()
        if pgbackrest:
            pgbackrest_setup(pgbackrest, conf, work, src)
        if not reuse:
            build(bins, src, args)
        size = int(src.psql("select sum(pg_database_size(datname)) from pg_database"))
        print(f"cluster size: {size / 1e9:.2f} GB", flush=True)

        results = []

        def settle():
            # Each measurement starts from the same state: no dirty buffers for its checkpoint to flush,
            # no writeback of the previous step's files competing for the disk.
            src.psql("checkpoint")
            os.sync()

        def row(name, m):
            results.append((name, m["wall"], size / m["wall"] / 1e6, m["rss_mb"], m["tree_rss_mb"]))
            print(f"  {name}: {m['wall']:.1f} s", flush=True)
            settle()

        settle()

        row("pg_basebackup -Ft -X none -D - > /dev/null (stream limit)", measure(
            ["sh", "-c", f"{bins.tool('pg_basebackup')} -h 127.0.0.1 -p {src.port} -U postgres -Ft -X none "
                         f"-c fast -D - > /dev/null"]))

        config = work / "pgdr.yaml"
        config.write_text(json.dumps({"clusters": {"bench": {
            "dsn": src.dsn, "repository": f"file://{work / 'repo-pgdr'}", "pg_bin_dir": PG15,
            "restore_roots": [str(work)]}}}))
        pgdr = [sys.executable, "-m", "pgdr", "--config", str(config), "-q", "--json"]
        row("pgdr backup (zstd level 3)", measure(pgdr + ["backup", "--cluster", "bench"]))
        target = work / "restore-pgdr"
        row("pgdr restore (SHA-256 + pg_verifybackup -s)", measure(pgdr + ["restore", "--cluster", "bench",
                                                                    "--pgdata", str(target)]))
        stored = sum(f.stat().st_size for f in (work / "repo-pgdr").rglob("*") if f.is_file())
        shutil.rmtree(target)
        row("pgdr verify, objects only (SHA-256 + decompress)", measure(
            pgdr + ["verify", "--cluster", "bench", "--no-pg-verify", "--no-wal"]))
        row("pgdr verify (objects + pg_verifybackup on a scratch copy)", measure(
            pgdr + ["verify", "--cluster", "bench", "--no-wal"]))

        # The same with client-side encryption: zstd, then AES-256-GCM in 1 MiB chunks.
        from pgdr.crypto import generate_key

        enc_env = {**os.environ, "PGDR_KEYRING": generate_key("bench")}
        enc_config = work / "pgdr-enc.yaml"
        enc_config.write_text(json.dumps({"clusters": {"bench": {
            "dsn": src.dsn, "pg_bin_dir": PG15, "restore_roots": [str(work)],
            "repository": {"url": f"file://{work / 'repo-pgdr-enc'}", "encryption": True}}}}))
        pgdr_enc = [sys.executable, "-m", "pgdr", "--config", str(enc_config), "-q", "--json"]
        row("pgdr backup, encrypted (zstd 3 + AES-256-GCM)", measure(pgdr_enc + ["backup", "--cluster", "bench"],
                                                                    env=enc_env))
        target = work / "restore-pgdr-enc"
        row("pgdr restore, encrypted", measure(pgdr_enc + ["restore", "--cluster", "bench", "--pgdata", str(target)],
                                               env=enc_env))
        shutil.rmtree(target)
        row("pgdr verify, encrypted, objects only", measure(
            pgdr_enc + ["verify", "--cluster", "bench", "--no-pg-verify", "--no-wal"], env=enc_env))

        if pgbackrest:
            row("pgbackrest backup (zstd 3, process-max 2)", measure(
                as_user([pgbackrest, f"--config={conf}", "--stanza=bench", "--type=full", "backup"], "postgres")))
            target = work / "restore-pgbackrest"
            target.mkdir(mode=0o700)
            shutil.chown(target, "postgres", "postgres")
            row("pgbackrest restore (process-max 2)", measure(
                as_user([pgbackrest, f"--config={conf}", "--stanza=bench", f"--pg1-path={target}", "restore"],
                        "postgres")))
            h2h = head_to_head(args.rounds, pgdr, [pgbackrest, f"--config={conf}", "--stanza=bench"], work, settle,
                         walls={name: wall for name, wall, *_ in results})
        else:
            print("pgbackrest is not installed (apt-get install pgbackrest): skipping its rows")

        print(f"\ncluster {size / 1e9:.2f} GB; pgdr repository {stored / 1e9:.2f} GB "
              f"({size / max(stored, 1):.2f}x); {os.cpu_count()} cores")
        if pgbackrest:
            brest = sum(f.stat().st_size for f in (work / "repo-pgbackrest" / "backup").rglob("*") if f.is_file())
            print(f"pgbackrest repository {brest / 1e9:.2f} GB ({size / max(brest, 1):.2f}x)")
        print(f"{'':60} {'wall s':>8} {'MB/s':>8} {'RSS MB':>8} {'tree MB':>8}")
        for name, wall, mbs, rss, tree in results:
            print(f"{name:60} {wall:8.1f} {mbs:8.1f} {rss:8.1f} {tree:8.1f}")
        walls = {name: wall for name, wall, *_ in results}

        def cost(what, plain, other):
            a, b = walls[plain], walls[other]
            print(f"{what:60} {b - a:+8.1f} s ({(b - a) / a * 100:+.0f}% of {plain.split(' (')[0]})")

        print()
        cost("cost of encryption on backup", "pgdr backup (zstd level 3)", "pgdr backup, encrypted (zstd 3 + AES-256-GCM)")
        cost("cost of encryption on restore", "pgdr restore (SHA-256 + pg_verifybackup -s)", "pgdr restore, encrypted")
        cost("cost of encryption on verify (objects only)", "pgdr verify, objects only (SHA-256 + decompress)",
             "pgdr verify, encrypted, objects only")
        cost("verify (objects only) next to the backup", "pgdr backup (zstd level 3)",
             "pgdr verify, objects only (SHA-256 + decompress)")
        cost("full verify (with pg_verifybackup) next to the backup", "pgdr backup (zstd level 3)",
             "pgdr verify (objects + pg_verifybackup on a scratch copy)")
        if h2h:
            print("\n" + "\n".join(h2h))
        return 0
    finally:
        src.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
