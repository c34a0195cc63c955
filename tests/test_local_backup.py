"""``backup_method: local``: full backups read from the data directory by pgdr itself (as pgBackRest does),
between pg_backup_start and pg_backup_stop, against real PostgreSQL 18 and 15 servers.

What must hold: the files are exactly the ones pg_basebackup would send (same exclusions, same manifest
entries), PostgreSQL's own pg_verifybackup accepts the result with checksums, a backup taken while
transactions commit restores to a consistent state that holds everything committed before it began, an
incremental (pg_basebackup --incremental) builds on such a full, and a data directory that is not the
connected server's (a standby's copy of the same cluster) is never read.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import pgdr, server_setting, write_config
from pgdr.localcopy import NotLocal, prove_local, tar_header
from pgdr.sandbox import SandboxCluster, free_port
from pgdr.tarstream import TarWatcher
from test_backup_restore import socket_dir

_n = itertools.count()
DBS = ("app", "postgres")


def _seed(pg) -> None:
    pg.psql("create database app")
    pg.psql("create table accounts (id int primary key, balance int not null, filler text)", dbname="app")
    pg.psql("insert into accounts select g, 0, repeat('x', 200) from generate_series(1, 200000) g", dbname="app")
    pg.psql("create table ledger (id bigserial primary key, moved int not null)", dbname="app")
    pg.psql("create unlogged table scratch (id int primary key, v text)", dbname="app")
    pg.psql("insert into scratch select g, 'u' from generate_series(1, 5000) g", dbname="app")
    pg.psql("select pg_create_physical_replication_slot('keeper', true)")
    pg.psql("checkpoint")


@pytest.fixture(scope="module")
def src(workdir):
    """A PostgreSQL 18 server of its own (summarize_wal = on), some data, an unlogged table, a replication slot
    and a file in pgsql_tmp; a config for it with backup_method local (cluster app) and pg_basebackup (ref)."""
    from conftest import _bins

    tag = "local18"
    pg = SandboxCluster(_bins(18), workdir / tag / "data", free_port())
    pg.init(extra_conf="summarize_wal = on\n").start()
    _seed(pg)
    tmp = pg.datadir / "base" / "pgsql_tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / "pgsql_tmp999.0").write_bytes(b"t" * 10000)
    repo = f"file://{workdir / tag / 'repo'}"
    config = write_config(workdir / f"{tag}.yaml", {
        "app": {"dsn": pg.dsn, "repository": repo, "backup_method": "local"},
        "ref": {"dsn": pg.dsn, "repository": repo}})
    yield {"pg": pg, "config": config, "repo": Path(repo.removeprefix("file://"))}
    pg.destroy()


def _restore(config, workdir, bins, label, *args, start=True):
    dest = workdir / f"local-restore-{next(_n)}"
    port = free_port()
    extra = ["--start", "--port", port, "--socket-dir", socket_dir(workdir)] if start else []
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--backup", label, "--pgdata", dest, *extra, *args,
                          config=config)
    assert code == 0, err
    return out, SandboxCluster(bins, dest, port), dest


def _manifest(repo: Path, cluster: str, label: str) -> dict:
    return json.loads((repo / cluster / "backup" / label / "backup_manifest").read_bytes())


def _relfilenode(pg, table: str) -> str:
    return pg.psql(f"select pg_relation_filepath('{table}')", dbname="app")


def test_local_full_holds_what_pg_basebackup_holds_and_restores_to_the_source(src, workdir):
    pg, config = src["pg"], src["config"]
    code, local, err = pgdr("--json", "backup", "--cluster", "app", "--type", "full", config=config)
    assert code == 0, err
    assert "reading the data directory" in err and "streaming pg_basebackup" not in err
    code, ref, err = pgdr("--json", "backup", "--cluster", "ref", "--type", "full", config=config)
    assert code == 0, err
    mine, theirs = _manifest(src["repo"], "app", local["label"]), _manifest(src["repo"], "ref", ref["label"])
    # The same files, the same manifest layout (pg_basebackup adds an empty tablespace_map; pgdr leaves it out
    # as a backup without tablespaces needs none).
    # Each marks its own embedded WAL archived: the segments differ, their number does not.
    def files(m):
        return sorted(("pg_wal/archive_status/*.done" if f["Path"].endswith(".done") else f["Path"])
                      for f in m["Files"])
    assert files(mine) == [p for p in files(theirs) if p != "tablespace_map"]
    # Counted by the copy as it writes its tar, by a parser of pg_basebackup's: the same members but one.
    assert local["pg_file_count"] == ref["pg_file_count"] - 1
    assert mine["PostgreSQL-Backup-Manifest-Version"] == theirs["PostgreSQL-Backup-Manifest-Version"] == 2
    assert mine["System-Identifier"] == theirs["System-Identifier"]
    assert {f["Checksum-Algorithm"] for f in mine["Files"]} == {"CRC32C"}
    scratch = _relfilenode(pg, "scratch")
    paths = {f["Path"] for f in mine["Files"]}
    assert f"{scratch}_init" in paths and scratch not in paths  # unlogged: only the init fork
    assert not any(p.startswith("pg_replslot/") or "pgsql_tmp" in p or p.endswith("pg_internal.init")
                   or p in ("postmaster.pid", "postmaster.opts") for p in paths)
    # The embedded WAL is marked archived (a server started from the backup must not archive it again).
    done = sorted(p for p in paths if p.startswith("pg_wal/"))
    assert done and all(p.startswith("pg_wal/archive_status/") and p.endswith(".done") for p in done)
    assert mine["WAL-Ranges"][0]["Start-LSN"] == local["start_lsn"]
    expected = pg.table_hashes(DBS)

    # Unpacked, before PostgreSQL touches it: what the tar held.
    out, _, dest = _restore(config, workdir, pg.bins, local["label"], "--verify-checksums", start=False)
    assert out["pg_verifybackup"] == "ok (files, sizes, checksums, WAL)"
    assert (dest / "pg_replslot").is_dir() and not any((dest / "pg_replslot").iterdir())
    assert not (dest / "base" / "pgsql_tmp").exists() and not (dest / "postmaster.pid").exists()
    assert (dest / "pg_wal" / "summaries").is_dir() and (dest / "pg_wal" / "archive_status").is_dir()
    wal = sorted(p.name for p in (dest / "pg_wal").iterdir() if p.is_file())
    assert wal and all(len(n) == 24 for n in wal)  # the backup's own WAL, embedded, nothing else
    assert sorted(p.name for p in (dest / "pg_wal" / "archive_status").iterdir()) == [f"{n}.done" for n in wal]
    label_text = (dest / "backup_label").read_text()
    assert f"START WAL LOCATION: {local['start_lsn']} " in label_text and "LABEL: pgdr " in label_text
    assert not (dest / scratch).exists() and (dest / f"{scratch}_init").exists()

    out, restored, _ = _restore(config, workdir, pg.bins, local["label"])
    try:
        got = restored.table_hashes(DBS)
        assert {k: v for k, v in got.items() if "scratch" not in k} == \
               {k: v for k, v in expected.items() if "scratch" not in k}
        assert restored.psql("select count(*) from scratch", dbname="app") == "0"  # reset from its init fork
    finally:
        restored.destroy()


def test_backup_taken_while_transactions_commit_restores_consistent(src, workdir):
    """Transfers between accounts (the sum stays 0) and a ledger row each, one transaction after another, and
    checkpoints, all through the backup: the restored cluster's sum is 0 and its ledger is 1..M, M at least
    what was committed when the backup began."""
    import psycopg

    pg, config = src["pg"], src["config"]
    stop, counts, errors = threading.Event(), [], []

    def writer():
        try:
            with psycopg.connect(pg.dsn.replace("dbname=postgres", "dbname=app"), autocommit=True) as c:
                i = 0
                while not stop.is_set():
                    i += 1
                    with c.transaction():
                        c.execute("update accounts set balance = balance - 1 where id = %s", (i * 7919 % 200000 + 1,))
                        c.execute("update accounts set balance = balance + 1 where id = %s", (i * 104729 % 200000 + 1,))
                        c.execute("insert into ledger (moved) values (1)")
                    counts.append(i)
        except Exception as e:  # reported by the test
            errors.append(e)

    def checkpointer():
        # Checkpoints during the copy: recovery must start from the backup's own (backup_label), not from
        # whichever later one pg_control holds, or pages copied before it miss what changed since the start.
        try:
            with psycopg.connect(pg.dsn, autocommit=True) as c:
                while not stop.is_set():
                    c.execute("checkpoint")
                    time.sleep(0.02)
        except Exception as e:  # reported by the test
            errors.append(e)

    t, cp = threading.Thread(target=writer), threading.Thread(target=checkpointer)
    t.start()
    cp.start()
    try:
        time.sleep(0.5)
        committed_before = len(counts)
        code, local, err = pgdr("--json", "backup", "--cluster", "app", "--type", "full", config=config)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
        cp.join()
    assert not errors, errors
    assert code == 0, err
    assert len(counts) > committed_before + 10  # the writer kept committing through the backup
    out, restored, _ = _restore(config, workdir, pg.bins, local["label"])
    try:
        assert restored.psql("select sum(balance), count(*) from accounts", dbname="app") == "0|200000"
        n, lo, hi = map(int, restored.psql("select count(*), coalesce(min(id), 0), coalesce(max(id), 0) from ledger",
                                           dbname="app").split("|"))
        assert n >= committed_before and (lo, hi) == ((1 if n else 0), n), (n, lo, hi, committed_before)
        # Every index entry points at a row and every row is indexed: no torn page survived recovery.
        assert restored.psql("set enable_seqscan = off; set enable_bitmapscan = off; "
                             "select count(*) from (select id from accounts order by id) s", dbname="app") == "200000"
    finally:
        restored.destroy()


def test_incremental_builds_on_a_local_full_and_the_chain_restores(src, workdir):
    pg, config = src["pg"], src["config"]
    code, full, err = pgdr("--json", "backup", "--cluster", "app", "--type", "full", config=config)
    assert code == 0, err
    pg.psql("update accounts set filler = 'changed' where id % 100 = 1", dbname="app")
    pg.psql("create table after_full as select g from generate_series(1, 1000) g", dbname="app")
    pg.psql("checkpoint")
    deadline = time.monotonic() + 60
    while pg.psql("select summarized_lsn >= (select redo_lsn from pg_control_checkpoint()) "
                  "from pg_get_wal_summarizer_state()") != "t" and time.monotonic() < deadline:
        time.sleep(0.1)
    code, incr, err = pgdr("--json", "backup", "--cluster", "app", "--type", "incr", config=config)
    assert code == 0, err
    assert incr["type"] == "incr" and incr["parent"] == full["label"], incr
    assert "goes through pg_basebackup" in err
    assert incr["stored_size"] < full["stored_size"] / 3
    expected = pg.table_hashes(DBS)
    out, restored, _ = _restore(config, workdir, pg.bins, incr["label"])
    try:
        assert out["chain"] == [full["label"], incr["label"]]
        got = restored.table_hashes(DBS)
        assert {k: v for k, v in got.items() if "scratch" not in k} == \
               {k: v for k, v in expected.items() if "scratch" not in k}
    finally:
        restored.destroy()


def test_a_copy_of_the_cluster_is_never_read_as_the_primary(src, workdir):
    """A copy of the data directory holds the same system identifier, and even a postmaster.pid naming the
    primary's postmaster and port (as a standby's on another host, in a pod with the same small PIDs, can):
    still refused, since a temporary table the primary creates never appears in it. A standby's own backup
    goes through pg_basebackup."""
    import psycopg

    pg, config = src["pg"], src["config"]
    copy = workdir / "local18-copy"
    (copy / "global").mkdir(parents=True)
    shutil.copy2(pg.datadir / "global" / "pg_control", copy / "global")
    shutil.copy2(pg.datadir / "postmaster.pid", copy)
    for d in (pg.datadir / "base").iterdir():
        (copy / "base" / d.name).mkdir(parents=True, exist_ok=True)
    assert (copy / "postmaster.pid").read_text() == (pg.datadir / "postmaster.pid").read_text()
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        ident = c.execute("select system_identifier::text from pg_control_system()").fetchone()[0]
        prove_local(c, pg.datadir, ident)  # the primary's own directory: proven
        with pytest.raises(NotLocal, match="did not appear there"):
            prove_local(c, copy, ident)
        with pytest.raises(NotLocal, match="holds system"):
            prove_local(c, pg.datadir, "12345")
        # The probe leaves nothing behind, here or in the copy.
        assert c.execute("select count(*) from pg_class where relname like 'pgdr_probe%'").fetchone()[0] == 0
    assert not [p for p in (copy / "base").rglob("t*_*")]

    standby = SandboxCluster(pg.bins, workdir / "local18-standby" / "data", free_port())
    standby.datadir.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([pg.bins.tool("pg_basebackup"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                    "-D", str(standby.datadir), "-R", "-X", "stream", "-c", "fast"], check=True, capture_output=True)
    subprocess.run(["chown", "-R", "postgres:postgres", str(standby.datadir)], check=True)
    standby.datadir.chmod(0o700)
    with open(standby.datadir / "postgresql.conf", "a") as f:
        f.write(f"\nport = {standby.port}\nunix_socket_directories = '{standby.socket_dir}'\n")
    standby.start()
    try:
        sconfig = write_config(workdir / "local18-standby.yaml", {"app": {
            "dsn": standby.dsn, "repository": f"file://{workdir / 'local18-standby' / 'repo'}",
            "backup_method": "local", "backup_wal": "embed"}})
        code, out, err = pgdr("--json", "backup", "--cluster", "app", "--type", "full", config=sconfig)
        assert code == 0, err
        assert "the server is a standby" in err and "streaming pg_basebackup" in err
        for cfg, words in ((sconfig, "the server is a standby"), (config, f"reads {pg.datadir}, proven")):
            code, report, err = pgdr("--json", "check", "--cluster", "app", config=cfg)
            item = [c for c in report["checks"] if c["name"] == "local_read"]
            assert item and item[0]["ok"] and words in item[0]["detail"], (report, err)
    finally:
        standby.destroy()


def test_idle_session_timeout_does_not_end_the_backup(src, workdir):
    """The backup's session waits while the files are read: a server's idle_session_timeout must not end it
    (the backup would fail at pg_backup_stop, after the whole copy)."""
    pg, config = src["pg"], src["config"]
    with server_setting(pg, "idle_session_timeout", "50ms"):
        code, local, err = pgdr("--json", "backup", "--cluster", "app", "--type", "full", config=config)
    assert code == 0, err
    assert local["status"] == "ok"


def test_role_defaults_do_not_defeat_the_proof(src, workdir):
    """A backup role hardened with read-only transactions by default, or with temp_tablespaces set, is still
    proven local: the backup's session sets both back for itself."""
    pg, config = src["pg"], src["config"]
    pg.psql("alter role postgres set default_transaction_read_only = on")
    try:
        code, local, err = pgdr("--json", "backup", "--cluster", "app", "--type", "full", config=config)
    finally:
        pg.psql("begin; set transaction read write; alter role postgres reset default_transaction_read_only; commit")
    assert code == 0, err
    assert local["status"] == "ok"


