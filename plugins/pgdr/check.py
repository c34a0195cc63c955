"""``pgdr check``: is this cluster ready to be backed up into this repository?

Every check runs and is reported, critical or not, instead of stopping at the
first problem (Barman's style): an operator sees the whole picture at once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from pgdr.config import ClusterConfig
from pgdr.errors import ObjectNotFound, PgdrError
from pgdr.pgbin import find_bin_dir
from pgdr.postgres import ConnInfo, replication_probe, server_info
from pgdr.repository import Repository
from pgdr.results import JsonResult
from pgdr.storage import Storage


@dataclass
class CheckItem(JsonResult):
    name: str
    ok: bool
    critical: bool
    detail: str


@dataclass
class CheckReport(JsonResult):
    cluster: str
    ok: bool
    checks: list[CheckItem] = field(default_factory=list)

    def failed(self) -> list[CheckItem]:
        return [c for c in self.checks if not c.ok and c.critical]


def run_check(cluster: ClusterConfig, conn: ConnInfo, storage: Storage) -> CheckReport:
    checks: list[CheckItem] = []

    def add(name, ok, detail, critical=True):
        checks.append(CheckItem(name, bool(ok), critical, detail))

    info = None
    try:
        info = server_info(conn)
        add("connection", True, f"connected to {conn.describe()}: PostgreSQL {info.version}")
    except PgdrError as e:
        add("connection", False, str(e))
    if info:
        add("wal_level", info.wal_level in ("replica", "logical"),
            f"wal_level = {info.wal_level}" + ("" if info.wal_level != "minimal" else "; set it to replica and restart"))
        add("max_wal_senders", info.max_wal_senders >= 1,
            f"max_wal_senders = {info.max_wal_senders}" + ("" if info.max_wal_senders >= 1 else "; needs at least 1"))
        add("max_wal_senders_headroom", info.max_wal_senders >= 3,
            f"max_wal_senders = {info.max_wal_senders}; 3 or more leaves room for WAL streaming and a backup "
            "at the same time", critical=False)
        add("replication_privilege", info.can_replicate,
            "role may replicate" if info.can_replicate else "the role needs REPLICATION (ALTER ROLE … REPLICATION)")
        try:
            replication_probe(conn)
            add("replication_connection", True, "pg_hba.conf allows a replication connection")
        except PgdrError as e:
            add("replication_connection", False,
                f"{e} (add a 'host replication <role> <address> scram-sha-256' line to pg_hba.conf)")
        add("tablespaces", not info.tablespaces,
            "no extra tablespaces" if not info.tablespaces
            else f"extra tablespaces {', '.join(info.tablespaces)} are not supported yet; backups will refuse")
        try:
            b = find_bin_dir(info.major, cluster.pg_bin_dir, tool="pg_basebackup")
            add("binaries", True, f"pg_basebackup {b.version} in {b.path}")
        except PgdrError as e:
            add("binaries", False, str(e))
    add(*_repository_check(storage))
    if storage.encrypt:
        add(*_encryption_check(storage))
    if storage.object_lock is not None:
        add(*_object_lock_check(storage))
    if info:
        add(*_identity_check(storage, cluster, info.system_identifier))
    return CheckReport(cluster=cluster.name, ok=all(c.ok for c in checks if c.critical), checks=checks)


def _repository_check(storage: Storage) -> tuple[str, bool, str]:
    key = f".pgdr-check-{uuid.uuid4().hex}"
    try:
        storage.put_bytes(key, b"pgdr write check")
        ok = storage.get_bytes(key) == b"pgdr write check"
        storage.delete(key)
        return "repository_write", ok, f"wrote, read back and deleted a probe object in {storage.describe()}"
    except PgdrError as e:
        return "repository_write", False, str(e)


def _encryption_check(storage: Storage) -> tuple[str, bool, str]:
    try:
        key = storage.keyring.current()
    except PgdrError as e:
        return "encryption_key", False, str(e)
    ids = ", ".join(k.key_id for k in storage.keyring.keys)
    return ("encryption_key", True, f"new backups and WAL are encrypted with master key {key.key_id!r} "
            f"(keyring from {storage.keyring.source}: {ids})")


def _object_lock_check(storage: Storage) -> tuple[str, bool, str]:
    lock = storage.object_lock
    try:
        enabled = storage.lock_enabled()
    except PgdrError as e:
        return "object_lock", False, str(e)
    if not enabled:
        return ("object_lock", False, f"the config asks for {lock.mode} Object Lock, but the bucket has no Object "
                "Lock configuration: create the bucket with Object Lock enabled (see README, Immutability)")
    return "object_lock", True, f"bucket has Object Lock; pgdr retains what it writes {lock.days} days ({lock.mode})"


def _identity_check(storage: Storage, cluster: ClusterConfig, system_identifier: str) -> tuple[str, bool, str]:
    repo = Repository(storage, cluster.name)
    try:
        known = json.loads(storage.get_bytes(repo.cluster_key))
    except ObjectNotFound:
        return "repository_identity", True, "repository has no backups of this cluster yet"
    except PgdrError as e:
        return "repository_identity", False, str(e)
    except ValueError as e:
        return "repository_identity", False, f"{repo.cluster_key} is unreadable: {e}"
    same = known.get("system_identifier") == system_identifier
    return ("repository_identity", same,
            f"repository belongs to system identifier {known.get('system_identifier')}"
            + ("" if same else f", but the server is {system_identifier}"))
