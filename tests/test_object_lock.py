"""S3 Object Lock and server-side encryption on the S3 server: every backup and
WAL object pgdr writes (multipart uploads included) carries its retention, a
locked object refuses deletion by version, verification reports an object
that lost its lock, and retention skips and reports what is still locked."""

from __future__ import annotations

import itertools
import os
from datetime import datetime, timedelta, timezone

import boto3
import pytest

from helpers import pgdr, repo_snapshot, table_hashes, write_config
from test_backup_restore import restore_and_start, storage_of
from test_wal import completed_segments

_n = itertools.count()


@pytest.fixture
def locked_repo(pg15, workdir, s3_server):
    """An Object Lock bucket (versioned by definition), SSE-KMS with a key on the same server,
    COMPLIANCE retention of one day, 5 MiB upload parts so backup parts go up in several pieces."""
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"locked-{next(_n)}-{os.getpid()}"
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    kms_key = boto3.client("kms", endpoint_url=s3_server, region_name="us-east-1").create_key()["KeyMetadata"]["KeyId"]
    config = write_config(workdir / f"locked-{next(_n)}.yaml", {"app": {
        "dsn": pg15.dsn, "compression": "none", "retention_window_days": 1, "retention_min_full": 1,
        "repository": {"url": f"s3://{bucket}/r", "endpoint_url": s3_server, "region": "us-east-1",
                       "part_size_mb": 5, "sse": "aws:kms", "kms_key_id": kms_key,
                       "object_lock": {"mode": "COMPLIANCE", "days": 1}}}})
    return s3, bucket, kms_key, config


def test_every_object_is_locked_and_refuses_deletion_by_version(pg15, workdir, locked_repo):
    s3, bucket, kms_key, config = locked_repo
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err
    for seg in completed_segments(pg15, 2):
        assert pgdr("wal-push", "--cluster", "app", seg, config=config)[0] == 0
    prefix = f"r/app/backup/{backup['label']}/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    wal = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="r/app/wal/00000001/")["Contents"]]
    assert len(wal) == 2 and any(k.endswith("/manifest.json") for k in keys)
    soon = datetime.now(timezone.utc) + timedelta(hours=23)
    multipart = 0
    for key in keys + wal:
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ObjectLockMode"] == "COMPLIANCE" and head["ObjectLockRetainUntilDate"] > soon, key
        assert head["ServerSideEncryption"] == "aws:kms" and kms_key in head["SSEKMSKeyId"], key
        multipart += "-" in head["ETag"]
    assert multipart >= 1, "the backup should have gone up as a multipart upload"
    # Mutable bookkeeping is never locked (it is rewritten constantly).
    assert "ObjectLockMode" not in s3.head_object(Bucket=bucket, Key="r/app/cluster.json")
    # Whoever holds pgdr's credentials cannot destroy a version, single-part or multipart.
    for key in [next(k for k in keys if "base.tar" in k), wal[0], f"{prefix}manifest.json"]:
        version = s3.list_object_versions(Bucket=bucket, Prefix=key)["Versions"][0]["VersionId"]
        with pytest.raises(Exception, match="AccessDenied"):
            s3.delete_object(Bucket=bucket, Key=key, VersionId=version)
    # SSE-KMS and the lock are transparent to a restore.
    expected = table_hashes(pg15)
    restored, _ = restore_and_start(config, workdir, pg15)
    try:
        assert table_hashes(restored) == expected
    finally:
        restored.destroy()


def test_verification_reports_an_object_that_lost_its_lock(pg15, locked_repo):
    s3, bucket, _, config = locked_repo
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err
    for seg in completed_segments(pg15, 1):
        assert pgdr("wal-push", "--cluster", "app", seg, config=config)[0] == 0
    code, report, err = pgdr("--json", "verify", "--cluster", "app", "--no-pg-verify", config=config)
    assert code == 0 and report["ok"], (report, err)
    # A new version written without retention (as by a tool that ignores the lock policy).
    part = f"app/backup/{backup['label']}/base.tar.00000"
    s3.put_object(Bucket=bucket, Key="r/" + part, Body=storage_of(config).get_bytes(part))
    code, report, _ = pgdr("--json", "verify", "--cluster", "app", "--no-pg-verify", config=config)
    fails = [(f["object"], f["check"]) for f in report["backups"][0]["failures"]]
    assert code == 1 and fails == [(part, "object_lock")], report
    assert "not locked" in report["backups"][0]["failures"][0]["detail"]
    assert report["wal"]["failures"] == []
    # The same for a WAL segment.
    seg_key = s3.list_objects_v2(Bucket=bucket, Prefix="r/app/wal/00000001/")["Contents"][0]["Key"]
    s3.put_object(Bucket=bucket, Key=seg_key, Body=s3.get_object(Bucket=bucket, Key=seg_key)["Body"].read())
    code, report, _ = pgdr("--json", "verify", "--cluster", "app", "--no-pg-verify", config=config)
    assert code == 1 and [(f["object"], f["check"]) for f in report["wal"]["failures"]] == \
        [(seg_key[len("r/"):], "object_lock")], report


