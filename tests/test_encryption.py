"""Client-side encryption end to end: encrypted backups and WAL on a real S3
server restore to exactly the data written; a wrong or missing key stops with
the key id it needs; one flipped byte of ciphertext is caught at restore and at
verification; two keys rotate."""

from __future__ import annotations

import base64
import itertools
import os
import sys

import pytest

from helpers import archive_repo, pgdr, repo_snapshot, switch_and_wait_archived, table_hashes, write_config
from pgdr.crypto import Keyring, generate_key
from pgdr.sandbox import SandboxCluster, free_port
from test_backup_restore import socket_dir, storage_of

_n = itertools.count()
K1, K2 = generate_key("k1"), generate_key("k2")


def keyring_env(*entries: str) -> dict:
    return {"PGDR_KEYRING": ",".join(entries)}


def rows(cluster) -> list[str]:
    return cluster.psql("select coalesce(string_agg(id::text, ',' order by id), '') from t", dbname="app").split(",")


@pytest.fixture(scope="module")
def encrypted(workdir, s3_server):
    """PostgreSQL 18 archiving encrypted WAL (archive_command = pgdr wal-push) into an S3 bucket,
    one encrypted backup, then more committed rows that only the WAL holds."""
    from conftest import _bins
    from pgdr.pgbin import user_ids

    keyfile = workdir / "enc-keyring"
    keyfile.write_text(K1 + "\n")
    os.chown(keyfile, *user_ids("postgres"))
    keyfile.chmod(0o600)
    pg = SandboxCluster(_bins(18), workdir / "enc18" / "data", free_port())
    config = write_config(workdir / "enc.yaml", {"app": {
        "dsn": pg.dsn, "backup_wal": "archive",
        "repository": {**archive_repo(workdir, "enc", s3_server), "encryption": {"key_env": "PGDR_KEYRING"}}}})
    config.chmod(0o644)
    # The server's archive_command finds its keyring the way an operator would set it: the variable names a file.
    archive = f"PGDR_KEYRING=file:{keyfile} {sys.executable} -m pgdr --config {config} -q wal-push --cluster app %p"
    pg.init(extra_conf=f"archive_mode = on\narchive_command = '{archive}'\n").start()
    pg.psql("create database app")
    pg.psql("create table t (id int primary key, secret text)", dbname="app")
    pg.psql("insert into t select g, 'plaintext-marker-' || g from generate_series(1, 500) g", dbname="app")
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config, env=keyring_env(K1))
    assert code == 0, err
    pg.psql("insert into t select g, 'after the backup' from generate_series(501, 600) g", dbname="app")
    expected = rows(pg)
    switch_and_wait_archived(pg)
    yield pg, config, backup, expected
    pg.destroy()


def test_everything_stored_is_ciphertext(encrypted):
    pg, config, backup, _ = encrypted
    storage = storage_of(config)
    objects = storage.list("app/")
    data_objects = [o.key for o in objects if "/backup/" in o.key and not o.key.endswith(".json")
                    or "/wal/0" in o.key and ".partial.json" not in o.key]
    assert any(k.endswith(".zst.enc") for k in data_objects if "/backup/" in k)
    assert any("/wal/00000001/" in k for k in data_objects)
    for key in data_objects:
        assert key.endswith(".enc"), key
        blob = storage.get_bytes(key)
        assert blob.startswith(b"PGDRAEAD") and b"plaintext-marker" not in blob
    manifest = storage.get_bytes(f"app/backup/{backup['label']}/manifest.json")
    assert b'"key_id": "k1"' in manifest and base64.b64encode(Keyring.parse(K1, "t").keys[0].key) not in manifest
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)  # no key needed to list
    assert code == 0 and listing["backups"][0]["key_id"] == "k1"


def test_encrypted_backup_and_wal_restore_to_the_last_commit(encrypted, workdir):
    pg, config, backup, expected = encrypted
    dest, port = workdir / f"enc-restore-{next(_n)}", free_port()
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, "--start", "--port", port,
                          "--socket-dir", socket_dir(workdir), "--target", "latest", config=config,
                          env=keyring_env(K1))
    assert code == 0, err
    restored = SandboxCluster(pg.bins, dest, port)
    try:
        assert out["recovery"]["state"] == "promoted"
        assert rows(restored) == expected and len(expected) == 600
        # The keyring reached restore_command through the server's environment, not a file in the data directory.
        secret = K1.split(":")[1]
        assert not any(secret in p.read_text(errors="replace") for p in dest.glob("*.conf"))
    finally:
        restored.destroy()


