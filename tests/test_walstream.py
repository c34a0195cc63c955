"""Streaming WAL capture, for real: pgdr's replication client on a slot, killed mid-segment and
started again, and a restore to the newest point gets every committed row."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time

import pytest

from helpers import archived_to, pgdr, restored_to_latest, start_streamer, wait_for, write_config
from pgdr.sandbox import SandboxCluster, free_port
from test_backup_restore import restore_and_start, storage_of


_n = itertools.count()


def wait_archived(config, pg):
    """Until the archive (segments or partial) holds the server's WAL up to now."""
    lsn = pg.psql("select pg_current_wal_lsn()")
    wait_for(lambda: archived_to(config, lsn), f"WAL up to {lsn} archived", timeout=60)


def all_rows(c):
    return c.psql("select count(*) || ':' || coalesce(sum(id), 0) from stream_rows", dbname="postgres")


@pytest.fixture(params=[15, 18], ids=["pg15", "pg18-encrypted"])
def streamed(request, workdir, monkeypatch):
    """PostgreSQL 15 into a plain repository; 18 into an encrypted one (streamed segments and the
    partial segment both sealed; every command below finds the keyring in its environment)."""
    from conftest import _bins
    from pgdr.crypto import generate_key

    name = f"stream{request.param}-{next(_n)}"
    pg = SandboxCluster(_bins(request.param), workdir / name / "data", free_port()).init().start()
    repo = {"url": f"file://{workdir}/{name}-repo"}
    if request.param == 18:
        repo["encryption"] = True
        monkeypatch.setenv("PGDR_KEYRING", generate_key("stream"))
    config = write_config(workdir / f"{name}.yaml", {"app": {"dsn": pg.dsn, "repository": repo}})
    yield pg, config, workdir / f"{name}-spool"
    pg.destroy()


def test_kill_restart_no_gap_and_latest_restore_has_every_row(streamed, workdir):
    pg, config, spool = streamed
    logs = [spool.with_name(f"{spool.name}-{i}.log") for i in range(3)]
    pg.psql("create table stream_rows (id int primary key, batch text)")
    streamer = start_streamer(config, spool, logs[0])
    try:
        time.sleep(1.5)  # slot created, streaming
        code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config)
        assert code == 0, err
        pg.psql("insert into stream_rows select g, 'A' from generate_series(1, 1000) g")
        pg.psql("select pg_switch_wal()")
        pg.psql("insert into stream_rows select g, 'B' from generate_series(1001, 2000) g")  # mid-segment
        wait_archived(config, pg)
        os.kill(streamer.pid, signal.SIGKILL)  # no goodbye: the slot still holds what was not archived
        streamer.wait(10)

        pg.psql("insert into stream_rows select g, 'C' from generate_series(2001, 3000) g")  # while down
        pg.psql("select pg_switch_wal()")
        pg.psql("insert into stream_rows select g, 'D' from generate_series(3001, 4000) g")

        # Resumes from the slot (the spool argument is ignored).
        streamer = start_streamer(config, spool, logs[1])
        wait_archived(config, pg)
        streamer.send_signal(signal.SIGTERM)
        out, _ = streamer.communicate(timeout=60)
        assert streamer.returncode == 0, logs[1].read_text()[-2000:]
        result = json.loads(out)
        assert result["stopped_because"] == "stopped" and result["lag_bytes"] is not None

        # Another worker starts from the slot: nothing lost, nothing archived twice.
        again = start_streamer(config, spool.with_name(spool.name + "-new"), logs[2], "--duration", "3")
        again.communicate(timeout=60)
        assert again.returncode == 0, logs[2].read_text()[-2000:]
    finally:
        if streamer.poll() is None:
            streamer.kill()

    expected = all_rows(pg)
    assert expected == f"4000:{sum(range(1, 4001))}"
    dups = [o.key for o in storage_of(config).list("app/wal/") if ".partial" not in o.key]
    assert len(dups) == len({k.rsplit("/", 1)[-1][:24] for k in dups}), "a segment was archived twice"
    if "encryption" in config.read_text():  # streamed segments and partials are sealed too
        wal = [o.key for o in storage_of(config).list("app/wal/0")]
        assert wal and all(k.endswith(".enc") or k.endswith(".partial.json") for k in wal), wal

    with restored_to_latest(config, workdir, pg) as (restored, res):  # no gap, and a restore to its end
        assert res["recovery"]["state"] == "promoted"
        assert all_rows(restored) == expected  # every committed row, the mid-segment ones included

    # A hole in the archive: found by wal-check and refused by restore, before anything is written.
    storage = storage_of(config)
    segments = sorted(o.key for o in storage.list("app/wal/00000001/") if ".partial" not in o.key)
    victim = next(k for k in segments if k.rsplit("/", 1)[-1][:24] > backup_segment(backup))
    storage.delete(victim)
    code, report, _ = pgdr("--json", "wal-check", "--cluster", "app", config=config)
    assert code == 1 and report["gaps"][0]["missing_from"] == victim.rsplit("/", 1)[-1][:24]
    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", workdir / "gap", "--target", "latest",
                        config=config)
    assert code == 1 and "gap" in out["message"] and victim.rsplit("/", 1)[-1][:24] in out["message"]
    assert not (workdir / "gap").exists()


def backup_segment(backup) -> str:
    from pgdr.lsn import parse_lsn
    from pgdr.wal import segment_name, segment_of

    return segment_name(backup["timeline"], segment_of(parse_lsn(backup["stop_lsn"])))


def test_backup_taking_its_wal_from_the_archive(streamed, workdir):
    pg, config, spool = streamed
    cfg = json.loads(json.dumps(__import__("yaml").safe_load(config.read_text())))
    cfg["clusters"]["app"]["backup_wal"] = "archive"
    config = write_config(config.with_name(config.stem + "-archive.yaml"), cfg["clusters"])
    pg.psql("create table kept (id int)")
    pg.psql("insert into kept select generate_series(1, 500)")

    # The slot exists (capture ran once), but nothing captures WAL now: the backup waits, not restorable.
    first = start_streamer(config, spool, spool.with_name(f"{spool.name}-1.log"), "--duration", "1")
    assert first.wait(60) == 0
    code, out, err = pgdr("--json", "backup", "--cluster", "app", "--label", "20261125-120000F",
                          "--wal-timeout", "3", config=config)
    assert code == 1 and "did not reach the archive" in out["message"]
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)
    assert [b["status"] for b in listing["backups"]] == ["waiting_for_wal"]
    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--backup", "20261125-120000F",
                        "--pgdata", workdir / "never", config=config)
    assert code == 1 and "waiting_for_wal" in out["message"]

    # WAL capture resumes from the slot; the retry of the same run finds its backup and completes it.
    streamer = start_streamer(config, spool, spool.with_name(f"{spool.name}-2.log"))
    try:
        time.sleep(1.5)
        code, backup, err = pgdr("--json", "backup", "--cluster", "app", "--label", "20261125-120000F", config=config)
        assert code == 0 and backup["status"] == "ok", err
    finally:
        streamer.send_signal(signal.SIGTERM)
        streamer.communicate(timeout=60)
    code, info, _ = pgdr("--json", "info", "--cluster", "app", "--backup", "20261125-120000F", config=config)
    assert info["wal_included"] is False and info["status"] == "ok"
    before = pg.table_hashes(["postgres"])
    restored, res = restore_and_start(config, workdir, pg, "20261125-120000F")
    try:
        assert res["recovery"]["state"] == "promoted" and "WAL comes from the archive" in res["pg_verifybackup"]
        assert restored.table_hashes(["postgres"]) == before
    finally:
        restored.destroy()
