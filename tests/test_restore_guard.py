"""The restore path's guard: paths from forms and the CLI never reach a shell nor leave restore_roots,
a replace checks everything and keeps a real safety backup before touching the destination, restored
servers are isolated, and binaries pgdr copies are not planted."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import pgdr, table_hashes, write_config
from pgdr.sandbox import SandboxCluster, free_port
from test_backup_restore import socket_dir
from test_dags import airflow_db, connections, load_dag_module  # noqa: F401  (fixture)

MARK = Path("/tmp/x")


def _bad_paths(root: Path) -> dict:
    return {
        "command substitution": "$(touch /tmp/x)",
        "command substitution below a root": f"{root}/$(touch /tmp/x)",
        "semicolon": f"{root}/a;touch /tmp/x",
        "relative": "relative/pgdata",
        "dot-dot": f"{root}/../etc",
        "outside the roots": "/var/lib/elsewhere/pgdata",
    }


def _setup(pg, workdir: Path, tag: str) -> dict:
    """One backup of ``pg`` in a file repository; CLI and DAG configs whose restore_roots is one directory."""
    root = workdir / f"{tag}-roots"
    root.mkdir(exist_ok=True)
    repo = f"file://{workdir}/{tag}-repo"
    cli = write_config(workdir / f"{tag}-cli.yaml", {"app": {"dsn": pg.dsn, "repository": repo,
                                                             "restore_roots": [str(root)]}})
    dag = write_config(workdir / f"{tag}-dag.yaml", {"app": {"conn_id": "pgdr_app", "repository": repo,
                                                             "restore_roots": [str(root)]}})
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=cli)
    assert code == 0, err
    return {"root": root, "cli": cli, "dag": dag, "backup": backup, "repo": repo, "hashes": table_hashes(pg)}


@pytest.fixture(scope="module")
def guarded(pg15, workdir):
    return _setup(pg15, workdir, "guard")


def _restore(config, dest, *extra, env=None):
    port = free_port()
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--start", "--port", port,
                          "--socket-dir", socket_dir(Path(dest).parent.parent),
                          *extra, config=config, env=env)
    return code, out, err, port


def test_form_schema_and_core_reject_paths_that_could_reach_a_shell_or_leave_the_roots(
        airflow_db, monkeypatch, pg15, guarded):
    from airflow.sdk.definitions.param import ParamValidationError

    MARK.unlink(missing_ok=True)
    connections(monkeypatch, pg15)
    dag = load_dag_module(monkeypatch, guarded["dag"], "pgdr_restore").pgdr_app_restore
    for t in dag.tasks:
        t.retries = 0
    root = guarded["root"]
    for why, bad in _bad_paths(root).items():
        with pytest.raises(ParamValidationError):  # Airflow's own validation of the field
            copy.deepcopy(dag.params.get_param("pgdata")).resolve(bad)
        params = copy.deepcopy(dag.params)
        with pytest.raises(ParamValidationError):  # and of the whole form, as a trigger validates it
            params["pgdata"] = bad
            params.validate()
        with pytest.raises(ParamValidationError):  # the run never starts: no task runs
            dag.test(run_conf={"pgdata": bad, "dry_run": False, "port": free_port()})
        # Airflow down: the core refuses the same input, before anything is written.
        code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", bad, "--start", "--port",
                              free_port(), config=guarded["cli"])
        assert code in (1, 2) and out["error"] in ("usage", "restore_refused"), (why, code, err)
        assert not MARK.exists(), why
    # A good path below the root passes the form.
    params = copy.deepcopy(dag.params)
    params["pgdata"] = f"{root}/restored-1"
    params.validate()
    assert not MARK.exists() and not (root / "restored-1").exists()


def test_restore_dag_defaults_validate_and_a_refusal_fails_once_without_retry(
        airflow_db, monkeypatch, pg15, workdir, caplog, capsys):
    connections(monkeypatch, pg15)
    empty_repo = f"file://{workdir}/guard-empty-repo"
    config = write_config(workdir / "guard-empty.yaml", {"app": {"conn_id": "pgdr_app", "repository": empty_repo}})
    dag = load_dag_module(monkeypatch, config, "pgdr_restore").pgdr_app_restore
    # Every Param is submittable with its default, as the trigger form and the API validate them.
    copy.deepcopy(dag.params).validate()
    from airflow.serialization.serialized_objects import DagSerialization

    params = DagSerialization.from_dict(DagSerialization.to_dict(dag)).params  # what the API server holds
    params.validate()
    for name in dag.params.keys():
        # The trigger form marks a field required unless its schema allows null, and an empty required
        # field disables the Trigger button.
        param = dag.params.get_param(name)
        types = param.schema.get("type")
        types = types if isinstance(types, list) else [types]
        assert param.value not in (None, "") or "null" in types, f"{name}: empty default in a required field"
    assert dag.get_task("restore").retries >= 2  # transient faults still retry
    # The default run (a dry run) on an empty repository is refused: failed, in one try, one line why.
    caplog.clear()
    capsys.readouterr()
    run = dag.test()
    assert run.state == "failed"
    (ti,) = run.get_task_instances()
    assert ti.state == "failed" and ti.try_number == 1
    text = capsys.readouterr().out + caplog.text
    assert "restore refused: cluster 'app' has no completed backup" in text
    # Airflow's runner logs every failure with its own frames; none of pgdr's internals, no exception chain.
    assert "plugins/pgdr/" not in text and "During handling" not in text and "direct cause" not in text
    assert "up_for_retry" not in text.lower()


def test_replace_refused_for_a_wrong_label_or_unreachable_target_leaves_the_running_server_alone(
        airflow_db, monkeypatch, pg15, guarded):
    dest = guarded["root"] / "replace-refused"
    code, out, err, port = _restore(guarded["cli"], dest)
    assert code == 0, err
    server = SandboxCluster(pg15.bins, dest, port)
    try:
        server.psql("create table only_here (x int); insert into only_here values (1), (2)", dbname="app")
        before = server.table_hashes()
        # The CLI: a target beyond the archive; then a label that does not exist.
        code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--replace", "--confirm",
                              "app", "--target-lsn", "FF/0", config=guarded["cli"])
        assert code == 1 and out["error"] == "restore_refused" and "archived" in out["message"], err
        code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--replace", "--confirm",
                              "app", "--backup", "20200101-000000F", config=guarded["cli"])
        assert code == 1 and out["error"] == "backup_not_found", err
        assert server.table_hashes() == before
        # The form: confirmed replace with a label that does not exist.
        connections(monkeypatch, pg15)
        dag = load_dag_module(monkeypatch, guarded["dag"], "pgdr_restore").pgdr_app_restore
        run = dag.test(run_conf={"pgdata": str(dest), "port": free_port(), "dry_run": False, "replace": True,
                                 "confirm_cluster": "app", "backup": "20200101-000000F"})
        assert run.state == "failed"
        assert server.table_hashes() == before  # still running, same data
    finally:
        server.destroy()


def test_confirmed_replace_keeps_a_real_safety_backup_that_restores_exactly(pg, workdir):
    guarded = _setup(pg, workdir, f"guard-replace{pg.bins.major}")
    dest = guarded["root"] / "replace-me"
    code, out, err, port = _restore(guarded["cli"], dest)
    assert code == 0, err
    server = SandboxCluster(pg.bins, dest, port)
    other = None
    try:
        server.psql("create table only_here as select g, md5(g::text) from generate_series(1, 5000) g",
                    dbname="app")
        server.psql("delete from customers where id % 7 = 0", dbname="app")
        previous = server.table_hashes()
        code, out, err, port2 = _restore(guarded["cli"], dest, "--replace", "--confirm", "app")
        assert code == 0, err
        safety = out["safety_backup"]
        assert safety["server_was_running"] is True and safety["label"].endswith("S")
        server = SandboxCluster(pg.bins, dest, port2)
        assert server.table_hashes() == guarded["hashes"]  # the backup, not what was there
        code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=guarded["cli"])
        kinds = {b["label"]: b["type"] for b in listing["backups"]}
        assert kinds[safety["label"]] == "safety" and kinds[guarded["backup"]["label"]] == "full"
        # 'latest' is never the safety backup; its own label restores exactly what the destination held.
        code, plan, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", guarded["root"] / "plan",
                             "--dry-run", config=guarded["cli"])
        assert plan["backup"] == guarded["backup"]["label"]
        code, out, err, port3 = _restore(guarded["cli"], guarded["root"] / "from-safety", "--backup",
                                         safety["label"])
        assert code == 0, err
        other = SandboxCluster(pg.bins, guarded["root"] / "from-safety", port3)
        assert other.table_hashes() == previous
    finally:
        server.destroy()
        if other:
            other.destroy()


def _listening(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (IPv4 and IPv6)."""
    out = set()
    for name, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(name).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                out.add(addr)
    return out


