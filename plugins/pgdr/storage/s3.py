"""A repository in an S3 bucket (AWS or any S3-compatible endpoint)."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta, timezone
from typing import Iterable, Iterator

from pgdr.errors import ObjectNotFound, RepositoryError
from pgdr.storage.base import CHUNK, ObjectInfo, Retention, Storage

MIN_PART = 5 * 1024 * 1024  # S3's floor for every part but the last
# Every upload carries the SHA-256 of its bytes (x-amz-checksum-sha256, per part for multipart uploads):
# S3 recomputes it on arrival and refuses the write (BadDigest) if a byte changed on the way.
CHECKSUM = "SHA256"


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class S3Storage(Storage):
    def __init__(self, url: str, *, endpoint_url=None, region=None, sse=None, kms_key_id=None,
                 part_size: int = 64 * 1024 * 1024, credentials: dict | None = None):
        bucket_and_prefix = url[len("s3://"):]
        self.bucket, _, prefix = bucket_and_prefix.partition("/")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = url
        self.endpoint_url = endpoint_url
        self.region = region
        self.part_size = max(part_size, MIN_PART)
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
                              connect_timeout=10, read_timeout=120),
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

    def put_stream(self, key: str, chunks: Iterable[bytes], *, lock: bool = False) -> int:
        buf = bytearray()
        it = iter(chunks)
        upload_id = None
        parts = []
        total = 0
        k = self._key(key)
        lock_args = self._lock_args(lock)
        extra = {**self.extra, **lock_args}
        try:
            for chunk in it:
                buf += chunk
                total += len(chunk)
                while len(buf) >= self.part_size:
                    if upload_id is None:
                        upload_id = self.client.create_multipart_upload(
                            Bucket=self.bucket, Key=k, ChecksumAlgorithm=CHECKSUM, **extra)["UploadId"]
                    body = bytes(buf[: self.part_size])
                    del buf[: self.part_size]
                    parts.append(self._upload_part(k, upload_id, len(parts) + 1, body))
            if upload_id is None:
                body = bytes(buf)
                digest = sha256_b64(body)
                resp = self.client.put_object(Bucket=self.bucket, Key=k, Body=body, ChecksumAlgorithm=CHECKSUM,
                                              ChecksumSHA256=digest, **extra)
                _check_echo(resp, digest, k)
            else:
                if buf:
                    parts.append(self._upload_part(k, upload_id, len(parts) + 1, bytes(buf)))
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
            if upload_id is not None:
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id)
                except Exception:
                    pass
            if isinstance(e, Exception) and not isinstance(e, RepositoryError) and _is_boto(e):
                raise self._error("write", key, e) from e
            raise
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
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
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


def _is_boto(e: BaseException) -> bool:
    mod = type(e).__module__
    return mod.startswith("botocore") or mod.startswith("boto3") or mod.startswith("urllib3")