def test_an_unreadable_directory_is_named_by_check_and_backup(src, workdir):
    """pgdr run as the server's user, a root-only directory in the data directory (lost+found): check names it,
    and the backup fails naming it, not the repository."""
    pg = src["pg"]
    repo = workdir / "local18-asuser-repo"
    repo.mkdir()
    shutil.chown(repo, "postgres", "postgres")
    config = write_config(workdir / "local18-asuser.yaml", {"app": {
        "dsn": pg.dsn, "repository": f"file://{repo}", "backup_method": "local"}})
    config.chmod(0o644)
    lost = pg.datadir / "lost+found"
    lost.mkdir(mode=0o700)
    try:
        def as_postgres(*args):
            proc = subprocess.run(["runuser", "-u", "postgres", "--", sys.executable, "-m", "pgdr", "--config",
                                   str(config), "--json", *args], capture_output=True, text=True, cwd="/")
            return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None, proc.stderr

        code, report, err = as_postgres("check", "--cluster", "app")
        assert report, err
        item = [c for c in report["checks"] if c["name"] == "local_read"][0]
        assert not item["ok"] and str(lost) in item["detail"], item
        code, out, err = as_postgres("backup", "--cluster", "app", "--type", "full")
        assert code != 0 and f"cannot read {lost}: Permission denied" in err, err
        assert "cannot write" not in err
        assert not list(repo.rglob("backup_manifest*"))
    finally:
        lost.rmdir()