@pytest.mark.parametrize("keys, needle", [
    ((), "master key 'k1', which is not in the keyring"),
    ((K2,), "master key 'k1', which is not in the keyring (keys from $PGDR_KEYRING: k2)"),
    (("k1:" + base64.b64encode(b"\x00" * 32).decode(),), "master key 'k1' from $PGDR_KEYRING does not open"),
])
def test_wrong_or_missing_key_names_the_key_and_touches_nothing(encrypted, workdir, keys, needle):
    pg, config, backup, _ = encrypted
    dest = workdir / f"enc-nokey-{next(_n)}"
    env = keyring_env(*keys) if keys else {"PGDR_KEYRING": ""}
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, config=config, env=env)
    assert code == 2 and out["error"] == "key_unavailable" and needle in out["message"], (out, err)
    assert not dest.exists()
    code, out, _ = pgdr("--json", "verify", "--cluster", "app", "--backup", "latest", config=config, env=env)
    assert code == 2 and needle in out["message"]
    # WAL fetch, as restore_command runs it
    name = next(o.key for o in storage_of(config).list("app/wal/00000001/")).rsplit("/", 1)[-1][:24]
    code, out, _ = pgdr("--json", "wal-fetch", "--cluster", "app", name, workdir / f"x-{next(_n)}", "--prefetch", 0,
                        config=config, env=env)
    assert code == 200 and out["error"] == "key_unavailable" and "'k1'" in out["message"]  # stops recovery


def test_tampered_ciphertext_is_caught_at_restore_and_verification(encrypted, workdir):
    pg, config, backup, _ = encrypted
    storage = storage_of(config)
    env = keyring_env(K1)
    code, report, err = pgdr("--json", "verify", "--cluster", "app", "--backup", "latest", config=config, env=env)
    assert code == 0 and report["ok"], (report, err)
    part = f"app/backup/{backup['label']}/base.tar.00000.zst.enc"
    seg_key = sorted(o.key for o in storage.list("app/wal/00000001/") if o.key.endswith(".enc"))[-1]
    originals = {k: storage.get_bytes(k) for k in (part, seg_key)}
    try:
        for key, data in originals.items():
            bad = bytearray(data)
            bad[len(bad) // 2] ^= 0x01
            storage.put_bytes(key, bytes(bad))
        code, report, _ = pgdr("--json", "verify", "--cluster", "app", "--backup", "latest", "--no-pg-verify",
                               config=config, env=env)
        fails = [(f["object"], f["check"], f["detail"]) for f in report["backups"][0]["failures"]]
        # Caught by the manifest's (authenticated) per-chunk SHA-256 before anything is decrypted.
        assert code == 1 and fails[0][:2] == (part, "sha256") and "does not match its SHA-256" in fails[0][2]
        seg = seg_key.rsplit("/", 1)[-1][:24]
        assert any(f["object"] == seg and "fails authentication" in f["detail"] for f in report["wal"]["failures"])
        dest = workdir / f"enc-tampered-{next(_n)}"
        before = repo_snapshot(storage)
        code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, config=config, env=env)
        assert code == 1 and out["error"] == "integrity" and part in out["message"]
        assert "does not match its SHA-256" in out["message"] and not dest.exists() and repo_snapshot(storage) == before
    finally:
        for key, data in originals.items():
            storage.put_bytes(key, data)


def test_rotation_with_two_keys(pg15, workdir):
    repo = f"file://{workdir}/rotation-{next(_n)}"
    config = write_config(workdir / f"rotation-{next(_n)}.yaml",
                          {"app": {"dsn": pg15.dsn, "repository": {"url": repo, "encryption": True}}})
    expected = table_hashes(pg15)
    code, old, err = pgdr("--json", "backup", "--cluster", "app", "--label", "20261101-000000F", config=config,
                          env=keyring_env(K1))
    assert code == 0, err
    # Rotate: k2 appended; new backups use it, the old one stays restorable while k1 is listed.
    code, new, err = pgdr("--json", "backup", "--cluster", "app", "--label", "20261102-000000F", config=config,
                          env=keyring_env(K1, K2))
    assert code == 0, err
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)
    assert [b["key_id"] for b in listing["backups"]] == ["k1", "k2"]
    for label in (old["label"], new["label"]):
        restored, _ = _restore(config, workdir, pg15, label, keyring_env(K1, K2))
        try:
            assert table_hashes(restored) == expected
        finally:
            restored.destroy()
    # With k1 retired, the new backup still restores and the old one says which key it needs.
    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--backup", old["label"], "--pgdata",
                        workdir / f"rot-{next(_n)}", config=config, env=keyring_env(K2))
    assert code == 2 and "'k1'" in out["message"]
    # Encryption on, but no key at all: the backup refuses before pg_basebackup starts.
    code, out, _ = pgdr("--json", "backup", "--cluster", "app", config=config, env={"PGDR_KEYRING": ""})
    assert code == 2 and out["error"] == "key_unavailable" and "no master key" in out["message"]


