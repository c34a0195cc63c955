"""A real Airflow API server (``airflow api-server``) for a test module: its own AIRFLOW_HOME, a SQLite metadata
database with pgdr's DAGs serialized into it, SimpleAuthManager users admin, op and viewer, and JWTs from
``POST /auth/token``. pgdr's plugin is loaded from the checkout's plugins/ as in production."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pgdr.sandbox import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USERS = "admin:admin,op:op,viewer:viewer"


class AirflowServer:
    def __init__(self, pgdr_config: Path, home: Path | None = None):
        self.home = Path(home or tempfile.mkdtemp(prefix="pgdr-airflow-api-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "AIRFLOW_HOME": str(self.home), "PGDR_CONFIG": str(pgdr_config),
                    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
                    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    "AIRFLOW__CORE__AUTH_MANAGER":
                        "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": USERS,
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                    "AIRFLOW__API__PORT": str(self.port),
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        self.env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
        self.proc: subprocess.Popen | None = None
        self.prepare: subprocess.Popen | None = None
        self._tokens: dict[str, str] = {}

    def start_prepare(self) -> "AirflowServer":
        """Migrate the metadata DB and serialize pgdr's DAGs, in the background (the slow part)."""
        self.log = open(self.home / "prepare.log", "w")
        self.prepare = subprocess.Popen(
            ["bash", "-c", f"{BIN}/airflow db migrate && {BIN}/airflow dags reserialize"], env=self.env,
            stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def start(self, timeout: float = 180) -> "AirflowServer":
        if self.prepare is None:
            self.start_prepare()
        if self.prepare.wait(timeout) != 0:
            raise RuntimeError(f"airflow db migrate / dags reserialize failed: {(self.home / 'prepare.log').read_text()[-3000:]}")
        self.server_log = open(self.home / "api-server.log", "w")
        self.proc = subprocess.Popen([str(BIN / "airflow"), "api-server", "--port", str(self.port)], env=self.env,
                                     stdout=self.server_log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"api-server exited: {(self.home / 'api-server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/api/v2/monitor/health", timeout=2)
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise RuntimeError("api-server did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        subprocess.run(["rm", "-rf", str(self.home)])

    def password(self, user: str) -> str:
        return json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())[user]

    def token(self, user: str) -> str:
        if user not in self._tokens:
            status, body, _ = self.request("POST", "/auth/token", {"username": user, "password": self.password(user)})
            assert status in (200, 201), body
            self._tokens[user] = body["access_token"]
        return self._tokens[user]

    def request(self, method: str, path: str, body=None, user: str | None = None, raw: bytes | None = None,
                headers: dict | None = None):
        """(status, parsed JSON or text, headers); ``user`` None: anonymous."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if user:
            req.add_header("Authorization", f"Bearer {self.token(user)}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None

        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(req, timeout=60) as r:
                status, text, hdrs = r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            status, text, hdrs = e.code, e.read().decode(), dict(e.headers)
        try:
            return status, json.loads(text), hdrs
        except ValueError:
            return status, text, hdrs