def test_local_full_on_postgresql_15(pg15, workdir):
    """PostgreSQL 15 (backup manifest version 1) and backup_wal: archive-less embed: restores to the source."""
    config = write_config(workdir / "local15.yaml", {"app": {
        "dsn": pg15.dsn, "repository": f"file://{workdir / 'local15-repo'}", "backup_method": "local"}})
    expected = pg15.table_hashes(("app", "billing", "postgres"))
    code, local, err = pgdr("--json", "backup", "--cluster", "app", "--type", "full", config=config)
    assert code == 0, err
    assert "reading the data directory" in err
    m = _manifest(workdir / "local15-repo", "app", local["label"])
    assert m["PostgreSQL-Backup-Manifest-Version"] == 1 and "System-Identifier" not in m
    out, restored, _ = _restore(config, workdir, pg15.bins, local["label"])
    try:
        assert out["pg_verifybackup"].startswith("ok")
        assert restored.table_hashes(("app", "billing", "postgres")) == expected
    finally:
        restored.destroy()


def test_bad_backup_method_is_a_config_error(workdir):
    config = write_config(workdir / "local-bad.yaml", {"app": {
        "dsn": "host=127.0.0.1 port=1", "repository": f"file://{workdir / 'local-bad-repo'}",
        "backup_method": "rsync"}})
    code, _, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 2 and "backup_method" in err and "'local'" in err


