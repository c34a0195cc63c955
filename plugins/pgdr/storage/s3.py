"""A repository in an S3 bucket (AWS or any S3-compatible endpoint).

Transfers keep several requests in flight, as real S3 has 20-50 ms per
request: an upload sends up to ``concurrency`` multipart parts at once, a
download reads ``concurrency`` ranges ahead (each pinned to the object's ETag,
so an object replaced half-way fails instead of mixing two versions) and yields
them in order. Memory stays bounded: at most ``MEMORY_BUDGET`` of parts in
flight plus the one being filled, whatever the object's size.
"""

from __future__ import annotations

import base64
import collections
import hashlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Iterable, Iterator

from pgdr.errors import ObjectNotFound, RepositoryError
from pgdr.storage.base import CHUNK, ObjectInfo, Retention, Storage

MIN_PART = 5 * 1024 * 1024  # S3's floor for every part but the last
# Every upload carries the SHA-256 of its bytes (x-amz-checksum-sha256, per part for multipart uploads):
# S3 recomputes it on arrival and refuses the write (BadDigest) if a byte changed on the way.
CHECKSUM = "SHA256"
MEMORY_BUDGET = 128 * 1024 * 1024  # bytes of parts (or ranges) in flight at once, per transfer
RANGE_SIZE = 8 * 1024 * 1024  # one ranged GET of a download


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class S3Storage(Storage):
    def __init__(self, url: str, *, endpoint_url=None, region=None, sse=None, kms_key_id=None,
                 part_size: int = 64 * 1024 * 1024, credentials: dict | None = None, concurrency: int = 4):
        bucket_and_prefix = url[len("s3://"):]
        self.bucket, _, prefix = bucket_and_prefix.partition("/")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = url
        self.endpoint_url = endpoint_url
        self.region = region
        self.part_size = max(part_size, MIN_PART)
        self.concurrency = max(1, concurrency)
        self.range_size = RANGE_SIZE
        self.extra = {}
        if sse:
            self.extra["ServerSideEncryption"] = sse
        if kms_key_id:
            self.extra["SSEKMSKeyId"] = kms_key_id
        self._credentials = credentials or {}
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session(**self._credentials)
            self._client = session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                config=Config(retries={"max_attempts": 8, "mode": "standard"},
                              connect_timeout=10, read_timeout=120,
                              max_pool_connections=max(10, 2 * self.concurrency)),
            )
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _error(self, action: str, key: str, e: Exception) -> RepositoryError:
        from botocore.exceptions import ClientError

        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            if err.get("Code") in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"{self.url}/{key} does not exist")
            detail = f"{err.get('Code')}: {err.get('Message') or ''}".strip()
        else:
            detail = str(e)
        return RepositoryError(f"cannot {action} {self.url}/{key}: {detail}")

    def _lock_args(self, lock: bool) -> dict:
        if not (lock and self.object_lock):
            return {}
        until = (datetime.now(timezone.utc) + timedelta(days=self.object_lock.days)).replace(microsecond=0)
        return {"ObjectLockMode": self.object_lock.mode, "ObjectLockRetainUntilDate": until}

    def _in_flight(self, size: int) -> int:
        """How many parts (or ranges) of ``size`` bytes may be in flight: ``concurrency``, within the budget."""
        return max(1, min(self.concurrency, MEMORY_BUDGET // max(size, 1)))

    def put_stream(self, key: str, chunks: Iterable[bytes], *, lock: bool = False) -> int:
        buf = bytearray()
        it = iter(chunks)
        upload_id = None
        parts: list[dict] = []
        total = 0
        k = self._key(key)
        lock_args = self._lock_args(lock)
        extra = {**self.extra, **lock_args}
        pool = None
        pending: collections.deque = collections.deque()  # futures of parts in flight, in part order
        limit = self._in_flight(self.part_size)
        try:
            for chunk in it:
                buf += chunk
                total += len(chunk)
                while len(buf) >= self.part_size:
                    if upload_id is None:
                        upload_id = self.client.create_multipart_upload(
                            Bucket=self.bucket, Key=k, ChecksumAlgorithm=CHECKSUM, **extra)["UploadId"]
                        pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="pgdr-s3-put")
                    # Hand the buffer over as the part (no copy of it): only the overshoot is copied.
                    body, buf = buf, bytearray(buf[self.part_size:])
                    del body[self.part_size:]
                    while len(pending) >= limit:  # bounded: wait for the oldest part before reading more
                        parts.append(pending.popleft().result())
                    n = len(parts) + len(pending) + 1
                    pending.append(pool.submit(self._upload_part, k, upload_id, n, body))
                    del body
            if upload_id is None:
                body = bytes(buf)
                digest = sha256_b64(body)
                resp = self.client.put_object(Bucket=self.bucket, Key=k, Body=body, ChecksumAlgorithm=CHECKSUM,
                                              ChecksumSHA256=digest, **extra)
                _check_echo(resp, digest, k)
            else:
                if buf:
                    n = len(parts) + len(pending) + 1
                    pending.append(pool.submit(self._upload_part, k, upload_id, n, bytes(buf)))
                    buf = bytearray()
                while pending:
                    parts.append(pending.popleft().result())
                done = self.client.complete_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id,
                                                             MultipartUpload={"Parts": parts})
                if lock_args:
                    # Some S3 implementations drop the lock headers of a multipart upload: set it on the
                    # version just written (the same date; never a shortening).
                    version = {"VersionId": done["VersionId"]} if done.get("VersionId") else {}
                    self.client.put_object_retention(
                        Bucket=self.bucket, Key=k, **version,
                        Retention={"Mode": lock_args["ObjectLockMode"],
                                   "RetainUntilDate": lock_args["ObjectLockRetainUntilDate"]})
        except BaseException as e:
            for f in pending:
                f.cancel()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)  # nothing may still upload after the abort
                pool = None
            if upload_id is not None:
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id)
                except Exception:
                    pass
            if isinstance(e, Exception) and not isinstance(e, RepositoryError) and _is_boto(e):
                raise self._error("write", key, e) from e
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        return total

    def _upload_part(self, k: str, upload_id: str, n: int, body: bytes) -> dict:
        digest = sha256_b64(body)
        resp = self.client.upload_part(Bucket=self.bucket, Key=k, UploadId=upload_id, PartNumber=n, Body=body,
                                       ChecksumAlgorithm=CHECKSUM, ChecksumSHA256=digest)
        _check_echo(resp, digest, f"{k} part {n}")
        return {"PartNumber": n, "ETag": resp["ETag"], "ChecksumSHA256": digest}

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*",
                                   ChecksumAlgorithm=CHECKSUM, ChecksumSHA256=sha256_b64(data), **self.extra)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") \
                    or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                return False
            raise self._error("write", key, e) from e
        except Exception as e:
            if _is_boto(e):
                raise self._error("write", key, e) from e
            raise

    def get_stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The object's bytes in order; ranges after the first fetched ``concurrency`` at a time."""
        k = self._key(key)
        first, total, etag = self._get_range(key, k, 0, None)
        if first is None:  # an empty object (a range of nothing is refused): read it whole
            yield from self._get_whole(key, k, chunk_size)
            return
        yield from _slices(first, chunk_size)
        del first
        starts = list(range(self.range_size, total, self.range_size))
        if not starts:
            return
        limit = self._in_flight(self.range_size)
        pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="pgdr-s3-get")
        pending: collections.deque = collections.deque()
        try:
            for start in starts:
                while len(pending) >= limit:
                    data = pending.popleft().result()
                    yield from _slices(data, chunk_size)
                pending.append(pool.submit(self._get_range, key, k, start, etag))
            while pending:
                data = pending.popleft().result()
                yield from _slices(data, chunk_size)
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def _get_range(self, key: str, k: str, start: int, etag: str | None):
        """(bytes, total size, ETag) of one range; (None, 0, None) for an empty object."""
        from botocore.exceptions import ClientError

        end = start + self.range_size - 1
        args = {"IfMatch": etag} if etag else {}
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=k, Range=f"bytes={start}-{end}", **args)
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        except ClientError as e:
            if start == 0 and e.response.get("Error", {}).get("Code") == "InvalidRange":
                return None, 0, None
            if e.response.get("Error", {}).get("Code") == "PreconditionFailed":
                raise RepositoryError(f"cannot read {self.url}/{key}: it was replaced while being read") from e
            raise self._error("read", key, e) from e
        except Exception as e:
            if _is_boto(e) or isinstance(e, OSError):
                raise self._error("read", key, e) from e
            raise
        total = _total_size(resp.get("ContentRange"), resp.get("ContentLength"), len(data))
        if len(data) != min(self.range_size, total - start):
            raise RepositoryError(f"cannot read {self.url}/{key}: bytes {start}.. came back {len(data)} long")
        if start == 0:
            return data, total, resp.get("ETag")
        return data

    def _get_whole(self, key: str, k: str, chunk_size: int) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=k)["Body"]
        except Exception as e:
            if _is_boto(e):
                raise self._error("read", key, e) from e
            raise
        try:
            while True:
                chunk = body.read(chunk_size)
                if not chunk:
                    return
                yield chunk
        except Exception as e:
            if _is_boto(e) or isinstance(e, OSError):
                raise self._error("read", key, e) from e
            raise
        finally:
            body.close()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix))
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"], obj.get("LastModified")))
        except Exception as e:
            if _is_boto(e):
                raise self._error("list", prefix, e) from e
            raise
        return sorted(out, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as e:
            if not _is_boto(e):
                raise
            err = self._error("read", key, e)
            if isinstance(err, ObjectNotFound):
                return False
            raise err from e

    def retention(self, key: str) -> Retention | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if _is_boto(e):
                raise self._error("read", key, e) from e
            raise
        return Retention(head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate"))

    def process_env(self) -> dict:
        env = {}
        names = {"aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
                 "aws_session_token": "AWS_SESSION_TOKEN"}
        for k, v in self._credentials.items():
            if k in names and v:
                env[names[k]] = v
        if self.endpoint_url:
            env["AWS_ENDPOINT_URL_S3"] = self.endpoint_url  # boto3 reads it when the config names no endpoint
        if self.region:
            env["AWS_DEFAULT_REGION"] = self.region
        return env

    def lock_enabled(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            conf = self.client.get_object_lock_configuration(Bucket=self.bucket)
        except ClientError as e:
            if "ObjectLockConfigurationNotFound" in str(e.response.get("Error", {}).get("Code")):
                return False
            raise self._error("read the Object Lock configuration of", "", e) from e
        except Exception as e:
            if _is_boto(e):
                raise self._error("read the Object Lock configuration of", "", e) from e
            raise
        return conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if _is_boto(e):
                raise self._error("delete", key, e) from e
            raise

    def describe(self) -> str:
        return f"{self.url} (endpoint {self.endpoint_url})" if self.endpoint_url else self.url


def _check_echo(resp: dict, digest: str, what: str) -> None:
    """The store answers with the checksum it computed; it must be ours (S3 itself refuses a mismatch)."""
    got = resp.get("ChecksumSHA256")
    if got is not None and got != digest:
        raise RepositoryError(f"{what} was stored with SHA-256 {got}, but pgdr sent {digest}")


def _slices(data: bytes, size: int) -> Iterator[bytes]:
    if len(data) <= size:
        if data:
            yield data
        return
    view = memoryview(data)
    for i in range(0, len(data), size):
        yield bytes(view[i:i + size])


def _total_size(content_range: str | None, length, got: int) -> int:
    """The object's size from ``Content-Range: bytes 0-8388607/12345678`` (no header: the body is all of it)."""
    if content_range and "/" in content_range:
        try:
            return int(content_range.rsplit("/", 1)[1])
        except ValueError:
            pass
    return got


def _is_boto(e: BaseException) -> bool:
    mod = type(e).__module__
    return mod.startswith("botocore") or mod.startswith("boto3") or mod.startswith("urllib3")
