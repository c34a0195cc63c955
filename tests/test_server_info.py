"""What a backup learns of its server before pg_basebackup runs (pgdr.postgres.server_info): asked through a psql
process when one is found (no import of PostgreSQL's Python client: most of an incremental's fixed cost),
through the Python client otherwise and whenever psql does not answer exactly as expected."""

from __future__ import annotations

import os

from pgdr.config import ClusterConfig, RepositoryConfig
from pgdr.postgres import ConnInfo, _server_info_psql, server_info


def test_psql_and_the_python_client_learn_the_same(pg15, pg18):
    for pg in (pg15, pg18):
        conn = ConnInfo(pg.dsn)
        through_psql = _server_info_psql(conn, pg.bins.tool("psql"))
        assert through_psql is not None
        assert through_psql == server_info(conn)
        assert through_psql.major == pg.bins.major and through_psql.databases  # a real answer, not a default
        assert server_info(conn, pg.bins.tool("psql")) == through_psql


def test_a_psql_that_fails_or_answers_oddly_is_passed_over(pg15, tmp_path):
    """Whatever psql does short of the exact document, the Python client asks again: the same answer as
    without psql, never one made of psql's output."""
    truth = server_info(ConnInfo(pg15.dsn))
    good = _server_info_psql(ConnInfo(pg15.dsn), pg15.bins.tool("psql"))
    assert good == truth
    odd = {
        "fails": "echo 'psql: error: something' >&2; exit 2",
        "not json": "echo 'server_version 15'",
        "a wrong type": "echo '{\"version_num\": true}'",
        "another server's answer, a field short": "echo '" + __import__("json").dumps(
            {k: v for k, v in truth.__dict__.items() if k != "summarize_wal"} | {"version_num": 990000}) + "'",
        "killed": "kill -9 $$",
    }
    for i, (what, body) in enumerate(odd.items()):
        fake = tmp_path / f"psql{i}"
        fake.write_text(f"#!/bin/sh\n{body}\n")
        fake.chmod(0o755)
        assert _server_info_psql(ConnInfo(pg15.dsn), str(fake)) is None, what
        assert server_info(ConnInfo(pg15.dsn), str(fake)) == truth, what
    assert server_info(ConnInfo(pg15.dsn), str(tmp_path / "no-such-psql")) == truth


def test_a_backup_asks_the_configured_binaries_psql(tmp_path):
    from pgdr.backup import psql_for

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "psql").write_text("#!/bin/sh\n")
    (bin_dir / "psql").chmod(0o755)
    cluster = ClusterConfig(name="app", repository=RepositoryConfig(url=f"file://{tmp_path}/r"), pg_bin_dir=str(bin_dir))
    assert psql_for(cluster) == str(bin_dir / "psql")
    os.chmod(bin_dir / "psql", 0o644)  # not executable: none from there
    assert psql_for(cluster) is None