def test_crc32c_only_from_the_compiled_library(monkeypatch):
    """google_crc32c's pure-Python fallback does 3 MB/s (days per terabyte): the manifest then uses SHA256."""
    import google_crc32c

    from pgdr.localcopy import FileChecksum

    c = FileChecksum()
    c.update(b"123456789")
    assert (c.algorithm, c.hexdigest()) == ("CRC32C", "839206e3")  # 0xE3069283, least significant byte first
    monkeypatch.setattr(google_crc32c, "implementation", "python")
    c = FileChecksum()
    c.update(b"123456789")
    assert c.algorithm == "SHA256" and len(c.hexdigest()) == 64


def test_tar_header_long_names_and_large_sizes_read_back():
    """Names past 100 bytes (a GNU long-name record) and sizes past 8 GiB (base-256) read back as written."""
    import io
    import tarfile

    name = "base/16384/" + "n" * 150
    stream = tar_header(name, 3, 0o600, 1_700_000_000, b"0") + b"abc" + b"\0" * 509
    stream += tar_header("big", 9 << 30, 0o600, 0, b"0")[:512]
    seen = []

    class Names(TarWatcher):
        def member(self, n, kind, size, mode, linkname):
            seen.append((n, size, mode))

    Names().feed(stream)
    assert seen == [(name, 3, 0o600), ("big", 9 << 30, 0o600)]
    member = tarfile.open(fileobj=io.BytesIO(stream[:-512] + b"\0" * 1024)).getmembers()[0]
    assert (member.name, member.size) == (name, 3)


