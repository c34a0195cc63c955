"""Talking to the source PostgreSQL server over libpq (psycopg)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pgdr.errors import PostgresError

CONNECT_TIMEOUT = 10


@dataclass(frozen=True)
class ConnInfo:
    """How to reach a server: a libpq DSN plus secret env vars (PGPASSWORD…).

    The DSN never holds a password; ``env`` does, and is never logged.
    An empty DSN means libpq's PG* environment variables decide.
    """

    dsn: str = ""
    env: dict = field(default_factory=dict, repr=False)

    def process_env(self) -> dict:
        env = {**os.environ, **self.env}
        env.setdefault("PGCONNECT_TIMEOUT", str(CONNECT_TIMEOUT))
        return env

    def describe(self) -> str:
        """Where we connect, in words, without secrets."""
        parts = dict(p.split("=", 1) for p in self.dsn.split() if "=" in p)
        env = self.process_env()
        host = parts.get("host") or env.get("PGHOST") or "local socket"
        port = parts.get("port") or env.get("PGPORT") or "5432"
        user = parts.get("user") or env.get("PGUSER") or "(default user)"
        return f"{user}@{host}:{port}"


@dataclass(frozen=True)
class ServerInfo:
    version_num: int
    version: str
    system_identifier: str
    timeline: int
    wal_level: str
    max_wal_senders: int
    can_replicate: bool
    tablespaces: list
    databases: list
    wal_segment_size: int = 16 * 1024 * 1024
    summarize_wal: str | None = None  # None before PostgreSQL 17

    @property
    def major(self) -> int:
        return self.version_num // 10000


def connect(conn: ConnInfo, **kwargs):
    import psycopg

    kw = {"connect_timeout": CONNECT_TIMEOUT, "autocommit": True, **kwargs}
    if conn.env.get("PGPASSWORD"):
        kw["password"] = conn.env["PGPASSWORD"]
    try:
        return psycopg.connect(conn.dsn, **kw)
    except psycopg.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PostgresError(f"cannot connect to PostgreSQL at {conn.describe()}: {msg}") from None


def server_info(conn: ConnInfo) -> ServerInfo:
    import psycopg

    with connect(conn) as c:
        try:
            row = c.execute(
                """
                select current_setting('server_version_num')::int,
                       current_setting('server_version'),
                       (select system_identifier::text from pg_control_system()),
                       (select timeline_id from pg_control_checkpoint()),
                       current_setting('wal_level'),
                       current_setting('max_wal_senders')::int,
                       (select rolsuper or rolreplication from pg_roles where rolname = current_user),
                       (select setting::bigint from pg_settings where name = 'wal_segment_size'),
                       (select setting from pg_settings where name = 'summarize_wal')
                """
            ).fetchone()
            spaces = [r[0] for r in c.execute(
                "select spcname from pg_tablespace where spcname not in ('pg_default', 'pg_global') order by 1")]
            dbs = [r[0] for r in c.execute("select datname from pg_database where datallowconn order by 1")]
        except psycopg.Error as e:
            raise PostgresError(f"querying {conn.describe()} failed: {str(e).strip()}") from None
    return ServerInfo(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), spaces, dbs, int(row[7]), row[8])


def replication_probe(conn: ConnInfo) -> str:
    """Open a replication connection (what pg_basebackup needs) and identify the system.

    Returns the system identifier; raises PostgresError with the server's words
    (usually a pg_hba.conf rule) when replication connections are refused.
    """
    import psycopg

    with connect(conn, replication="true", autocommit=True) as c:
        res = c.pgconn.exec_(b"IDENTIFY_SYSTEM")
        if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
            raise PostgresError(f"IDENTIFY_SYSTEM failed: {res.error_message.decode(errors='replace').strip()}")
        return res.get_value(0, 0).decode()