def _restore(config, workdir, pg, label, env):
    target, port = workdir / f"rot-restore-{next(_n)}", free_port()
    code, result, err = pgdr("--json", "restore", "--cluster", "app", "--backup", label, "--pgdata", target,
                             "--start", "--port", port, "--socket-dir", socket_dir(workdir), config=config, env=env)
    assert code == 0, err
    return SandboxCluster(pg.bins, target, port), result


def test_keyring_parsing_errors_are_clear():
    from pgdr.errors import UsageError

    for text, needle in [("nocolon", "is not 'id:base64key'"), ("k1:!!!", "not valid base64"),
                         ("k1:" + base64.b64encode(b"x" * 16).decode(), "16 bytes; AES-256 needs 32"),
                         (f"{K1},{K1}", "listed twice")]:
        with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            Keyring.parse(text, "$PGDR_KEYRING")
    assert "k1" in repr(Keyring.parse(K1, "t")) and K1.split(":")[1] not in repr(Keyring.parse(K1, "t"))



def test_substitution_is_caught_swapped_wal_and_a_manifest_stripped_of_encryption(encrypted, workdir):
    import json

    pg, config, backup, _ = encrypted
    storage = storage_of(config)
    env = keyring_env(K1)
    a, b = sorted(o.key for o in storage.list("app/wal/00000001/") if o.key.endswith(".enc"))[:2]
    mkey = f"app/backup/{backup['label']}/manifest.json"
    originals = {k: storage.get_bytes(k) for k in (a, b, mkey)}
    try:
        # Two valid ciphertexts under the same key, each in the other's place.
        storage.put_bytes(a, originals[b])
        storage.put_bytes(b, originals[a])
        code, out, _ = pgdr("--json", "wal-fetch", "--cluster", "app", a.rsplit("/", 1)[-1][:24],
                            workdir / f"swap-{next(_n)}", "--prefetch", 0, config=config, env=env)
        assert code == 200 and "another object put in its place" in out["message"]  # stops recovery
        # A manifest rewritten to say "not encrypted" is refused, not trusted.
        m = json.loads(originals[mkey])
        m["encryption"] = None
        storage.put_bytes(mkey, json.dumps(m).encode())
        dest = workdir / f"enc-stripped-{next(_n)}"
        code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, config=config, env=env)
        assert code == 1 and f"manifest.json of backup {backup['label']} fails authentication" in out["message"]
        assert not dest.exists()
    finally:
        for key, data in originals.items():
            storage.put_bytes(key, data)


@pytest.mark.parametrize("size", [0, 1, 4096, 4096 * 3, 4096 * 3 + 5])
def test_seal_round_trips_any_chunking_and_catches_truncation_and_appending(size):
    from pgdr.crypto import seal, unseal
    from pgdr.errors import IntegrityError

    kr = Keyring.parse(K1, "t")
    data = os.urandom(size)
    for piece in (1, 1000, 4096, 10000):
        blob = b"".join(seal([data[i:i + piece] for i in range(0, len(data), piece)] or [b""], kr.new_data_key(),
                             "obj", chunk_size=4096))
        for feed in (7, 4096 + 16, 100000):
            assert b"".join(unseal([blob[i:i + feed] for i in range(0, len(blob), feed)], kr, "obj")) == data
    header = len(blob) - (size // 4096 + 1) * 16 - size
    for cut in sorted({header + 1, header + (4096 + 16) * (size // 4096), len(blob) - 1}):
        if cut < len(blob):
            with pytest.raises(IntegrityError):
                b"".join(unseal([blob[:cut]], kr, "obj"))
    with pytest.raises(IntegrityError):
        b"".join(unseal([blob + b"\0"], kr, "obj"))
    with pytest.raises(IntegrityError, match="another object put in its place"):
        b"".join(unseal([blob], kr, "other"))