def test_a_backup_manifest_of_any_size_is_kept_and_its_wal_ranges_read():
    """A cluster of hundreds of thousands of files has a backup_manifest of tens of MB: the watcher spools it
    whole (before, nothing past 64 MiB was kept, and such a backup failed saying PostgreSQL 13 was required),
    and its WAL-Ranges are read from its end without parsing the rest."""
    import hashlib

    from pgdr.backup import wal_ranges
    from pgdr.errors import IntegrityError

    files = b",\n".join(b'{ "Path": "base/16384/%d", "Size": 8192, "Last-Modified": "2026-12-04 13:48:00 GMT", '
                        b'"Checksum-Algorithm": "CRC32C", "Checksum": "0badf00d" }' % i for i in range(600_000))
    body = (b'{ "PostgreSQL-Backup-Manifest-Version": 2,\n"System-Identifier": 1,\n"Files": [\n' + files +
            b'\n],\n"WAL-Ranges": [\n{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }\n],\n'
            b'"Manifest-Checksum": "00"}\n')
    assert len(body) > 64 << 20
    stream = tar_header("backup_manifest", len(body), 0o600, 0, b"0") + body + b"\0" * (-len(body) % 512 + 1024)
    watcher = TarWatcher()
    for i in range(0, len(stream), 1 << 20):
        watcher.feed(stream[i:i + (1 << 20)])
    spooled = watcher.spooled["backup_manifest"]
    assert hashlib.sha256(spooled.read()).digest() == hashlib.sha256(body).digest()
    assert wal_ranges(spooled) == [{"Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100"}]
    watcher.close()
    import io

    with pytest.raises(IntegrityError, match="unreadable backup_manifest"):
        wal_ranges(io.BytesIO(body.replace(b'"WAL-Ranges"', b'"Other"')))


