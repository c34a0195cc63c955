"""One contract, two backends: a temp directory and a real S3 server over HTTP."""

from __future__ import annotations

import os

import boto3
import pytest

from pgdr.config import RepositoryConfig
from pgdr.errors import ObjectNotFound, RepositoryError
from pgdr.storage import open_storage


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path):
    if request.param == "file":
        return open_storage(RepositoryConfig(url=f"file://{tmp_path}/repo"))
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(RepositoryConfig(url=f"s3://{bucket}/some/prefix", endpoint_url=server,
                                         region="us-east-1", sse="AES256", part_size_mb=5))


def test_put_get_list_delete(storage):
    storage.put_bytes("c/backup/a/manifest.json", b"{}")
    storage.put_stream("c/backup/a/base.tar.00000.zst", iter([b"ab", b"cd", b""]))
    storage.put_bytes("c/other", b"x" * 10)
    assert storage.get_bytes("c/backup/a/base.tar.00000.zst") == b"abcd"
    assert [(o.key, o.size) for o in storage.list("c/backup/")] == [
        ("c/backup/a/base.tar.00000.zst", 4), ("c/backup/a/manifest.json", 2)]
    assert [o.key for o in storage.list("c/")] == ["c/backup/a/base.tar.00000.zst", "c/backup/a/manifest.json", "c/other"]
    assert storage.exists("c/other") and not storage.exists("c/oth")
    storage.delete("c/other")
    storage.delete("c/other")  # deleting twice is fine
    assert not storage.exists("c/other")
    assert storage.list("nothing/") == []


def test_a_prefix_ending_inside_a_name_lists_what_s3_lists(storage):
    """A WAL lookup lists ``wal/<timeline>/<NAME>.``: the file backend reads only the entries so named in a
    directory of tens of thousands, and lists exactly what S3's prefix listing does."""
    keys = ["w/1/0000A.sha1.zst", "w/1/0000A.sha2.zst", "w/1/0000AB.x", "w/1/0000A/sub", "w/1/0000B.x", "w/10/x",
            "w/2/0000A.x"]
    for key in keys:
        storage.put_bytes(key, key.encode())

    def listed(prefix):
        return [o.key for o in storage.list(prefix)]

    assert listed("w/1/0000A.") == ["w/1/0000A.sha1.zst", "w/1/0000A.sha2.zst"]
    assert listed("w/1/0000A") == ["w/1/0000A.sha1.zst", "w/1/0000A.sha2.zst", "w/1/0000A/sub", "w/1/0000AB.x"]
    assert listed("w/1") == sorted(k for k in keys if k.startswith("w/1"))
    assert listed("w/1/") == sorted(k for k in keys if k.startswith("w/1/"))
    assert listed("w/1/0000C") == listed("w/3/x") == []
    assert [(o.key, o.size) for o in storage.list("w/1/0000B")] == [("w/1/0000B.x", len("w/1/0000B.x"))]


def test_missing_object_is_object_not_found(storage):
    with pytest.raises(ObjectNotFound, match="does not exist"):
        storage.get_bytes("c/missing")


def test_overwrite_replaces_whole_object(storage):
    storage.put_bytes("k", b"first version, longer")
    storage.put_bytes("k", b"second")
    assert storage.get_bytes("k") == b"second"


def test_put_if_absent_creates_once(storage):
    assert storage.put_if_absent("c/lock.json", b"one") is True
    assert storage.put_if_absent("c/lock.json", b"two") is False
    assert storage.get_bytes("c/lock.json") == b"one"


def test_failed_stream_leaves_nothing_visible(storage):
    def broken():
        yield os.urandom(6 * 1024 * 1024)  # past one S3 part, so a multipart upload is under way
        yield os.urandom(1024)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        storage.put_stream("c/backup/x/base.tar.00000.zst", broken())
    assert storage.list("c/") == []


def test_large_object_round_trips_through_multipart(storage):
    data = os.urandom(12 * 1024 * 1024 + 123)
    n = storage.put_stream("big", (data[i:i + 1_000_000] for i in range(0, len(data), 1_000_000)))
    assert n == len(data)
    assert b"".join(storage.get_stream("big", chunk_size=333_333)) == data


def test_s3_objects_carry_server_side_encryption(s3_server, s3_bucket):
    st = open_storage(RepositoryConfig(url=f"s3://{s3_bucket}/p", endpoint_url=s3_server, region="us-east-1",
                                       sse="AES256", part_size_mb=5))
    st.put_bytes("small", b"abc")
    st.put_stream("large", [os.urandom(6 * 1024 * 1024)])
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for key in ("p/small", "p/large"):
        assert s3.head_object(Bucket=s3_bucket, Key=key)["ServerSideEncryption"] == "AES256"


def test_file_storage_rejects_escaping_keys(tmp_path):
    st = open_storage(RepositoryConfig(url=f"file://{tmp_path}"))
    with pytest.raises(RepositoryError, match="invalid object key"):
        st.put_bytes("../outside", b"x")
    (tmp_path.parent / "outside.key").write_bytes(b"not the repository's")
    for prefix in ("../", "../outside", "/etc/pass", "a/../../"):
        with pytest.raises(RepositoryError, match="invalid object key prefix"):
            st.list(prefix)