def test_retention_skips_and_reports_locked_objects(pg15, locked_repo):
    s3, bucket, _, config = locked_repo
    labels = []
    for label in ("20261101-000000F", "20261102-000000F"):
        code, out, err = pgdr("--json", "backup", "--cluster", "app", "--label", label, config=config)
        assert code == 0, err
        labels.append(label)
    storage = storage_of(config)
    before = repo_snapshot(storage)
    later = datetime.now(timezone.utc) + timedelta(days=3)  # the plan expires the first backup...
    from test_retention import expire_as_of

    out = expire_as_of(config, later)
    assert out["plan"]["decisions"][0] == {"label": labels[0], "action": "expire", "reason": out["plan"]["decisions"][0]
                                           ["reason"]} and out["plan"]["decisions"][0]["reason"].startswith("expired")
    # ... but its objects are locked for another day by the wall clock: reported and left alone.
    assert out["deleted_backups"] == [] and [b["label"] for b in out["skipped_locked_backups"]] == [labels[0]]
    assert out["skipped_locked_backups"][0]["locked_objects"] >= 3
    after = repo_snapshot(storage)
    assert {k: v for k, v in after.items() if "/reports/" not in k and "/lock/" not in k} == \
        {k: v for k, v in before.items() if "/lock/" not in k}
    code, listing, _ = pgdr("--json", "list", "--cluster", "app", config=config)
    assert [b["label"] for b in listing["backups"]] == labels


def test_check_reports_the_lock_and_the_key(pg15, workdir, s3_server, locked_repo):
    s3, bucket, _, config = locked_repo
    code, report, _ = pgdr("--json", "check", "--cluster", "app", config=config)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 0 and checks["object_lock"]["ok"] and "COMPLIANCE" in checks["object_lock"]["detail"]
    # The same config against a bucket created without Object Lock: check fails, and so does a backup.
    plain = f"nolock-{next(_n)}-{os.getpid()}"
    s3.create_bucket(Bucket=plain)
    text = config.read_text().replace(bucket, plain)
    other = workdir / f"nolock-{next(_n)}.yaml"
    other.write_text(text)
    code, report, _ = pgdr("--json", "check", "--cluster", "app", config=other)
    checks = {c["name"]: c for c in report["checks"]}
    assert code == 1 and not checks["object_lock"]["ok"] and "no Object Lock configuration" in \
        checks["object_lock"]["detail"]
    code, out, _ = pgdr("--json", "backup", "--cluster", "app", config=other)
    assert code == 1 and out["error"] == "repository"
    # Encryption on: check says which key new backups use, or that there is none.
    enc = workdir / f"enc-check-{next(_n)}.yaml"
    write_config(enc, {"app": {"dsn": pg15.dsn, "repository": {"url": f"file://{workdir}/enc-check",
                                                                "encryption": True}}})
    from pgdr.crypto import generate_key

    code, report, _ = pgdr("--json", "check", "--cluster", "app", config=enc,
                           env={"PGDR_KEYRING": generate_key("a") + "," + generate_key("b")})
    assert code == 0 and "master key 'b'" in {c["name"]: c for c in report["checks"]}["encryption_key"]["detail"]
    code, report, _ = pgdr("--json", "check", "--cluster", "app", config=enc, env={"PGDR_KEYRING": ""})
    assert code == 1 and not {c["name"]: c for c in report["checks"]}["encryption_key"]["ok"]


def test_sse_aes256_is_applied(pg15, workdir, s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"sse-{next(_n)}-{os.getpid()}"
    s3.create_bucket(Bucket=bucket)
    config = write_config(workdir / f"sse-{next(_n)}.yaml", {"app": {"dsn": pg15.dsn, "repository": {
        "url": f"s3://{bucket}/r", "endpoint_url": s3_server, "region": "us-east-1", "sse": "AES256"}}})
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=config)
    assert code == 0, err
    for o in s3.list_objects_v2(Bucket=bucket, Prefix="r/app/backup/")["Contents"]:
        assert s3.head_object(Bucket=bucket, Key=o["Key"])["ServerSideEncryption"] == "AES256"


def test_object_lock_config_is_checked(tmp_path):
    from pgdr.config import parse_config
    from pgdr.errors import ConfigError

    base = {"clusters": {"app": {"dsn": "host=x", "retention_window_days": 30,
                                 "repository": {"url": "s3://b/p", "object_lock": {"mode": "COMPLIANCE"}}}}}
    assert parse_config(base).cluster("app").repository.object_lock.days == 37  # window + a backup interval
    for change, needle in [({"object_lock": {"mode": "LEGAL"}}, "must be GOVERNANCE or COMPLIANCE"),
                           ({"object_lock": {"days": 7}}, "shorter than retention_window_days"),
                           ({"url": "file:///tmp/x", "object_lock": True}, "needs an s3:// repository"),
                           ({"encryption": {"key_env": "lower case"}}, "must name an environment variable")]:
        raw = {"clusters": {"app": {**base["clusters"]["app"],
                                    "repository": {**base["clusters"]["app"]["repository"], **change}}}}
        with pytest.raises(ConfigError, match=needle):
            parse_config(raw)