def test_embedded_wal_segments_are_checked(tmp_path):
    """A segment whose first page carries its own address and the system's identifier is embedded, whatever
    its later pages hold (after a WAL switch the rest of a segment is zeros, without page headers); one
    beginning with another address (a recycled file), another system's, a short file, one removed, and one
    renamed away while read (recycled) are refused."""
    import os
    import sys

    from pgdr import localcopy
    from pgdr.errors import PgdrError
    from pgdr.localcopy import LocalCopy
    from pgdr.postgres import ServerInfo

    seg, page, address, ident = 16 << 20, 8192, 5 * (16 << 20), 7715444862237826023
    info = ServerInfo(180000, "18.0", str(ident), 1, "replica", 10, True, [], [])
    copy = LocalCopy(None, info, "app", "20261204-000000F", "fast", True)
    copy.datadir = tmp_path
    (tmp_path / "pg_wal").mkdir()
    name = "000000010000000000000005"

    def segment(first_address=address, switched_at=None, system=ident, size=seg):
        data = bytearray(size)
        for offset in range(0, size if switched_at is None else switched_at, page):
            data[offset + 8:offset + 16] = (first_address + offset).to_bytes(8, sys.byteorder)
        data[24:32] = system.to_bytes(8, sys.byteorder)
        (tmp_path / "pg_wal" / name).write_bytes(bytes(data))

    fd = os.open(tmp_path / "pg_wal", os.O_RDONLY | os.O_DIRECTORY)
    try:
        segment()
        assert len(copy._segment(fd, name, address)) == seg
        segment(switched_at=50 * page)  # switched at page 50: the rest is zeros
        assert len(copy._segment(fd, name, address)) == seg
        segment(first_address=address - 3 * seg)
        with pytest.raises(PgdrError, match="does not begin with its own address"):
            copy._segment(fd, name, address)
        segment(system=12345)
        with pytest.raises(PgdrError, match="belongs to another system"):
            copy._segment(fd, name, address)
        segment(size=seg - page)
        with pytest.raises(PgdrError, match="bytes, not"):
            copy._segment(fd, name, address)
        with pytest.raises(PgdrError, match="was removed before the backup could copy it"):
            copy._segment(fd, "000000010000000000000006", address + seg)
        segment()
        real_read = os.read

        def read_then_recycle(f, n):  # the server renames the segment ahead while pgdr reads it
            data = real_read(f, n)
            if (tmp_path / "pg_wal" / name).exists():
                os.rename(tmp_path / "pg_wal" / name, tmp_path / "pg_wal" / "000000010000000000000009")
            return data

        localcopy.os.read = read_then_recycle
        try:
            with pytest.raises(PgdrError, match="was removed or recycled while it was read"):
                copy._segment(fd, name, address)
        finally:
            localcopy.os.read = real_read
    finally:
        os.close(fd)


def _drain_to_directory(chunks, dest: Path) -> None:
    """A local copy's tar stream, unpacked into ``dest`` as pg_basebackup -Fp would leave it."""
    import io
    import tarfile

    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:") as tar:
        tar.extractall(dest)  # pgdr's own stream, just written


