"""``pgdr verify``: prove that stored backups and WAL are what the manifests say.

For a backup: every stored object exists, its size and SHA-256 match the
manifest, it decompresses, and PostgreSQL's own ``pg_verifybackup`` accepts
it, unpacked into a scratch directory. For the WAL: the archive is continuous
from each verified backup's start on, and every segment's checksum holds.
Each backup's result is recorded next to it (``verify.json``) and shown by
``list``/``info``; every failure names the object and the check.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pgdr import __version__
from pgdr.compression import decompress_stream
from pgdr.crypto import KeyUnavailable, unseal
from pgdr.errors import ObjectNotFound, PgdrError
from pgdr.lsn import parse_lsn
from pgdr.manifest import BackupManifest
from pgdr.repository import MANIFEST, Repository
from pgdr.results import JsonResult, iso, utcnow
from pgdr.wal import SEG_SIZE, WalArchive, parse_segment, segment_name, segment_of

log = logging.getLogger(__name__)
RESULT = "verify.json"


@dataclass
class VerifyFailure(JsonResult):
    object: str
    check: str
    detail: str


@dataclass
class BackupVerification(JsonResult):
    label: str
    ok: bool
    verified_at: str
    tool_version: str
    objects_checked: int
    bytes_read: int
    pg_verifybackup: str
    failures: list = field(default_factory=list)


@dataclass
class WalVerification(JsonResult):
    ok: bool
    segments_checked: int
    bytes_read: int
    failures: list = field(default_factory=list)


@dataclass
class VerifyReport(JsonResult):
    cluster: str
    ok: bool
    bytes_read: int
    backups: list = field(default_factory=list)
    wal: dict | None = None


def check_lock(storage, key: str, since=None) -> VerifyFailure | None:
    """Where Object Lock is configured: the object must be locked in the configured mode and, given the
    time it was written (``since``), retained until then + the configured days."""
    from datetime import timedelta

    lock = storage.object_lock
    if lock is None:
        return None
    r = storage.retention(key)
    if r is None or r.until is None:
        return VerifyFailure(key, "object_lock", f"not locked; the config asks for {lock.mode} retention "
                             f"of {lock.days} days (anyone with write access can delete it)")
    if since is not None:
        want = since + timedelta(days=lock.days) - timedelta(minutes=10)  # the write came a little after ``since``
        if r.until < want:
            return VerifyFailure(key, "object_lock", f"retained only until {iso(r.until)}, "
                                 f"before its planned expiry {iso(want)}")
    if r.mode != lock.mode:
        return VerifyFailure(key, "object_lock", f"lock mode {r.mode}, the config asks for {lock.mode}")
    return None


def verify_backup(repo: Repository, m: BackupManifest, pg_bin_dir: str | None = None,
                  pg_verify: bool = True) -> BackupVerification:
    from pgdr.results import parse_iso
    from pgdr.restore import require_key

    failures: list[VerifyFailure] = []
    require_key(repo, m)  # a missing or wrong key stops here, naming the key id
    stored = {o.key: o.size for o in repo.storage.list(repo.backup_prefix(m.label))}
    read = 0
    for f in m.files:
        key = repo.key(m.label, f.name)
        if key not in stored:
            failures.append(VerifyFailure(key, "exists", "the object is missing"))
            continue
        if stored[key] != f.stored_size:
            failures.append(VerifyFailure(key, "size", f"{stored[key]} bytes stored, the manifest says {f.stored_size}"))
        digest, size = hashlib.sha256(), 0

        def tap(chunks):
            nonlocal read
            for c in chunks:
                digest.update(c)
                read += len(c)
                yield c
        unlocked = check_lock(repo.storage, key, parse_iso(m.start_time))
        if unlocked:
            failures.append(unlocked)

        def opened(chunks):
            try:
                yield from unseal(chunks, repo.storage.keyring, f"{m.label}/{f.name}", key)
            except PgdrError as e:
                e.check = "decrypt"
                raise
        try:
            body = tap(repo.storage.get_stream(key))
            for chunk in decompress_stream(opened(body) if m.encryption else body, m.compression, name=key):
                size += len(chunk)
        except KeyUnavailable:
            raise
        except PgdrError as e:
            failures.append(VerifyFailure(key, getattr(e, "check", "decompress"), str(e)))
            continue
        if digest.hexdigest() != f.sha256:
            failures.append(VerifyFailure(key, "sha256", f"{digest.hexdigest()} stored, the manifest says {f.sha256}"))
        elif size != f.size:
            failures.append(VerifyFailure(key, "content_size", f"decompresses to {size} bytes, not {f.size}"))
    unlocked = check_lock(repo.storage, repo.key(m.label, MANIFEST), parse_iso(m.start_time))
    if unlocked:
        failures.append(unlocked)
    pg_result = "skipped"
    if pg_verify and not failures:
        pg_result = _pg_verify_scratch(repo, m, pg_bin_dir, failures)
    result = BackupVerification(label=m.label, ok=not failures, verified_at=iso(utcnow()), tool_version=__version__,
                                objects_checked=len(m.files), bytes_read=read, pg_verifybackup=pg_result,
                                failures=[f.to_dict() for f in failures])
    repo.storage.put_bytes(repo.key(m.label, RESULT), result.to_json().encode())
    log.info("backup %s: %s (%d objects, %.1f MB read)", m.label, "verified" if result.ok else
             f"{len(failures)} FAILURE(S)", len(m.files), read / 1e6)
    return result


def _pg_verify_scratch(repo, m, pg_bin_dir, failures) -> str:
    from pgdr.pgbin import find_bin_dir
    from pgdr.restore import _pg_verifybackup, _unpack

    scratch = Path(tempfile.mkdtemp(prefix=f"pgdr-verify-{m.label}-", dir="/var/tmp"))
    try:
        bins = find_bin_dir(m.pg_major, pg_bin_dir, tool="pg_verifybackup")
        _unpack(repo, m, scratch)
        return _pg_verifybackup(bins, scratch, m.pg_major, checksums=True, parse_wal=m.wal_included)
    except PgdrError as e:
        failures.append(VerifyFailure(repo.key(m.label, "backup_manifest"), "pg_verifybackup", str(e)))
        return "failed"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def verify_wal(archive: WalArchive, backups: list[BackupManifest], incremental: bool = False) -> WalVerification:
    """Every archived segment's checksum, and continuity from the oldest backup's start to the newest segment.

    ``incremental``: read only segments newer than the last clean verification
    (continuity is still checked over the whole listing, which costs no reads).
    """
    import json

    failures, read, checked = [], 0, 0
    segs = archive.segments()
    marker_key = f"{archive.prefix}verified.json"
    through: dict = {}
    if incremental:
        try:
            through = json.loads(archive.storage.get_bytes(marker_key))
        except (ObjectNotFound, ValueError):
            through = {}
    for tli, items in segs.items():
        for segno, name in items:
            if name <= through.get(str(tli), ""):
                continue
            try:
                data, _, key = archive.read(name, allow_partial=False)
                read += len(data)
                checked += 1
            except KeyUnavailable:
                raise
            except PgdrError as e:
                failures.append(VerifyFailure(name, "segment", str(e)).to_dict())
                continue
            unlocked = check_lock(archive.storage, key)  # WAL: push time unknown here; locked, in the right mode
            if unlocked:
                failures.append(unlocked.to_dict())
    if backups:
        oldest = backups[0]
        tli = oldest.timeline
        have = {s for s, _ in segs.get(tli, [])}
        if have:
            for segno in range(segment_of(parse_lsn(oldest.start_lsn)), max(have) + 1):
                if segno not in have and not (oldest.wal_included and segno <= segment_of(parse_lsn(oldest.stop_lsn))):
                    failures.append(VerifyFailure(segment_name(tli, segno), "continuity",
                                                  "missing from the archive; point-in-time restore cannot cross it"
                                                  ).to_dict())
    if not failures:
        archive.storage.put_bytes(marker_key, json.dumps(
            {str(tli): items[-1][1] for tli, items in segs.items() if items}).encode())
    return WalVerification(ok=not failures, segments_checked=checked, bytes_read=read, failures=failures)


def last_verification(repo: Repository, label: str) -> dict | None:
    import json

    try:
        return json.loads(repo.storage.get_bytes(repo.key(label, RESULT)))
    except (ObjectNotFound, ValueError):
        return None


def run_verify(cluster, storage, which: str = "latest", pg_verify: bool = True, wal: bool = True) -> VerifyReport:
    repo = Repository(storage, cluster.name)
    backups = repo.backups()
    if which == "all":
        chosen = backups
    elif which == "new":  # not verified yet: what a new-backup trigger needs to read
        chosen = [m for m in backups if last_verification(repo, m.label) is None]
    else:
        chosen = [repo.resolve(which)]
    results = [verify_backup(repo, m, cluster.pg_bin_dir, pg_verify) for m in chosen]
    wal_result = verify_wal(WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level),
                            backups, incremental=which == "new") if wal else None
    read = sum(r.bytes_read for r in results) + (wal_result.bytes_read if wal_result else 0)
    ok = all(r.ok for r in results) and (wal_result is None or wal_result.ok)
    return VerifyReport(cluster=cluster.name, ok=ok, bytes_read=read, backups=[r.to_dict() for r in results],
                        wal=wal_result.to_dict() if wal_result else None)


__all__ = ["run_verify", "verify_backup", "verify_wal", "last_verification", "SEG_SIZE", "parse_segment"]
