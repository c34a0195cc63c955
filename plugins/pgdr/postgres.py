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


def first_line(e: BaseException) -> str:
    """An error's message in one line, for logs and reports (its class's name when it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def connect(conn: ConnInfo, **kwargs):
    import psycopg

    kw = {"connect_timeout": CONNECT_TIMEOUT, "autocommit": True, **kwargs}
    if conn.env.get("PGPASSWORD"):
        kw["password"] = conn.env["PGPASSWORD"]
    try:
        return psycopg.connect(conn.dsn, **kw)
    except psycopg.Error as e:
        raise PostgresError(f"cannot connect to PostgreSQL at {conn.describe()}: {first_line(e)}") from None


# One document for everything server_info needs: the same query whether psql or the Python client asks it.
_INFO_SQL = """
select json_build_object(
    'version_num', current_setting('server_version_num')::int,
    'version', current_setting('server_version'),
    'system_identifier', (select system_identifier::text from pg_control_system()),
    'timeline', (select timeline_id from pg_control_checkpoint()),
    'wal_level', current_setting('wal_level'),
    'max_wal_senders', current_setting('max_wal_senders')::int,
    'can_replicate', (select rolsuper or rolreplication from pg_roles where rolname = current_user),
    'wal_segment_size', (select setting::bigint from pg_settings where name = 'wal_segment_size'),
    'summarize_wal', (select setting from pg_settings where name = 'summarize_wal'),
    'tablespaces', (select coalesce(json_agg(spcname order by spcname), '[]') from pg_tablespace
                    where spcname not in ('pg_default', 'pg_global')),
    'databases', (select coalesce(json_agg(datname order by datname), '[]') from pg_database where datallowconn))
"""


def server_info(conn: ConnInfo, psql: str | None = None) -> ServerInfo:
    """What pgdr needs to know of a server. With ``psql`` (a psql binary) it is asked through that first: one
    short process instead of importing PostgreSQL's Python client (0.1 s, 0.15 s from a cold page cache:
    most of an incremental backup's fixed cost). Anything psql does not answer cleanly is asked again
    through the Python client, which words every error."""
    if psql:
        info = _server_info_psql(conn, psql)
        if info is not None:
            return info
    import psycopg

    with connect(conn) as c:
        try:
            doc = c.execute(_INFO_SQL).fetchone()[0]
        except psycopg.Error as e:
            raise PostgresError(f"querying {conn.describe()} failed: {str(e).strip()}") from None
    info = _info_of(doc)
    if info is None:
        raise PostgresError(f"querying {conn.describe()}: an unexpected answer {doc!r}")
    return info


def _info_of(doc) -> ServerInfo | None:
    """The ServerInfo in _INFO_SQL's document, None when it is not exactly that."""
    def of(key, *types):
        if not isinstance(doc, dict) or key not in doc or type(doc[key]) not in types:  # exact: true is no int
            raise TypeError(key)
        return doc[key]

    try:
        spaces, dbs = of("tablespaces", list), of("databases", list)
        if not all(type(n) is str for n in spaces + dbs):
            return None
        return ServerInfo(of("version_num", int), of("version", str), of("system_identifier", str),
                          of("timeline", int), of("wal_level", str), of("max_wal_senders", int),
                          bool(of("can_replicate", bool, type(None))), spaces, dbs, of("wal_segment_size", int),
                          of("summarize_wal", str, type(None)))
    except TypeError:
        return None


def _server_info_psql(conn: ConnInfo, psql: str) -> ServerInfo | None:
    """server_info through ``psql``: no .psqlrc, no shell (the DSN is an argument), unaligned tuples only. None
    for any failure or any answer not exactly as expected."""
    import json
    import subprocess

    cmd = [psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", _INFO_SQL]
    if conn.dsn:
        cmd[1:1] = ["-d", conn.dsn]
    env = {**conn.process_env(), "PGCLIENTENCODING": "UTF8"}
    env.pop("PSQLRC", None)
    try:
        proc = subprocess.run(cmd, capture_output=True, env=env, stdin=subprocess.DEVNULL,
                              timeout=CONNECT_TIMEOUT + 30)
        if proc.returncode != 0:
            return None
        return _info_of(json.loads(proc.stdout.decode("utf-8")))
    except (OSError, subprocess.SubprocessError, ValueError):  # ValueError: also bad UTF-8 and bad JSON
        return None


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