def test_links_and_special_files_in_the_data_directory(src, workdir):
    """A symbolic link or a FIFO where PostgreSQL keeps relations (base/, global/) fails the backup, naming it:
    pg_basebackup would skip it with a warning and the backup would lack what it holds. Elsewhere (a FIFO
    beside postgresql.conf) it is skipped with a warning, as pg_basebackup skips it, and the backup is taken."""
    import os

    pg, config = src["pg"], src["config"]
    outside = workdir / "local18-elsewhere"
    outside.mkdir(exist_ok=True)
    db = next(p for p in (pg.datadir / "base").iterdir() if p.name.isdigit())
    for made in (db / "99999", pg.datadir / "global" / "99999"):
        made.symlink_to(outside)
        try:
            code, out, err = pgdr("--json", "backup", "--cluster", "app", "--type", "full", config=config)
        finally:
            made.unlink()
        assert code != 0 and "is a symbolic link or a special file where PostgreSQL keeps relations" in err, err
        assert str(made) in err
    fifo = pg.datadir / "pgdr-test-fifo"
    os.mkfifo(fifo)
    try:
        code, out, err = pgdr("--json", "backup", "--cluster", "app", "--type", "full", config=config)
    finally:
        fifo.unlink()
    assert code == 0, err
    assert "skipping pgdr-test-fifo in the data directory: not a file or a directory" in err
    assert "pgdr-test-fifo" not in {f["Path"] for f in _manifest(src["repo"], "app", out["label"])["Files"]}


