"""Throwaway PostgreSQL clusters on loopback, for demos, drills, tests and benchmarks.

Never used on a production cluster: it runs initdb into a new directory and
starts a server on a port you give it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pgdr.errors import PgdrError
from pgdr.pgbin import BinDir, as_user, reachable_by, user_ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_system_user(name: str = "postgres") -> None:
    """initdb and postgres refuse root; make sure the user they run as exists."""
    if os.geteuid() != 0:
        return
    try:
        user_ids(name)
    except PgdrError:
        subprocess.run(["useradd", "--system", "--user-group", "--home-dir", "/var/lib/postgresql",
                        "--shell", "/bin/bash", name], check=True)


@dataclass
class SandboxCluster:
    bins: BinDir
    datadir: Path
    port: int
    user: str | None = "postgres"

    def __post_init__(self):
        self.datadir = Path(self.datadir)
        self.socket_dir = self.datadir.parent / f"sock-{self.port}"
        if os.geteuid() != 0:
            self.user = None
        self.bins = reachable_by(self.bins, self.user)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _run(self, cmd: list[str], **kw):
        proc = subprocess.run(as_user(cmd, self.user), capture_output=True, text=True, **kw)
        if proc.returncode != 0:
            raise PgdrError(f"{' '.join(cmd[:2])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def _own(self, path: Path) -> None:
        if self.user:
            os.chown(path, *user_ids(self.user))

    def init(self, extra_conf: str = "") -> "SandboxCluster":
        for d in (self.datadir.parent, ):
            d.mkdir(parents=True, exist_ok=True)
        self.datadir.mkdir(mode=0o700, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        self._own(self.datadir)
        self._own(self.socket_dir)
        self._run([self.bins.tool("initdb"), "-D", str(self.datadir), "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--locale=C", "--no-sync"])
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(f"\n# pgdr sandbox\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.socket_dir}'\nwal_level = replica\n"
                    "max_wal_senders = 10\nfsync = off\nshared_buffers = 64MB\n" + extra_conf)
        return self

    def start(self) -> "SandboxCluster":
        if not self.socket_dir.exists():
            self.socket_dir.mkdir()
            self._own(self.socket_dir)
        self._run([self.bins.tool("pg_ctl"), "-D", str(self.datadir), "-w", "-t", "120",
                   "-o", f"-p {self.port} -k {self.socket_dir}", "-l", str(self.datadir / "server.log"), "start"])
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").exists():
            subprocess.run(as_user([self.bins.tool("pg_ctl"), "-D", str(self.datadir), "-w", "-t", "120",
                                    "-m", mode, "stop"], self.user), capture_output=True)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        proc = subprocess.run([self.bins.tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", dbname, "-c", sql],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise PgdrError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def databases(self) -> list[str]:
        return self.psql("select datname from pg_database where datallowconn order by 1").splitlines()

    def table_hashes(self, databases=None) -> dict:
        """{db.schema.table: row count and md5 of all rows in a stable order}, for every user table.

        Two clusters with equal hashes hold the same data, row for row.
        """
        out = {}
        for db in databases or self.databases():
            tables = self.psql(
                "select quote_ident(schemaname) || '.' || quote_ident(tablename) from pg_tables "
                "where schemaname not in ('pg_catalog', 'information_schema') order by 1", dbname=db)
            for t in filter(None, tables.splitlines()):
                out[f"{db}.{t}"] = self.psql(
                    f"select count(*) || ':' || coalesce(md5(string_agg(x::text, '|' order by x::text)), '') "
                    f"from {t} x", dbname=db)
        return out

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
