"""include/setup-server.sh prepares a real, fresh PostgreSQL server for pgdr."""

from __future__ import annotations

import os
import subprocess

from helpers import ROOT, pgdr, write_config
from pgdr.sandbox import SandboxCluster, free_port

SCRIPT = ROOT / "include" / "setup-server.sh"


def test_dry_run_changes_nothing_and_bad_input_is_refused():
    out = subprocess.run([SCRIPT, "--dry-run", "--role", "backup_role", "--allow", "10.1.2.3/32"],
                         capture_output=True, text=True)
    assert out.returncode == 0
    assert "CREATE ROLE backup_role WITH LOGIN REPLICATION" in out.stdout
    assert "host replication backup_role 10.1.2.3/32 scram-sha-256" in out.stdout
    assert "archive_command" not in out.stdout
    push = subprocess.run([SCRIPT, "--dry-run", "--push", "--cluster", "app"], capture_output=True, text=True)
    assert "archive_command = 'pgdr -q wal-push --cluster app %p'" in push.stdout
    for bad in (["--role", "x;drop table"], ["--allow", "everyone"], ["--push"], ["--bogus"]):
        r = subprocess.run([SCRIPT, *bad], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr, bad


def test_setup_then_pgdr_check_passes_as_the_new_role(workdir):
    from conftest import _bins

    pg = SandboxCluster(_bins(15), workdir / "setup15" / "data", free_port())
    pg.init(extra_conf="wal_level = minimal\nmax_wal_senders = 0\n").start()
    try:
        env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(pg.port), "PGUSER": "postgres",
               "PGDATABASE": "postgres", "PSQL": pg.bins.tool("psql")}
        r = subprocess.run([SCRIPT, "--role", "pgdr", "--allow", "127.0.0.1/32"], capture_output=True, text=True,
                           env=env)
        assert r.returncode == 0, r.stderr
        pg.psql("alter role pgdr password 'setup-test'")
        pg.stop()  # wal_level and max_wal_senders need a restart
        # The sandbox trusts everyone on 127.0.0.1 ahead of the script's lines: keep only the script's.
        hba = (pg.datadir / "pg_hba.conf").read_text()
        assert "host replication pgdr 127.0.0.1/32 scram-sha-256" in hba
        lines = [ln for ln in hba.splitlines() if " pgdr " in ln and not ln.startswith("#")]
        (pg.datadir / "pg_hba.conf").write_text("\n".join(lines) + "\n")
        pg.start()

        config = write_config(workdir / "setup15.yaml", {"app": {
            "dsn": f"host=127.0.0.1 port={pg.port} user=pgdr dbname=postgres",
            "repository": f"file://{workdir}/setup15-repo"}})
        code, report, err = pgdr("--json", "check", "--cluster", "app", config=config,
                                 env={"PGPASSWORD": "setup-test"})
        assert code == 0, report
        checks = {c["name"]: c for c in report["checks"]}
        assert checks["wal_level"]["detail"] == "wal_level = replica"
        assert checks["replication_connection"]["ok"] and checks["replication_privilege"]["ok"]
        code, report, _ = pgdr("--json", "check", "--cluster", "app", config=config, env={"PGPASSWORD": "wrong"})
        assert code == 1 and "password authentication failed" in report["checks"][0]["detail"]
        assert "wrong" not in str(report)
    finally:
        pg.destroy()


def test_setup_never_lowers_a_setting_and_a_logical_slot_survives_the_restart(workdir):
    """A server that already does logical replication: wal_level = logical stays (replica would stop it
    from starting with a logical slot), counts only go up, and no WAL cap is put on the existing slot."""
    from conftest import _bins

    pg = SandboxCluster(_bins(15), workdir / "setup-logical" / "data", free_port())
    pg.init(extra_conf="wal_level = logical\nmax_wal_senders = 20\nmax_replication_slots = 4\n").start()
    try:
        pg.psql("select pg_create_logical_replication_slot('downstream', 'test_decoding')")
        env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(pg.port), "PGUSER": "postgres",
               "PGDATABASE": "postgres", "PSQL": pg.bins.tool("psql")}
        r = subprocess.run([SCRIPT, "--role", "pgdr", "--allow", "127.0.0.1/32"], capture_output=True, text=True,
                           env=env)
        assert r.returncode == 0, r.stderr
        pg.stop()
        pg.start()  # raises if the server refuses to start
        assert pg.psql("show wal_level") == "logical"
        assert pg.psql("show max_wal_senders") == "20"  # kept: higher than pgdr asks for
        assert pg.psql("show max_replication_slots") == "10"  # raised
        assert pg.psql("show max_slot_wal_keep_size") == "-1"  # the existing slot keeps all its WAL
        assert pg.psql("select slot_type from pg_replication_slots where slot_name = 'downstream'") == "logical"
        assert pg.psql("select rolreplication from pg_roles where rolname = 'pgdr'") == "t"
    finally:
        pg.destroy()