def test_a_long_copy_keeps_its_start_segment(workdir, caplog, monkeypatch):
    """A copy paused just after pg_backup_start while the server writes and checkpoints far past max_wal_size:
    the backup's temporary replication slot keeps the start segment, so the embedded WAL runs from start to
    stop (pg_verifybackup parses it with pg_waldump), and the slot is gone once the backup ends. A role
    without REPLICATION gets no slot: the backup still runs, and says it is unprotected."""
    from conftest import _bins
    from pgdr.check import _local_read_check
    from pgdr.config import load_config
    from pgdr.localcopy import LocalCopy
    from pgdr.postgres import ConnInfo, server_info

    pg = SandboxCluster(_bins(18), workdir / "slot18" / "data", free_port())
    pg.init(extra_conf="min_wal_size = 32MB\nmax_wal_size = 32MB\nwal_keep_size = 0\n").start()
    try:
        pg.psql("create table churn (v text)")
        conn = ConnInfo(pg.dsn)
        copy = LocalCopy.open(conn, server_info(conn), "app", "20261204-000000F", "fast", True)
        chunks = copy.chunks()
        first = next(chunks)  # pg_backup_start has run
        start_segment = pg.psql("select pg_walfile_name(redo_lsn) from pg_control_checkpoint()")
        for _ in range(8):
            pg.psql("insert into churn select repeat('w', 1000) from generate_series(1, 5000)")
            pg.psql("select pg_switch_wal()")
            pg.psql("checkpoint")
        assert (pg.datadir / "pg_wal" / start_segment).exists()
        # And between pg_backup_stop and reading the WAL: the slot lives as long as the session, which ends
        # only once the WAL is read.
        real_wal = LocalCopy._wal

        def churn_then_read(self, *args):
            for _ in range(4):
                pg.psql("insert into churn select repeat('w', 1000) from generate_series(1, 5000)")
                pg.psql("select pg_switch_wal()")
                pg.psql("checkpoint")
            assert (pg.datadir / "pg_wal" / start_segment).exists()
            return real_wal(self, *args)

        monkeypatch.setattr(LocalCopy, "_wal", churn_then_read)
        dest = workdir / "slot18-backup"
        _drain_to_directory(itertools.chain([first], chunks), dest)
        assert (dest / "pg_wal" / start_segment).exists()
        assert pg.psql("select count(*) from pg_replication_slots") == "0"
        run = subprocess.run([pg.bins.tool("pg_verifybackup"), str(dest)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        monkeypatch.undo()

        pg.psql("create role bk login")
        pg.psql("grant pg_read_all_settings to bk")
        pg.psql("grant execute on function pg_backup_start(text, boolean), pg_backup_stop(boolean), "
                "pg_control_system() to bk")
        bk = ConnInfo(pg.dsn.replace("user=postgres", "user=bk"))
        cluster = load_config(write_config(workdir / "slot18.yaml", {"app": {
            "dsn": pg.dsn, "repository": f"file://{workdir / 'slot18-repo'}", "backup_method": "local"}})).cluster("app")
        name, ok, detail = _local_read_check(cluster, conn, server_info(conn))
        assert ok and "a temporary replication slot holds each backup's WAL" in detail, detail
        name, ok, detail = _local_read_check(cluster, bk, server_info(bk))
        assert ok and "this role lacks REPLICATION" in detail, detail
        pg.psql("select count(*) from (select pg_create_physical_replication_slot('fill' || g) "
                "from generate_series(1, current_setting('max_replication_slots')::int) g) s")
        try:
            name, ok, detail = _local_read_check(cluster, conn, server_info(conn))
            assert ok and "every replication slot (max_replication_slots) is taken" in detail, detail
        finally:
            pg.psql("select count(pg_drop_replication_slot(slot_name)) from pg_replication_slots")
        caplog.clear()
        with caplog.at_level("WARNING", logger="pgdr.localcopy"):
            chunks = LocalCopy.open(bk, server_info(bk), "app", "20261204-000001F", "fast", True).chunks()
            _drain_to_directory(chunks, workdir / "slot18-backup-bk")
        assert "cannot hold the backup's WAL with a temporary replication slot" in caplog.text
        assert "permission denied" in caplog.text.lower() or "replication" in caplog.text.lower()
        run = subprocess.run([pg.bins.tool("pg_verifybackup"), str(workdir / "slot18-backup-bk")],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    finally:
        pg.destroy()


def test_the_directory_proven_is_the_directory_read(workdir, monkeypatch):
    """The server runs from a path through a symbolic link. Right after the proof on the backup's session, the
    link is swapped for one to a copy of the data directory (holding a marker file): what is read is still
    the server's own directory, opened once before the proof, never the copy the path now names."""
    import io
    import os
    import tarfile

    from conftest import _bins
    from pgdr import localcopy
    from pgdr.localcopy import LocalCopy
    from pgdr.postgres import ConnInfo, server_info

    base = workdir / "swap18"
    real = SandboxCluster(_bins(18), base / "real", free_port()).init()
    link = base / "data"
    link.symlink_to(real.datadir)
    pg = SandboxCluster(real.bins, link, real.port).start()
    try:
        assert pg.psql("show data_directory") == str(link)
        copy = base / "copy"
        shutil.copytree(real.datadir, copy, symlinks=True, ignore=shutil.ignore_patterns("postmaster.pid"))
        (copy / "SWAPPED").write_text("the copy, not the server's directory")
        conn = ConnInfo(pg.dsn)
        local = LocalCopy.open(conn, server_info(conn), "app", "20261204-000002F", "fast", False)
        proven = []
        real_prove = localcopy.prove_local

        def prove_then_swap(c, datadir, ident, *args):
            real_prove(c, datadir, ident, *args)
            if local.files == 0 and not proven:  # the backup session's proof: swap the path right after it
                proven.append(datadir)
                (base / "data.new").symlink_to(copy)
                os.replace(base / "data.new", link)

        monkeypatch.setattr(localcopy, "prove_local", prove_then_swap)
        stream = b"".join(local.chunks())
        assert proven and os.readlink(link) == str(copy)
        with tarfile.open(fileobj=io.BytesIO(stream), mode="r:") as tar:
            names = set(tar.getnames())
        assert "SWAPPED" not in names and "global/pg_control" in names and "PG_VERSION" in names
        assert local.members == len(names) and local.watcher.members == len(names)
        manifest = local.watcher.spooled["backup_manifest"]
        assert json.loads(manifest.read())["Files"] and "backup_manifest" in names
        local.watcher.close()
    finally:
        if link.is_symlink():
            link.unlink()
            link.symlink_to(real.datadir)
        pg.destroy()
        real.destroy()
