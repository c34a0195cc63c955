"""Starting and stopping a PostgreSQL server in a data directory, with no shell in between.

``pg_ctl`` builds a command line and hands it to ``/bin/sh``, so a data
directory path (or an option) holding ``$(…)`` would run. pgdr instead starts
``postgres -D <path>`` directly (as the data directory's owner), waits for it
by reading ``postmaster.pid``, and stops it by signalling the postmaster whose
working directory is that data directory.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from pgdr.errors import PgdrError, UsageError
from pgdr.lock import pid_alive
from pgdr.crypto import DEFAULT_ENV
from pgdr.pgbin import as_user

LISTEN = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9.:%-]*)(,(\*|[A-Za-z0-9][A-Za-z0-9.:%-]*))*$")
LOOPBACK = "127.0.0.1"


def check_listen(value: str | None) -> str:
    """``listen_addresses`` for a restored server: loopback unless asked; addresses or host names only."""
    value = (value or LOOPBACK).replace(" ", "")
    if not LISTEN.fullmatch(value):
        raise UsageError(f"listen addresses {value!r}: give a comma-separated list of IP addresses or host names "
                         "(or '*')")
    return value


def pid_file_lines(pgdata: Path) -> list[str]:
    try:
        return (Path(pgdata) / "postmaster.pid").read_text().split("\n")
    except OSError:
        return []


def running_pid(pgdata: Path) -> int | None:
    """The postmaster running in ``pgdata``, or None. A pid file whose process is gone (or is some other
    process that reused the pid: its working directory is not ``pgdata``) does not count."""
    lines = pid_file_lines(pgdata)
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        return None
    if pid <= 0 or not pid_alive(pid):
        return None
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return pid  # no /proc (or not ours to read): trust the live pid, as pg_ctl does
    return pid if os.path.realpath(cwd) == os.path.realpath(pgdata) else None


def start_server(postgres: str, pgdata: Path, port: int, *, user: str | None, log_file: Path,
                 settings: dict[str, str] | None = None, socket_dir: str | None = None,
                 env: dict | None = None, wait: bool = True, timeout: float = 300) -> int:
    """Start ``postgres -D pgdata`` detached, as ``user``; return the postmaster's pid.

    ``wait``: until it accepts connections; otherwise until it has written its pid file (recovery is
    followed in its log by the caller). Fails with the log's tail if it exits first.
    """
    args = [postgres, "-D", str(pgdata), "-p", str(int(port))]
    for k, v in (settings or {}).items():
        args += ["-c", f"{k}={v}"]
    if socket_dir:
        args += ["-k", str(socket_dir)]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(as_user(args, user), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env if env is not None else {}, cwd="/", start_new_session=True, close_fds=True)
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it whenever it ends
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
            raise PgdrError(f"the server in {pgdata} exited during start-up (exit {proc.returncode}): {tail.strip()}")
        lines = pid_file_lines(pgdata)
        if len(lines) > 0 and lines[0].strip().isdigit():
            pid = int(lines[0])
            status = lines[7].strip() if len(lines) > 7 else ""
            if not wait or status in ("ready", "standby"):
                return pid
        time.sleep(0.1)
    raise PgdrError(f"the server in {pgdata} did not become ready within {timeout:.0f} s; see {log_file}")


def stop_server(pgdata: Path, timeout: float = 120) -> bool:
    """Fast shutdown (SIGINT) of the postmaster running in ``pgdata``; immediate (SIGQUIT) if it has not
    stopped within ``timeout``. True if one was running. Raises if it is still there afterwards."""
    pid = running_pid(pgdata)
    if pid is None:
        return False
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 30)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid) or running_pid(pgdata) != pid:
                return True
            time.sleep(0.1)
    raise PgdrError(f"the server in {pgdata} (pid {pid}) did not stop; nothing was changed in it")


# What a restored server may inherit from the worker: its restore_command (``python -m pgdr wal-fetch``)
# needs a PATH, a locale, certificates, where pgdr's config is; nothing else of the worker's environment
# (no Airflow metadata URL, no Fernet key, no unrelated credentials) reaches it.
SERVER_ENV_PASS = ("PATH", "LANG", "LANGUAGE", "TZ", "PYTHONPATH", "PGDR_CONFIG", "SSL_CERT_FILE", "SSL_CERT_DIR",
                   "REQUESTS_CA_BUNDLE")
# The AWS credential chain's variables: passed on only for an S3 repository, whose wal-fetch reads them.
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
           "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL",
           "AWS_ENDPOINT_URL_S3", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME",
           "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
           "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_STS_REGIONAL_ENDPOINTS", "AWS_CA_BUNDLE")


def server_env(cluster, storage) -> dict:
    """The restored server's whole environment: what its restore_command needs and nothing else.

    Its restore_command (pgdr wal-fetch) must reach the repository as this process does (credentials and
    endpoint from an Airflow connection, say: ``storage.process_env()``) and needs the keyring to open
    encrypted WAL. Both live in the server's process environment only, never in a file: the server runs
    as its own system user, and Linux lets only that user (and root) read /proc/<pid>/environ."""
    env = {k: v for k, v in os.environ.items() if k in SERVER_ENV_PASS or k.startswith("LC_")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    if cluster.repository.kind == "s3":
        env.update({k: v for k, v in os.environ.items() if k in AWS_ENV})
    env.update(storage.process_env())
    if storage.keyring:
        enc = cluster.repository.encryption
        env[enc.key_env if enc else DEFAULT_ENV] = storage.keyring.serialize()
    return env