def test_restored_server_gets_a_minimal_environment_and_listens_on_loopback(workdir):
    from conftest import _bins

    src = SandboxCluster(_bins(18), workdir / "guard-env" / "data", free_port())
    src.init(extra_conf="listen_addresses = '*'\n").start()
    dest, restored = workdir / "guard-env-roots" / "restored", None
    try:
        repo = f"file://{workdir}/guard-env-repo"
        config = write_config(workdir / "guard-env.yaml", {"app": {"dsn": src.dsn, "repository": repo}})
        assert pgdr("backup", "--cluster", "app", config=config)[0] == 0
        dest.parent.mkdir()
        env = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:hunter2@db/airflow",
               "AIRFLOW__CORE__FERNET_KEY": "not-for-postgres", "SOME_SECRET": "s3cr3t"}
        code, out, err, port = _restore(config, dest, env=env)
        assert code == 0, err
        restored = SandboxCluster(src.bins, dest, port)
        pid = int((dest / "postmaster.pid").read_text().split()[0])
        environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if v)
        assert not {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__FERNET_KEY", "SOME_SECRET"} & set(environ)
        assert not [k for k in environ if k.startswith(("AIRFLOW", "AWS_"))]
        assert "PATH" in environ
        assert _listening(port) == {"0100007F"}  # 127.0.0.1 only, no IPv6, not 0.0.0.0
        assert restored.psql("select 1") == "1"
    finally:
        if restored:
            restored.destroy()
        src.destroy()


def _fake_install(base: Path) -> tuple:
    """An install tree the postgres user cannot reach (a 0700 parent), like a venv under /root."""
    from pgdr.pgbin import BinDir

    private = base / "private"
    shutil.rmtree(private, ignore_errors=True)
    bindir = private / "fakepkg" / "pginstall" / "bin"
    bindir.mkdir(parents=True)
    private.chmod(0o700)
    (bindir / "postgres").write_text("#!/bin/sh\necho genuine\n")
    (bindir / "postgres").chmod(0o755)
    (private / "fakepkg" / "pginstall" / "lib").mkdir()
    (private / "fakepkg" / "pginstall" / "lib" / "libpq.so.5").write_bytes(b"\x7fELF genuine library")
    src = bindir.parent
    digest = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:12]
    return BinDir(path=str(bindir), major=97, version="97.0"), Path(f"/var/tmp/pgdr-postgresql-97-{digest}")


