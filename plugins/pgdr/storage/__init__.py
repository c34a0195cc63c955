"""Repository storage backends behind one small interface: ``file`` and ``s3``."""

from __future__ import annotations

from pgdr.storage.base import ObjectInfo, Storage


def open_storage(repo, credentials: dict | None = None) -> Storage:
    """Build the backend a RepositoryConfig names.

    ``credentials`` (access key, secret, session token) come from the Airflow
    adapter; the CLI passes none and boto3 uses the standard chain.
    """
    if repo.kind == "file":
        from pgdr.storage.file import FileStorage

        return FileStorage(repo.url[len("file://"):])
    from pgdr.storage.s3 import S3Storage

    return S3Storage(
        repo.url,
        endpoint_url=repo.endpoint_url,
        region=repo.region,
        sse=repo.sse,
        kms_key_id=repo.kms_key_id,
        part_size=repo.part_size_mb * 1024 * 1024,
        credentials=credentials,
    )


__all__ = ["ObjectInfo", "Storage", "open_storage"]
