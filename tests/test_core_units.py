"""The core's pure pieces: config validation, codecs, the tar watcher, labels, the lock."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from datetime import datetime, timedelta, timezone

import pytest

from helpers import ROOT, incremental_file, pgdr
from pgdr import lock as lockmod
from pgdr.compression import compress_stream, decompress_stream
from pgdr.config import RepositoryConfig, load_config, parse_config
from pgdr.errors import ConfigError, IntegrityError, LockedError, UsageError
from pgdr.labels import check_label, make_label
from pgdr.lock import ClusterLock
from pgdr.storage import open_storage
from pgdr.tarstream import TarWatcher


def test_core_imports_no_airflow():
    code = ("import sys, pkgutil, importlib, pgdr\n"
            "for m in pkgutil.walk_packages(pgdr.__path__, 'pgdr.'):\n"
            "    m.name != 'pgdr.__main__' and importlib.import_module(m.name)\n"
            "bad = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
            "assert not bad, bad\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    for path in (ROOT / "plugins" / "pgdr").rglob("*.py"):
        assert "import airflow" not in path.read_text() and "from airflow" not in path.read_text(), path


GOOD = {"clusters": {"app": {"dsn": "host=db port=5432 user=backup", "repository": "file:///srv/pgdr"}}}


def test_config_defaults():
    c = parse_config(GOOD).cluster("app")
    assert (c.compression, c.compression_level, c.schedule, c.timezone) == ("zstd", 3, "0 2 * * *", "America/New_York")
    assert c.repository.kind == "file" and c.repository.url == "file:///srv/pgdr"


def test_config_defaults_and_alerts_merge():
    cfg = parse_config({
        "defaults": {"compression": "lz4", "schedule": "30 1 * * *"},
        "alerts": {"slack_conn_id": "slack", "pagerduty_conn_id": "pd"},
        "clusters": {"app": {"repository": {"url": "s3://b/p", "sse": "aws:kms", "kms_key_id": "k1"},
                             "alerts": {"severity": "error"}}},
    })
    c = cfg.cluster("app")
    assert c.compression == "lz4" and c.compression_level == 1 and c.schedule == "30 1 * * *"
    assert (c.alerts.slack_conn_id, c.alerts.pagerduty_conn_id, c.alerts.severity) == ("slack", "pd", "error")
    assert c.repository.sse == "aws:kms"


@pytest.mark.parametrize("raw, key, words", [
    ({"clusters": {"app": {"repository": "file:///x", "compresion": "zstd"}}}, "clusters.app.compresion", "unknown key"),
    ({"clusters": {"app": {"repository": "file:///x", "compression": "brotli"}}}, "clusters.app.compression", "must be one of"),
    ({"clusters": {"app": {"repository": "file:///x", "compression": "zstd", "compression_level": 40}}},
     "clusters.app.compression_level", "from 1 to 22"),
    ({"clusters": {"app": {"repository": "ftp://x"}}}, "clusters.app.repository.url", "file:// or s3://"),
    ({"clusters": {"app": {"repository": "file://relative"}}}, "clusters.app.repository.url", "absolute"),
    ({"clusters": {"app": {}}}, "clusters.app.repository", "is required"),
    ({"clusters": {"App!": {"repository": "file:///x"}}}, "clusters.App!", "lowercase"),
    ({"clusters": {"app": {"repository": "file:///x", "timezone": "Mars/Olympus"}}}, "clusters.app.timezone", "unknown time zone"),
    ({"clusters": {"app": {"repository": "file:///x", "schedule": "daily"}}}, "clusters.app.schedule", "cron"),
    ({"clusters": {"app": {"repository": "file:///x", "dsn": "host=db password=hunter2"}}}, "clusters.app.dsn", "password"),
    ({"clusters": {"app": {"repository": "file:///x", "dsn": "postgresql://u:hunter2@db/x"}}}, "clusters.app.dsn", "password"),
    ({"clusters": {"app": {"repository": {"url": "s3://b", "aws_secret_access_key": "x"}}}},
     "clusters.app.repository.aws_secret_access_key", "secrets are not allowed"),
    ({"clusters": {}}, "clusters", "at least one"),
    ([1, 2], "(top level)", "must be a mapping"),
])
def test_config_errors_name_the_key(raw, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "/etc/pgdr.yaml")
    assert e.value.key == key
    assert words in str(e.value) and str(e.value).startswith("/etc/pgdr.yaml: ")
    assert "hunter2" not in str(e.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "pgdr.yaml"
    p.write_text("clusters:\n  app:\n    repository: [unclosed\n")
    with pytest.raises(ConfigError, match=r"pgdr.yaml: not valid YAML at line \d+"):
        load_config(p)
    code, data, err = pgdr("--json", "list", "--cluster", "app", config=p)
    assert code == 2 and data["error"] == "config" and data["file"] == str(p)
    assert "not valid YAML" in err


def test_cli_missing_config_and_unknown_cluster(tmp_path):
    code, data, err = pgdr("--json", "list", "--cluster", "app", config=tmp_path / "nope.yaml")
    assert code == 2 and "file not found" in data["message"]
    p = tmp_path / "pgdr.yaml"
    p.write_text(json.dumps(GOOD))
    code, data, _ = pgdr("--json", "list", "--cluster", "billing", config=p)
    assert code == 2 and "no cluster named 'billing' (configured: app)" in data["message"]
    code, _, err = pgdr("restore", "--cluster", "app", config=p)  # --pgdata missing
    assert code == 2 and "--pgdata" in err


def test_pgdr_config_env_var_is_used(tmp_path):
    p = tmp_path / "env.yaml"
    p.write_text(json.dumps({"clusters": {"envonly": {"repository": f"file://{tmp_path}/r"}}}))
    code, data, _ = pgdr("--json", "list", "--cluster", "envonly", env={"PGDR_CONFIG": str(p)})
    assert code == 0 and data == {"cluster": "envonly", "repository": f"file://{tmp_path}/r", "backups": []}


@pytest.mark.parametrize("kind,level", [("zstd", 3), ("lz4", 1), ("gzip", 6), ("none", 0)])
def test_codecs_round_trip(kind, level):
    data = [os.urandom(100_000), b"a" * 300_000, b"", b"tail"]
    packed = list(compress_stream(iter(data), kind, level))
    assert b"".join(decompress_stream(iter(packed), kind)) == b"".join(data)


@pytest.mark.parametrize("kind,level", [("zstd", 3), ("lz4", 1), ("gzip", 6), ("none", 0)])
def test_decompression_output_is_bounded_whatever_the_ratio(kind, level):
    packed = b"".join(compress_stream(iter([bytes(1 << 20)] * 64), kind, level))  # 64 MiB of zero pages
    sizes = [len(c) for c in decompress_stream(iter([packed]), kind)]
    assert sum(sizes) == 64 << 20 and max(sizes) <= 1 << 20


@pytest.mark.parametrize("kind", ["zstd", "lz4", "gzip"])
def test_codecs_detect_garbage(kind):
    packed = bytearray(b"".join(compress_stream(iter([os.urandom(50_000)]), kind, 1)))
    packed[len(packed) // 2] ^= 0xFF
    packed[10] ^= 0xFF
    with pytest.raises(IntegrityError, match="cannot decompress"):
        b"".join(decompress_stream(iter([bytes(packed)]), kind))


def test_tar_watcher_matches_tarfile():
    buf = io.BytesIO()
    long_name = "base/" + "x" * 150 + "/file"
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in [("PG_VERSION", b"15\n"), (long_name, os.urandom(70_000)),
                           ("empty", b""), ("backup_manifest", b'{"WAL-Ranges": []}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    w = TarWatcher()
    for i in range(0, len(raw), 777):  # odd chunk sizes cross every boundary
        w.feed(raw[i:i + 777])
    assert w.members == 4
    assert w.spooled["backup_manifest"].read() == b'{"WAL-Ranges": []}'  # spooled: a manifest has no size limit
    w.close()


def test_labels():
    assert make_label(datetime(2026, 11, 25, 7, 0, tzinfo=timezone.utc)) == "20261125-070000F"
    assert check_label("20261125-020000F") == "20261125-020000F"
    for bad in ("latest2", "20261125-0200F", "../../etc", ""):
        with pytest.raises(UsageError):
            check_label(bad)


@pytest.fixture
def lock_storage(tmp_path):
    return open_storage(RepositoryConfig(url=f"file://{tmp_path}"))


def test_lock_excludes_a_second_holder(lock_storage):
    with ClusterLock(lock_storage, "app/lock.json", "backup A"):
        with pytest.raises(LockedError, match="another pgdr process holds app/lock.json"):
            ClusterLock(lock_storage, "app/lock.json", "backup B").acquire()
    assert not lock_storage.exists("app/lock.json")
    with ClusterLock(lock_storage, "app/lock.json", "backup B"):
        pass


def test_lock_of_a_dead_process_is_taken_over(lock_storage, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    lock_storage.put_bytes("app/lock.json", json.dumps({
        "token": "old", "host": socket.gethostname(), "pid": dead.pid, "purpose": "backup X",
        "acquired_at": "2026-01-01T00:00:00.000000Z", "heartbeat_at": lockmod.iso(lockmod.utcnow())}).encode())
    with ClusterLock(lock_storage, "app/lock.json", "backup Y") as lk:
        assert lk.current()[1]["token"] == lk.token
    assert f"process {dead.pid}" in caplog.text


def test_lock_without_heartbeat_is_stale_but_a_fresh_remote_one_is_not(lock_storage):
    remote = {"token": "r", "host": "another-host", "pid": 1, "purpose": "backup R",
              "acquired_at": "x", "heartbeat_at": lockmod.iso(lockmod.utcnow())}
    lock_storage.put_bytes("app/lock.json", json.dumps(remote).encode())
    with pytest.raises(LockedError, match="another-host"):
        ClusterLock(lock_storage, "app/lock.json", "backup").acquire()
    remote["heartbeat_at"] = lockmod.iso(lockmod.utcnow() - timedelta(hours=1))
    lock_storage.put_bytes("app/lock.json", json.dumps(remote).encode())
    ClusterLock(lock_storage, "app/lock.json", "backup").acquire().release()


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            info.mode = 0o600 if kind == tarfile.REGTYPE else 0o700
            if kind == tarfile.SYMTYPE:
                info.linkname = data.decode()
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def test_tar_extractor_writes_the_tree(tmp_path):
    from pgdr.tarstream import TarExtractor

    payload = os.urandom(300_000)
    raw = _tar([("global", tarfile.DIRTYPE, b""), ("global/pg_control", tarfile.REGTYPE, payload),
                ("base/1/" + "n" * 120, tarfile.REGTYPE, b"long name"), ("pg_wal", tarfile.DIRTYPE, b"")])
    x = TarExtractor(tmp_path)
    for i in range(0, len(raw), 4099):
        x.feed(raw[i:i + 4099])
    x.close()
    assert (tmp_path / "global" / "pg_control").read_bytes() == payload
    assert (tmp_path / "global" / "pg_control").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "base" / "1" / ("n" * 120)).read_bytes() == b"long name"


@pytest.mark.parametrize("name,kind", [("../escape", tarfile.REGTYPE), ("/etc/passwd", tarfile.REGTYPE),
                                       ("dev", tarfile.CHRTYPE)])
def test_tar_extractor_refuses_what_a_base_backup_never_holds(tmp_path, name, kind):
    from pgdr.tarstream import TarExtractor

    (tmp_path / "t").mkdir()
    x = TarExtractor(tmp_path / "t")
    with pytest.raises(IntegrityError):
        x.feed(_tar([(name, kind, b"x")]))
    assert not (tmp_path / "escape").exists()


def test_tar_extractor_notices_a_stream_cut_short(tmp_path):
    from pgdr.tarstream import TarExtractor

    raw = _tar([("f", tarfile.REGTYPE, os.urandom(5000))])
    x = TarExtractor(tmp_path)
    x.feed(raw[:3000])
    with pytest.raises(IntegrityError, match="ends in the middle"):
        x.close()


def test_a_label_with_a_trailing_newline_is_not_a_label():
    """Python's `$` matches before a final newline: the label rule must hold for the whole string."""
    import pytest

    from pgdr.errors import UsageError
    from pgdr.labels import check_label

    assert check_label("20261125-020000F_20261126-020000I") == "20261125-020000F_20261126-020000I"
    for bad in ("20261125-020000F\n", "20261125-020000S\n", "20261125-020000F_20261126-020000I\n"):
        with pytest.raises(UsageError):
            check_label(bad)