def _plant(dest: Path, owner: str | None, body: str) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    bindir = dest / "fakepkg" / "pginstall" / "bin"
    bindir.mkdir(parents=True)
    (dest / "fakepkg" / "pginstall" / "lib").mkdir()
    (dest / "fakepkg" / "pginstall" / "lib" / "libpq.so.5").write_bytes(b"\x7fELF genuine library")
    (bindir / "postgres").write_text(body)
    (bindir / "postgres").chmod(0o755)
    if owner:
        subprocess.run(["chown", "-R", owner, str(dest)], check=True)
    for d, _, _ in os.walk(dest):
        os.chmod(d, 0o755)


@pytest.mark.parametrize("plant", ["foreign owner", "altered content", "group-writable"])
def test_a_planted_binary_copy_in_var_tmp_is_not_used(workdir, plant):
    from pgdr.pgbin import reachable_by

    bins, dest = _fake_install(workdir / f"guard-bins-{plant.replace(' ', '-')}")
    try:
        if plant == "foreign owner":
            _plant(dest, "postgres", "#!/bin/sh\necho genuine\n")  # even the right bytes, if not root's
        elif plant == "altered content":
            _plant(dest, None, "#!/bin/sh\necho planted\n")
        else:
            _plant(dest, None, "#!/bin/sh\necho genuine\n")
            (dest / "fakepkg" / "pginstall" / "bin").chmod(0o775)
        got = reachable_by(bins, "postgres")
        exe = Path(got.tool("postgres"))
        assert exe.read_text() == "#!/bin/sh\necho genuine\n"
        for p in [exe, *exe.parents]:
            if p == Path("/var/tmp") or p == Path("/"):
                break
            st = p.lstat()
            assert st.st_uid == 0 and not st.st_mode & 0o022, p
        assert subprocess.run(["runuser", "-u", "postgres", "--", str(exe)], capture_output=True,
                              text=True).stdout == "genuine\n"
        # A verified copy is reused as is.
        assert reachable_by(bins, "postgres").path == got.path
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_dry_run_without_archived_wal_says_the_restore_ends_at_the_backup(guarded):
    code, plan, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", guarded["root"] / "dry",
                           "--target", "latest", "--dry-run", config=guarded["cli"])
    assert code == 0, err
    stop = guarded["backup"]["stop_lsn"]
    assert f"no WAL archived after this backup: the restore ends at the backup's end, {stop}" in plan["summary"]
    assert "newest archived" not in plan["summary"]
    assert "newest archived WAL" not in plan["reachable"]


