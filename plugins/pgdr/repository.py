"""The repository layout, per cluster, on any storage backend.

    <cluster>/cluster.json                     system identifier and version, written once
    <cluster>/lock/<generation>.json           the cluster lock, held by a backup or an expiry (pgdr.lock)
    <cluster>/backup/<label>/base.tar.NNNNN.zst   the pg_basebackup tar stream, in parts
    <cluster>/backup/<label>/backup_manifest   PostgreSQL's own manifest, as produced
                                               (parts and backup_manifest end in .enc when encrypted)
    <cluster>/backup/<label>/manifest.json     pgdr's manifest: written last, the commit point
    <cluster>/wal/                             archived WAL (continuous archiving)
    <cluster>/reports/                         verification and drill reports

A backup directory without manifest.json is an unfinished backup and is
never offered for restore. It is a leftover to delete only when nobody can
be writing it: its last write is old (``last_write``) and the deleter holds
the cluster lock, which every backup holds while it writes. In an encrypted
repository manifest.json is authenticated (HMAC-SHA256 keyed from the master
key, pgdr.crypto.sign_record) on commit and checked on every read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

from pgdr.crypto import KeyUnavailable, check_record, sign_record
from pgdr.errors import BackupNotFound, IntegrityError, ObjectNotFound, RepositoryError
from pgdr.labels import check_label
from pgdr.manifest import BackupManifest
from pgdr.storage import Storage

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass
class CatalogEntry:
    label: str
    manifest: BackupManifest | None
    error: str | None = None
    unchecked: str | None = None  # catalog(unchecked_ok=True): why its authentication could not be checked


class Repository:
    def __init__(self, storage: Storage, cluster: str):
        self.storage = storage
        self.cluster = cluster

    # keys
    def backup_prefix(self, label: str) -> str:
        return f"{self.cluster}/backup/{label}/"

    def key(self, label: str, name: str) -> str:
        return self.backup_prefix(label) + name

    @property
    def cluster_key(self) -> str:
        return f"{self.cluster}/cluster.json"

    @property
    def lock_key(self) -> str:
        return f"{self.cluster}/lock.json"

    # cluster identity
    def identity(self) -> dict | None:
        """What cluster.json says this repository belongs to, or None before the first write."""
        try:
            return json.loads(self.storage.get_bytes(self.cluster_key))
        except ObjectNotFound:
            return None
        except ValueError as e:
            raise IntegrityError(f"{self.cluster_key} is unreadable: {e}") from None

    def check_identity(self, system_identifier: str, pg_version: int | None) -> None:
        """Record which cluster this repository belongs to; refuse any other."""
        record = json.dumps({"cluster": self.cluster, "system_identifier": system_identifier,
                             "pg_version": pg_version}).encode()
        if self.storage.put_if_absent(self.cluster_key, record):
            log.info("repository %s now belongs to cluster %s (system identifier %s)",
                     self.storage.describe(), self.cluster, system_identifier)
            return
        known = self.identity() or {}
        if known.get("system_identifier") != system_identifier:
            raise RepositoryError(
                f"repository {self.storage.describe()} holds cluster '{self.cluster}' with system identifier "
                f"{known.get('system_identifier')}, but the server has {system_identifier}: refusing to mix "
                "two clusters' backups (point this cluster at a new repository path)")

    # catalog
    def catalog(self, unchecked_ok: bool = False) -> list[CatalogEntry]:
        """Every backup directory, oldest first, committed or not.

        A manifest the keyring cannot authenticate raises KeyUnavailable, unless ``unchecked_ok`` (what
        ``pgdr list`` needs, which works without a key): then it is listed with ``unchecked`` saying why."""
        prefix = f"{self.cluster}/backup/"
        labels: dict[str, bool] = {}
        for obj in self.storage.list(prefix):
            label, _, name = obj.key[len(prefix):].partition("/")
            labels[label] = labels.get(label, False) or name == MANIFEST
        out = []
        for label in sorted(labels):
            if not labels[label]:
                out.append(CatalogEntry(label, None, "unfinished: no manifest (backup in progress or failed)"))
                continue
            try:
                try:
                    out.append(CatalogEntry(label, self.manifest(label)))
                except KeyUnavailable as e:
                    if not unchecked_ok:
                        raise
                    out.append(CatalogEntry(label, self.manifest(label, check=False),
                                            unchecked=f"not authenticated: {e}"))
            except (IntegrityError, RepositoryError) as e:
                out.append(CatalogEntry(label, None, str(e)))
        return out

    def backups(self, entries: list[CatalogEntry] | None = None) -> list[BackupManifest]:
        """Committed backups of the cluster, oldest first: the bases for restore and WAL replay.

        Safety backups (type ``safety``: what a confirmed replace found in its destination) are not
        among them: they are restored only by their own label and are never a base for replaying the
        cluster's archived WAL. One whose manifest cannot be read or fails authentication is left out,
        and the log names it. ``entries``: a ``catalog()`` the caller already read (every manifest is read
        once, not twice)."""
        out = []
        for e in self.catalog() if entries is None else entries:
            if e.manifest is None and not (e.error or "").startswith("unfinished"):
                log.warning("backup %s is left out: %s", e.label, e.error)
            elif e.manifest is not None and e.manifest.status == "ok" and e.manifest.type != "safety":
                out.append(e.manifest)
        return out

    def manifest(self, label: str, check: bool = True) -> BackupManifest:
        key = self.key(label, MANIFEST)
        try:
            data = self.storage.get_bytes(key)
        except ObjectNotFound:
            raise BackupNotFound(f"no backup {label} for cluster '{self.cluster}' in {self.storage.describe()}") from None
        try:
            record = json.loads(data)
        except ValueError:
            record = None  # from_json names what is wrong
        if check and isinstance(record, dict):
            self.check_record(record, key, f"{MANIFEST} of backup {label}")
        return BackupManifest.from_json(data, where=key)

    def check_record(self, record: dict, key: str, what: str) -> bool:
        """A readable record of this repository (manifest.json, verify.json) is authentic: required when the
        repository is encrypted (unless ``accept_unencrypted``), checked whenever it carries authentication
        and the keyring can check it. True when it was authenticated."""
        storage = self.storage
        required = storage.encrypt and not storage.accept_unencrypted
        auth = record.get("auth")
        held = storage.keyring.by_id if storage.keyring else {}
        if not storage.encrypt and isinstance(auth, dict) and auth.get("key_id") not in held:
            return False  # encryption is not configured here: nothing to check it with, nothing requires it
        return check_record(record, storage.keyring, key, what, required)

    def sign(self, record: dict, key: str) -> dict:
        """``record`` as it is stored at ``key``: authenticated when the repository is encrypted."""
        return sign_record(record, self.storage.keyring, key) if self.storage.encrypt else record

    def resolve(self, label: str) -> BackupManifest:
        """``latest`` or a label, to a committed backup's manifest."""
        if label == "latest":
            entries = self.catalog()
            backups = [e.manifest for e in entries
                       if e.manifest is not None and e.manifest.status == "ok" and e.manifest.type != "safety"]
            bad = [e for e in entries if e.manifest is None and not (e.error or "").startswith("unfinished")]
            if bad and (not backups or bad[-1].label > backups[-1].label):
                raise IntegrityError(f"the newest backup cannot be used: {bad[-1].error}; not falling back "
                                     "silently to an older one (name it with --backup to restore it)")
            if not backups:
                raise BackupNotFound(f"cluster '{self.cluster}' has no completed backup in {self.storage.describe()}")
            return backups[-1]
        check_label(label)
        m = self.manifest(label)
        if m.status != "ok":
            raise BackupNotFound(f"backup {label} has status {m.status!r}, not restorable")
        return m

    def commit(self, manifest: BackupManifest) -> None:
        key = self.key(manifest.label, MANIFEST)
        record = self.sign({k: v for k, v in manifest.to_dict().items() if k != "auth"}, key)
        manifest.auth = record.get("auth")
        self.storage.put_bytes(key, json.dumps(record, indent=2).encode(), lock=True)

    def last_write(self, label: str) -> datetime | None:
        """When the newest object of this backup directory was written; None when the store does not say."""
        objs = self.storage.list(self.backup_prefix(label))
        if not objs or any(o.modified is None for o in objs):
            return None
        return max(o.modified for o in objs)

    def remove_unfinished(self, label: str) -> int:
        """Delete the objects of an unfinished backup with this label; manifest-less only."""
        if self.storage.exists(self.key(label, MANIFEST)):
            raise RepositoryError(f"backup {label} is committed; refusing to delete it as unfinished")
        objs = self.storage.list(self.backup_prefix(label))
        for obj in objs:
            self.storage.delete(obj.key)
        return len(objs)