def test_validators_hold_for_the_whole_string_not_up_to_a_final_newline():
    """A path, an LSN, a listen address, a cluster or key name with a trailing newline is refused
    (each failed before: `^…$` with re.match lets a final newline through)."""
    import pytest

    from pgdr.errors import PgdrError
    from pgdr.lsn import parse_lsn
    from pgdr.paths import check_path
    from pgdr.server import LISTEN

    with pytest.raises(PgdrError):
        check_path("/var/lib/pgdr/restore/app\n", "--pgdata")
    with pytest.raises((PgdrError, ValueError)):
        parse_lsn("0/3000060\n")
    assert not LISTEN.fullmatch("127.0.0.1\n")
    from pgdr.config import parse_config

    with pytest.raises(PgdrError):
        parse_config({"clusters": {"app\n": {"repository": "file:///tmp/r"}}})


def test_applying_an_incremental_in_place_rewrites_whole_files_and_leaves_unchanged_relations_alone(tmp_path):
    """The chain applier on a parent's restored state: a whole file shorter than the parent's copy ends at its
    own length; a file with a second name (a hard link) is replaced, never written through; a relation with
    no changed block and the same length is left as it is; one with changed blocks and a new truncation
    length is rebuilt like pg_combinebackup does; what the incremental does not hold is removed."""
    from pgdr.incremental import ChainApplier

    root = tmp_path / "pgdata"
    (root / "base" / "5").mkdir(parents=True)
    (root / "PG_VERSION").write_bytes(b"18\n" + b"x" * 5000)  # longer than the new copy
    (root / "global").mkdir()
    (root / "global" / "pg_filenode.map").write_bytes(b"old map")
    outside = tmp_path / "elsewhere"
    os.link(root / "global" / "pg_filenode.map", outside)  # a second name for the parent's copy
    unchanged = os.urandom(3 * 8192)
    (root / "base" / "5" / "1259").write_bytes(unchanged)
    before = os.stat(root / "base" / "5" / "1259")
    (root / "base" / "5" / "2619").write_bytes(b"\1" * (4 * 8192))
    (root / "base" / "5" / "dropped").write_bytes(b"gone")
    new_block = os.urandom(8192)
    raw = _tar([("PG_VERSION", tarfile.REGTYPE, b"18\n"),
                ("global", tarfile.DIRTYPE, b""), ("global/pg_filenode.map", tarfile.REGTYPE, b"new map"),
                ("base", tarfile.DIRTYPE, b""), ("base/5", tarfile.DIRTYPE, b""),
                ("base/5/INCREMENTAL.1259", tarfile.REGTYPE, incremental_file({}, 3)),
                ("base/5/INCREMENTAL.2619", tarfile.REGTYPE, incremental_file({1: new_block, 5: new_block}, 2))])
    applier = ChainApplier(root)
    try:
        for i in range(0, len(raw), 3001):
            applier.feed(raw[i:i + 3001])
        applier.close()
        applier.prune()
    finally:
        applier.release()
    assert (root / "PG_VERSION").read_bytes() == b"18\n"
    assert (root / "global" / "pg_filenode.map").read_bytes() == b"new map"
    assert outside.read_bytes() == b"old map"  # the other name still has the old content
    after = os.stat(root / "base" / "5" / "1259")
    assert (root / "base" / "5" / "1259").read_bytes() == unchanged
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not even opened for writing
    rebuilt = (root / "base" / "5" / "2619").read_bytes()
    assert rebuilt == b"\1" * 8192 + new_block + bytes(3 * 8192) + new_block  # truncated to 2, blocks 1 and 5
    assert not (root / "base" / "5" / "dropped").exists()
    assert applier.rebuilt == 2 and applier.rebuilt_paths == {"base/5/1259", "base/5/2619"}
    assert [os.stat(root / "base" / "5" / n).st_size for n in ("1259", "2619")] == [3 * 8192, 6 * 8192]
