"""Nothing in the repository is trusted before it is checked (issue 9, part 2).

- A part replaced by a crafted tar (and manifest.json rewritten to match, as an
  attacker with write access would): restore and verify refuse every member a
  base backup never holds, and nothing appears outside the target.
- Each few MiB of a stored object is checked against the manifest before any
  of it is used: a flipped byte in a middle chunk stops the restore before
  that chunk reaches the unpacker. Manifests without chunk digests still
  restore (read twice, and the log says so).
- In an encrypted repository manifest.json and verify.json are authenticated
  with a key derived from the master key: rewriting them is detected and named.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile

import pytest

from helpers import pgdr, table_hashes, write_config
from pgdr.compression import SUFFIX, compress_stream
from pgdr.crypto import generate_key
from pgdr.errors import IntegrityError
from pgdr.repository import Repository
from pgdr.sandbox import SandboxCluster, free_port
from test_backup_restore import socket_dir, storage_of

CHUNK = 4 << 20  # pgdr.streams.VERIFY_CHUNK


# ---------------------------------------------------------------- helpers

def crafted_tar(members) -> bytes:
    """members: (name, tarfile type, data or link target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o600 if kind == tarfile.REGTYPE else 0o700
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = data
                data = b""
            if kind == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 3
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def chunk_digests(data: bytes) -> list[str]:
    return [hashlib.sha256(data[i:i + CHUNK]).hexdigest() for i in range(0, len(data), CHUNK)]


def rewrite_manifest(storage, label: str, edit) -> None:
    """Rewrite manifest.json the way someone with write access (and no key) would."""
    key = f"app/backup/{label}/manifest.json"
    record = json.loads(storage.get_bytes(key))
    edit(record)
    storage.put_bytes(key, json.dumps(record, indent=2).encode())


def replace_part(storage, label: str, raw_tar: bytes, compression: str) -> str:
    """Put ``raw_tar`` (compressed with the backup's codec) in place of part 0 and make the manifest match."""
    name = f"base.tar.00000{SUFFIX[compression]}"
    stored = b"".join(compress_stream([raw_tar], compression, 3))
    storage.put_bytes(f"app/backup/{label}/{name}", stored)

    def edit(m):
        f = m["files"][0]
        f.update(size=len(raw_tar), stored_size=len(stored), sha256=hashlib.sha256(stored).hexdigest())
        if "chunks" in f:  # only what is there: the same tamper works against any manifest format
            f.update(chunk_size=CHUNK, chunks=chunk_digests(stored))
        m["files"] = [f]
        m["size"], m["stored_size"] = len(raw_tar), len(stored)
    rewrite_manifest(storage, label, edit)
    return f"app/backup/{label}/{name}"


def tree(path) -> dict:
    """{relative path: (kind, content)} of everything under path, links not followed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, path)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", None)
            else:
                out[rel] = ("file", open(p, "rb").read())
    return out


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def base_repo(pg18, workdir):
    """One real zstd backup of PostgreSQL 18 in a file repository (copied by each test that tampers)."""
    repo = workdir / "untrusted-base"
    config = write_config(workdir / "untrusted-base.yaml", {"app": {"dsn": pg18.dsn, "repository": f"file://{repo}"}})
    hashes = table_hashes(pg18)
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err
    return repo, backup, hashes


_copies = iter(range(10_000))


@pytest.fixture
def repo_copy(base_repo, pg18, workdir):
    repo, backup, hashes = base_repo
    n = next(_copies)
    copy = workdir / f"untrusted-copy-{n}"
    shutil.copytree(repo, copy)
    config = write_config(workdir / f"untrusted-copy-{n}.yaml",
                          {"app": {"dsn": pg18.dsn, "repository": f"file://{copy}"}})
    return config, backup, storage_of(config), hashes


@pytest.fixture
def outside(workdir):
    """A directory next to the restore target that nothing may write into, holding one victim file."""
    d = workdir / f"outside-{next(_copies)}"
    d.mkdir()
    (d / "victim").write_text("untouched")
    return d


# ---------------------------------------------------------------- crafted tars

def cases(outside):
    pre = [("PG_VERSION", tarfile.REGTYPE, b"18\n")]  # something written before the bad member
    return {
        "write through a symlink": (pre + [("escape", tarfile.SYMTYPE, str(outside)),
                                           ("escape/pwned", tarfile.REGTYPE, b"pwned")], "escape"),
        "symlink to an outside path": (pre + [("global", tarfile.DIRTYPE, b""),
                                              ("global/up", tarfile.SYMTYPE, "../../" + outside.name)], "global/up"),
        "symlink to an absolute path": (pre + [("etc", tarfile.SYMTYPE, "/etc")], "etc"),
        "hard link": (pre + [("hard", tarfile.LNKTYPE, str(outside / "victim"))], "hard"),
        "character device": (pre + [("null", tarfile.CHRTYPE, b"")], "null"),
        "fifo": (pre + [("fifo", tarfile.FIFOTYPE, b"")], "fifo"),
        "absolute path": (pre + [(str(outside / "abs"), tarfile.REGTYPE, b"pwned")], str(outside / "abs")),
        "dot-dot": (pre + [(f"../{outside.name}/dotdot", tarfile.REGTYPE, b"pwned")], f"../{outside.name}/dotdot"),
        "file replacing a directory": (pre + [("global", tarfile.DIRTYPE, b""),
                                              ("global", tarfile.REGTYPE, b"pwned")], "global"),
    }


CASES = ["write through a symlink", "symlink to an outside path", "symlink to an absolute path", "hard link",
         "character device", "fifo", "absolute path", "dot-dot", "file replacing a directory"]


@pytest.mark.parametrize("case", CASES)
def test_crafted_tar_is_refused_by_restore_and_verify(repo_copy, outside, workdir, case):
    config, backup, storage, _ = repo_copy
    members, bad = cases(outside)[case]
    key = replace_part(storage, backup["label"], crafted_tar(members), "zstd")
    before = tree(outside)
    # The target sits next to the outside directory, so "../<outside>" from inside it lands there.
    target = outside.parent / f"target-{outside.name}"
    target.mkdir()

    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", target, config=config)
    assert code == 1, err
    assert out["error"] == "integrity" and f"tar member {bad!r}" in out["message"], out
    assert list(target.iterdir()) == []  # emptied again
    assert tree(outside) == before  # nothing written through, nothing linked to

    for extra in ([], ["--no-pg-verify"]):  # unpacked into a scratch directory, or only parsed
        code, report, err = pgdr("--json", "verify", "--cluster", "app", "--backup", backup["label"], "--no-wal",
                                 *extra, config=config)
        assert code == 1, err
        failures = report["backups"][0]["failures"]
        assert [(f["object"], f["check"]) for f in failures] == [(key, "unpack")], failures
        assert f"tar member {bad!r}" in failures[0]["detail"]
        assert tree(outside) == before
    assert (outside / "victim").stat().st_nlink == 1


def test_extractor_never_writes_through_a_link_put_there_by_anyone(tmp_path):
    """A symlink that is already in the target (not from the tar) is never followed either."""
    from pgdr.tarstream import TarExtractor

    target, outside = tmp_path / "t", tmp_path / "o"
    target.mkdir()
    outside.mkdir()
    os.symlink(outside, target / "base")
    x = TarExtractor(target)
    try:
        with pytest.raises(IntegrityError, match="'base/1/1234' lies under 'base'"):
            x.feed(crafted_tar([("base/1/1234", tarfile.REGTYPE, b"pwned")]))
    finally:
        x.release()
    assert list(outside.iterdir()) == []


# ---------------------------------------------------------------- chunk digests

@pytest.fixture(scope="module")
def uncompressed(pg18, workdir):
    """A backup stored without compression: stored bytes = tar bytes, so the test can see exactly which
    bytes reached the unpacker."""
    repo = workdir / "untrusted-none"
    config = write_config(workdir / "untrusted-none.yaml", {"app": {
        "dsn": pg18.dsn, "repository": f"file://{repo}", "compression": "none"}})
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err
    return config, backup


def test_flipped_byte_in_a_middle_chunk_never_reaches_the_unpacker(uncompressed, tmp_path):
    from pgdr.unpack import VerifiedObject, part_content

    config, backup = uncompressed
    storage = storage_of(config)
    repo = Repository(storage, "app")
    m = repo.manifest(backup["label"])
    f = m.files[0]
    assert f.chunk_size == CHUNK and len(f.chunks) == -(-f.stored_size // CHUNK) >= 4
    key = f"app/backup/{backup['label']}/{f.name}"
    original = storage.get_bytes(key)
    damaged = bytearray(original)
    damaged[2 * CHUNK + 12345] ^= 0x01
    storage.put_bytes(key, bytes(damaged))
    try:
        seen = bytearray()
        with pytest.raises(IntegrityError) as e:
            for piece in part_content(repo, m, f, VerifiedObject(storage, key, f)):
                seen += piece
        assert key in str(e.value) and "chunk 2 of" in str(e.value)
        assert bytes(seen) == original[:2 * CHUNK]  # the chunks before it, verified; nothing of chunk 2

        target = tmp_path / "target"
        code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", target, config=config)
        assert code == 1 and out["error"] == "integrity", err
        assert key in out["message"] and "chunk 2 of" in out["message"]
        assert not target.exists()
        code, report, _ = pgdr("--json", "verify", "--cluster", "app", "--backup", "latest", "--no-wal",
                               config=config)
        assert code == 1 and [(x["object"], x["check"]) for x in report["backups"][0]["failures"]] == \
            [(key, "sha256")]
    finally:
        storage.put_bytes(key, original)


def _legacy(storage, label):
    def edit(m):
        for f in m["files"]:
            f.pop("chunk_size", None)
            f.pop("chunks", None)
    rewrite_manifest(storage, label, edit)


def test_legacy_manifest_without_chunk_digests_still_restores(repo_copy, pg18, workdir):
    config, backup, storage, hashes = repo_copy
    _legacy(storage, backup["label"])
    target, port = workdir / f"untrusted-legacy-{next(_copies)}", free_port()
    code, result, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", target, "--start", "--port", port,
                             "--socket-dir", socket_dir(workdir), config=config)
    assert code == 0, err
    assert "no per-chunk digests" in err and "reading it twice" in err
    restored = SandboxCluster(pg18.bins, target, port)
    try:
        assert table_hashes(restored) == hashes
    finally:
        restored.destroy()


def test_legacy_manifest_is_checked_whole_before_anything_is_unpacked(repo_copy, tmp_path):
    from pgdr.unpack import VerifiedObject, part_content

    config, backup, storage, _ = repo_copy
    _legacy(storage, backup["label"])
    repo = Repository(storage, "app")
    m = repo.manifest(backup["label"])
    f = m.files[0]
    key = f"app/backup/{backup['label']}/{f.name}"
    data = bytearray(storage.get_bytes(key))
    data[-5000] ^= 0x01  # near the end: everything before it would unpack fine
    storage.put_bytes(key, bytes(data))
    seen = []
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        for piece in part_content(repo, m, f, VerifiedObject(storage, key, f)):
            seen.append(piece)
    assert seen == []
    code, out, _ = pgdr("--json", "restore", "--cluster", "app", "--pgdata", tmp_path / "t", config=config)
    assert code == 1 and out["error"] == "integrity" and key in out["message"]
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- authenticated manifests

K1 = generate_key("k1")


@pytest.fixture(scope="module")
def encrypted_repo(pg15, workdir, s3_server):
    """An encrypted backup of PostgreSQL 15 on the S3 server, verified clean."""
    import boto3

    bucket = f"untrusted-enc-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    repo = {"url": f"s3://{bucket}/r", "endpoint_url": s3_server, "region": "us-east-1"}
    config = write_config(workdir / "untrusted-enc.yaml", {"app": {
        "dsn": pg15.dsn, "repository": {**repo, "encryption": {"key_env": "PGDR_KEYRING"}}}})
    migrating = write_config(workdir / "untrusted-enc-migrating.yaml", {"app": {
        "dsn": pg15.dsn, "repository": {**repo, "encryption": {"key_env": "PGDR_KEYRING",
                                                               "accept_unencrypted": True}}}})
    env = {"PGDR_KEYRING": K1}
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config, env=env)
    assert code == 0, err
    code, report, err = pgdr("--json", "verify", "--cluster", "app", "--backup", "all", "--no-wal", config=config,
                             env=env)
    assert code == 0 and report["ok"], err
    return config, migrating, backup, env


@pytest.fixture
def pristine(encrypted_repo):
    """Puts manifest.json and verify.json back as they were after each test."""
    config, _, backup, _ = encrypted_repo
    storage = storage_of(config)
    keys = [f"app/backup/{backup['label']}/{n}" for n in ("manifest.json", "verify.json")]
    saved = {k: storage.get_bytes(k) for k in keys}
    yield storage
    for k, v in saved.items():
        storage.put_bytes(k, v)


def test_manifest_and_verify_record_are_authenticated(encrypted_repo, pristine):
    config, _, backup, env = encrypted_repo
    label = backup["label"]
    manifest = json.loads(pristine.get_bytes(f"app/backup/{label}/manifest.json"))
    assert manifest["auth"]["alg"] == "hmac-sha256" and manifest["auth"]["key_id"] == "k1"
    verification = json.loads(pristine.get_bytes(f"app/backup/{label}/verify.json"))
    assert verification["ok"] is True and verification["auth"]["key_id"] == "k1"
    code, info, err = pgdr("--json", "info", "--cluster", "app", "--backup", label, config=config, env=env)
    assert code == 0 and info["verification"]["ok"] is True, err


@pytest.mark.parametrize("field", ["sha256", "size", "file list"])
def test_rewritten_manifest_is_detected_and_named(encrypted_repo, pristine, tmp_path, field):
    config, _, backup, env = encrypted_repo
    label = backup["label"]

    def edit(m):
        if field == "sha256":
            m["files"][0]["sha256"] = hashlib.sha256(b"attacker's part").hexdigest()
        elif field == "size":
            m["files"][0]["size"] += 1
            m["size"] += 1
        else:
            m["files"].append({**m["files"][0], "name": "base.tar.00001.zst.enc"})
    rewrite_manifest(pristine, label, edit)
    named = f"manifest.json of backup {label} fails authentication"

    for which in (label, "latest"):  # "latest" never falls back silently to something older
        code, out, err = pgdr("--json", "restore", "--cluster", "app", "--backup", which, "--pgdata",
                              tmp_path / "t", config=config, env=env)
        assert code == 1 and out["error"] == "integrity" and named in out["message"], err
        assert not (tmp_path / "t").exists()
    code, out, _ = pgdr("--json", "info", "--cluster", "app", "--backup", label, config=config, env=env)
    assert code == 1 and out["error"] == "integrity" and named in out["message"]
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config, env=env)
    assert code == 0 and listing["backups"][0]["status"] == "unreadable" and named in listing["backups"][0]["detail"]
    code, report, _ = pgdr("--json", "verify", "--cluster", "app", "--backup", "all", "--no-wal", config=config,
                           env=env)
    assert code == 1 and report["ok"] is False
    failure = report["backups"][0]["failures"][0]
    assert failure["object"] == f"app/backup/{label}/manifest.json" and named in failure["detail"]


def test_unauthenticated_manifest_is_refused_unless_migrating(encrypted_repo, pristine, tmp_path):
    config, migrating, backup, env = encrypted_repo
    label = backup["label"]
    rewrite_manifest(pristine, label, lambda m: m.pop("auth"))
    code, out, _ = pgdr("--json", "info", "--cluster", "app", "--backup", label, config=config, env=env)
    assert code == 1 and out["error"] == "integrity"
    assert f"manifest.json of backup {label} is not authenticated" in out["message"]
    assert "accept_unencrypted" in out["message"]
    code, report, err = pgdr("--json", "verify", "--cluster", "app", "--backup", label, "--no-wal",
                             config=migrating, env=env)
    assert code == 0 and report["ok"], err


def test_rewritten_verify_record_is_detected_and_named(encrypted_repo, pristine):
    config, _, backup, env = encrypted_repo
    label = backup["label"]
    key = f"app/backup/{label}/verify.json"
    record = json.loads(pristine.get_bytes(key))
    record["verified_at"] = "2099-01-01T00:00:00.000000Z"  # "verified later than it was"
    pristine.put_bytes(key, json.dumps(record).encode())
    named = f"verify.json of backup {label} fails authentication"
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config, env=env)
    v = listing["backups"][0]["verification"]
    assert code == 0 and v["ok"] is False and v["failures"][0]["object"] == key and named in v["failures"][0]["detail"]
    code, info, _ = pgdr("--json", "info", "--cluster", "app", "--backup", label, config=config, env=env)
    assert info["verification"]["ok"] is False and named in info["verification"]["failures"][0]["detail"]
    # A record that cannot be trusted does not count as verified: "new" reads the backup again.
    code, report, err = pgdr("--json", "verify", "--cluster", "app", "--backup", "new", "--no-wal", "--no-pg-verify",
                             config=config, env=env)
    assert code == 0 and [b["label"] for b in report["backups"]] == [label], err
    code, info, _ = pgdr("--json", "info", "--cluster", "app", "--backup", label, config=config, env=env)
    assert info["verification"]["ok"] is True


def test_without_the_key_manifests_cannot_be_checked(encrypted_repo, tmp_path):
    config, _, backup, _ = encrypted_repo
    # list needs no key, and says that what it shows is not authenticated
    code, listing, err = pgdr("--json", "list", "--cluster", "app", config=config, env={"PGDR_KEYRING": ""})
    assert code == 0 and listing["backups"][0]["key_id"] == "k1", err
    assert listing["backups"][0]["detail"].startswith("not authenticated") and "'k1'" in listing["backups"][0]["detail"]
    for args in (["info", "--backup", backup["label"]], ["verify", "--backup", "all", "--no-wal"],
                 ["restore", "--pgdata", tmp_path / "t"]):
        code, out, _ = pgdr("--json", *args, "--cluster", "app", config=config, env={"PGDR_KEYRING": ""})
        assert code == 2 and out["error"] == "key_unavailable", (args, out)
        assert "'k1'" in out["message"]
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK])
def test_chunk_digests_and_their_check_agree_at_every_boundary(tmp_path, size):
    """What backup records (any write sizes) is what restore checks (any read sizes); one byte more, less or
    different is caught, naming the chunk."""
    from pgdr.manifest import StoredFile
    from pgdr.storage.file import FileStorage
    from pgdr.streams import ChunkDigests
    from pgdr.unpack import VerifiedObject

    data = os.urandom(size)
    rec = ChunkDigests()
    for piece in (data[i:i + 999_999] for i in range(0, size, 999_999)):
        rec.update(piece)
    digests = rec.finish()
    assert digests == chunk_digests(data) and rec.hexdigest == hashlib.sha256(data).hexdigest()
    f = StoredFile("obj", size, size, rec.hexdigest, CHUNK, digests)
    storage = FileStorage(tmp_path)
    storage.put_bytes("obj", data)
    assert b"".join(VerifiedObject(storage, "obj", f)) == data
    if size:
        flipped = bytearray(data)
        flipped[-1] ^= 1
        for bad, needle in ((bytes(flipped), f"chunk {len(digests) - 1} of"), (data[:-1], "obj: "),
                            (data + b"x", "obj: ")):
            storage.put_bytes("obj", bad)
            with pytest.raises(IntegrityError, match=needle):
                b"".join(VerifiedObject(storage, "obj", f))