def test_confirmed_replace_of_a_stopped_data_directory_keeps_a_cold_safety_backup(pg15, guarded):
    dest = guarded["root"] / "replace-stopped"
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, config=guarded["cli"])
    assert code == 0, err
    (dest / "pgdr-marker").write_text("was here before the replace\n")
    shutil.chown(dest / "pgdr-marker", "postgres", "postgres")
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--replace", "--confirm", "app",
                          config=guarded["cli"])
    assert code == 0, err
    safety = out["safety_backup"]
    assert safety["server_was_running"] is False and safety["method"].startswith("cold copy")
    assert not (dest / "pgdr-marker").exists()  # replaced by the backup
    back = guarded["root"] / "from-cold-safety"
    code, out, err, port = _restore(guarded["cli"], back, "--backup", safety["label"])
    assert code == 0, err
    restored = SandboxCluster(pg15.bins, back, port)
    try:
        assert (back / "pgdr-marker").read_text() == "was here before the replace\n"
        assert restored.table_hashes() == guarded["hashes"]
    finally:
        restored.destroy()


def test_retention_expires_safety_backups_with_the_window_and_never_counts_them_as_full():
    from datetime import datetime, timedelta, timezone

    from pgdr.retention import CatalogItem, RetentionPolicy, plan_retention

    now = datetime(2026, 11, 26, tzinfo=timezone.utc)
    items = [
        CatalogItem("20261001-000000F", "ok", now - timedelta(days=56), "0/2000028"),
        CatalogItem("20261002-000000S", "ok", now - timedelta(days=55), "0/1000028", kind="safety"),
        CatalogItem("20261120-000000F", "ok", now - timedelta(days=6), "0/9000028"),
        CatalogItem("20261121-000000S", "ok", now - timedelta(days=5), "0/1000028", kind="safety"),
    ]
    plan = plan_retention(items, RetentionPolicy(window_days=30, min_full=2), now)
    actions = {d["label"]: (d["action"], d["reason"]) for d in plan.decisions}
    assert actions["20261002-000000S"][0] == "expire"
    assert actions["20261121-000000S"] == ("keep", "kept: safety backup inside the recovery window")
    assert actions["20261001-000000F"][0] == "keep"  # still among the newest 2 full backups: safety ones don't count
    assert plan.keep_wal_from_lsn == "0/2000028"  # a safety backup never holds archived WAL back


def test_replace_without_the_key_that_opens_the_backup_leaves_the_destination_alone(pg15, workdir):
    from pgdr.crypto import generate_key

    key, wrong = generate_key("guard-a"), generate_key("guard-b")
    root = workdir / "guard-key-roots"
    root.mkdir()
    config = write_config(workdir / "guard-key.yaml", {"app": {
        "dsn": pg15.dsn, "restore_roots": [str(root)],
        "repository": {"url": f"file://{workdir}/guard-key-repo", "encryption": True}}})
    assert pgdr("backup", "--cluster", "app", config=config, env={"PGDR_KEYRING": key})[0] == 0
    dest = root / "running"
    code, out, err, port = _restore(config, dest, env={"PGDR_KEYRING": key})
    assert code == 0, err
    server = SandboxCluster(pg15.bins, dest, port)
    try:
        server.psql("create table only_here as select 1 as x", dbname="app")
        before = server.table_hashes()
        code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--replace", "--confirm",
                              "app", config=config, env={"PGDR_KEYRING": wrong})
        assert code != 0 and "guard-a" in out["message"], err
        assert server.table_hashes() == before
        code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config, env={"PGDR_KEYRING": wrong})
        assert [b["type"] for b in listing["backups"]] == ["full"]  # no safety backup was even started
    finally:
        server.destroy()


def test_a_real_restore_records_its_rto_by_phase_like_a_drill(guarded, pg15):
    """issue 11: a real restore (CLI here; the restore DAG calls the same core) records its RTO under
    <cluster>/reports/rto/: each phase, the total against rto_seconds, what recovery reached."""
    from pgdr.audit import read_audit
    from pgdr.config import load_config
    from pgdr.storage import open_storage

    dest = guarded["root"] / "rto"
    code, out, err, port = _restore(guarded["cli"], dest)
    assert code == 0, err
    try:
        phases = out["phases"]
        assert set(phases) == {"fetch_verify_unpack", "start_and_recovery", "total"}
        assert phases["total"] >= phases["fetch_verify_unpack"] + phases["start_and_recovery"] - 0.01
        storage = open_storage(load_config(guarded["cli"]).cluster("app").repository)
        records = [r for r in read_audit(storage, "app", "rto") if r["pgdata"] == str(dest)]
        assert len(records) == 1
        rto = records[0]["rto"]
        assert rto["phases"] == phases and rto["total_seconds"] == phases["total"]
        assert rto["target_seconds"] == 3600 and rto["ok"] is True
        assert records[0]["backup"]["label"] == out["label"] and records[0]["kind"] == "restore"
    finally:
        SandboxCluster(pg15.bins, dest, port).destroy()
