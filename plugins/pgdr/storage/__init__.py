"""Repository storage backends behind one small interface: ``file`` and ``s3``."""

from __future__ import annotations

from pgdr.storage.base import ObjectInfo, Retention, Storage


def open_storage(repo, credentials: dict | None = None, keyring=None) -> Storage:
    """Build the backend a RepositoryConfig names.

    ``credentials`` (access key, secret, session token) come from the Airflow
    adapter; the CLI passes none and boto3 uses the standard chain.
    ``keyring`` likewise; without one, the keyring is read from the
    environment variable the repository's encryption config names
    (``PGDR_KEYRING`` by default), so encrypted objects can be read even by a
    config that no longer encrypts new ones.
    """
    from pgdr.crypto import DEFAULT_ENV, Keyring

    storage = _backend(repo, credentials)
    enc = repo.encryption
    storage.keyring = keyring if keyring is not None else Keyring.from_env(enc.key_env if enc else DEFAULT_ENV)
    storage.encrypt = enc is not None
    storage.accept_unencrypted = enc is None or enc.accept_unencrypted
    storage.object_lock = repo.object_lock
    return storage


def _backend(repo, credentials) -> Storage:
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
        concurrency=getattr(repo, "transfer_concurrency", 4),
        credentials=credentials,
    )


__all__ = ["ObjectInfo", "Retention", "Storage", "open_storage"]
