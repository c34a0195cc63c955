"""pgdr.delete (the API's DELETE of one backup): refused under S3 Object Lock and while another pgdr process
holds the cluster lock, before anything is deleted."""

from __future__ import annotations

import time

import pytest

from helpers import pgdr
from test_object_lock import locked_repo  # noqa: F401


def test_delete_refuses_a_backup_under_object_lock_and_a_held_lock(pg15, workdir, locked_repo):  # noqa: F811
    from pgdr.config import load_config
    from pgdr.delete import ObjectLocked, delete_backup
    from pgdr.errors import LockedError
    from pgdr.lock import ClusterLock
    from pgdr.repository import Repository
    from pgdr.storage import open_storage

    s3, bucket, _, config = locked_repo
    labels = []
    for _ in range(2):
        code, out, err = pgdr("--json", "backup", "--cluster", "app", config=config)
        assert code == 0, err
        labels.append(out["label"])
        time.sleep(1.1)
    repo = Repository(open_storage(load_config(config).cluster("app").repository), "app")
    before = sorted(o.key for o in repo.storage.list("app/backup/"))
    with pytest.raises(ObjectLocked) as e:
        delete_backup(repo, labels[0])
    assert e.value.kind == "object_lock" and "under S3 Object Lock until" in str(e.value)
    assert sorted(o.key for o in repo.storage.list("app/backup/")) == before

    from pgdr_airflow.api import HTTP

    assert HTTP["object_lock"] == 423 and HTTP["locked"] == 409 and HTTP["delete_refused"] == 409

    repo.storage.object_lock = None  # as a repository without Object Lock: now the cluster lock decides
    with ClusterLock(repo.storage, repo.lock_key, "backup (another process)"):
        with pytest.raises(LockedError):
            delete_backup(repo, labels[0])
    assert sorted(o.key for o in repo.storage.list("app/backup/")) == before