def test_unwritable_repository_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    st = open_storage(RepositoryConfig(url=f"file://{tmp_path}/afile/repo"))
    with pytest.raises(RepositoryError, match="cannot write"):
        st.put_bytes("c/x", b"x")


def test_missing_bucket_is_a_clear_error(s3_server):
    st = open_storage(RepositoryConfig(url="s3://no-such-bucket/p", endpoint_url=s3_server, region="us-east-1"))
    with pytest.raises(RepositoryError, match="NoSuchBucket"):
        st.put_bytes("c/x", b"x")


# --- durability (issue 10, part 5) ---------------------------------------------------------------------------

def test_file_backend_fsyncs_every_directory_it_creates(tmp_path, monkeypatch):
    """A new directory's entry lives in its parent: after a write, every directory created for it, and the
    parent of each (up to the repository root's own parent when the root is new), has been fsynced."""
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    root = tmp_path / "repo"
    st = open_storage(RepositoryConfig(url=f"file://{root}"))
    monkeypatch.setattr(os, "fsync", spy)
    st.put_bytes("app/backup/20261125-020000F/manifest.json", b"{}")
    for d in (tmp_path, root, root / "app", root / "app" / "backup", root / "app" / "backup" / "20261125-020000F"):
        assert str(d) in synced, f"{d} was not fsynced: {synced}"
    synced.clear()
    assert st.put_if_absent("app/lock/00000000000000000001.json", b"{}")
    for d in (root / "app", root / "app" / "lock"):
        assert str(d) in synced, f"{d} was not fsynced: {synced}"


def test_file_listing_survives_a_concurrent_delete(tmp_path, monkeypatch):
    """Expiry (or a lock's clean-up) deletes while another process lists: the vanished object is skipped,
    the rest is listed; never an empty listing, never an error."""
    import pgdr.storage.file as filemod

    st = open_storage(RepositoryConfig(url=f"file://{tmp_path}/repo"))
    for name in ("a", "b", "c"):
        st.put_bytes(f"app/backup/20261101-000000F/{name}", b"x")
        st.put_bytes(f"app/backup/20261102-000000F/{name}", b"yy")
    real_walk = os.walk

    def walk_while_expiry_deletes(top, *args, **kwargs):
        for dirpath, dirnames, filenames in real_walk(top, *args, **kwargs):
            if dirpath.endswith("20261101-000000F"):  # listed by the walk, deleted before it is stat()ed
                st.delete("app/backup/20261101-000000F/b")
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(filemod.os, "walk", walk_while_expiry_deletes)
    keys = [o.key for o in st.list("app/backup/")]
    assert keys == ["app/backup/20261101-000000F/a", "app/backup/20261101-000000F/c",
                    "app/backup/20261102-000000F/a", "app/backup/20261102-000000F/b",
                    "app/backup/20261102-000000F/c"]
    assert all(o.modified is not None for o in st.list("app/"))


def test_s3_uploads_carry_a_sha256_the_store_checks(s3_server, s3_bucket):
    """Single uploads and every part of a multipart upload send x-amz-checksum-sha256 of their bytes, which
    S3 recomputes (refusing the write on a mismatch; moto records it). Seen on the wire and on the object."""
    import base64
    import hashlib

    st = open_storage(RepositoryConfig(url=f"s3://{s3_bucket}/p", endpoint_url=s3_server, region="us-east-1",
                                       part_size_mb=5))
    sent = []

    def capture(request, **_):
        header = request.headers.get("x-amz-checksum-sha256")
        sent.append((request.url, header.decode() if isinstance(header, bytes) else header, None))

    st.client.meta.events.register("before-send.s3.PutObject", capture)
    st.client.meta.events.register("before-send.s3.UploadPart", capture)
    small, large = b"a WAL segment, say", os.urandom(11 * 1024 * 1024)
    st.put_bytes("small", small)
    st.put_stream("large", [large])

    def b64(data):
        return base64.b64encode(hashlib.sha256(data).digest()).decode()

    head = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").head_object(
        Bucket=s3_bucket, Key="p/small", ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256") == b64(small)
    import re  # parts go up in parallel: in part-number order, not the order they were sent

    parts = [h for url, h, _ in sorted((x for x in sent if "partNumber=" in x[0]),
                                        key=lambda x: int(re.search(r"partNumber=(\d+)", x[0]).group(1)))]
    five = 5 * 1024 * 1024
    assert parts == [b64(large[i * five:(i + 1) * five]) for i in range(3)]
    assert [h for url, h, _ in sent if "partNumber=" not in url] == [b64(small)]
    head = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").head_object(
        Bucket=s3_bucket, Key="p/large", ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")
    assert st.get_bytes("large") == large


def test_a_file_listing_passes_over_temporary_names_even_broken_links(tmp_path):
    """A writer's temporary file (``.NAME.tmp-…``) is never listed, whatever it is: here a link to itself,
    which cannot even be told a file or a directory."""
    st = open_storage(RepositoryConfig(url=f"file://{tmp_path}"))
    st.put_bytes("w/1/B", b"kept")
    os.symlink(".B.tmp-loop", tmp_path / "w" / "1" / ".B.tmp-loop")
    for prefix in ("w/1/.B", "w/1/.", "w/1/", "w/"):
        assert [o.key for o in st.list(prefix)] == ([] if "." in prefix.rsplit("/", 1)[1] else ["w/1/B"])
