"""``pgdr verify``: prove that stored backups and WAL are what the manifests say.

For a backup: every stored object exists, its size and SHA-256 (per chunk of
a few MiB, each checked before use) match the manifest, it decrypts and
decompresses, every tar member is one a restore accepts, and PostgreSQL's own
``pg_verifybackup`` accepts it, unpacked into a scratch directory in the same
pass. In an encrypted repository manifest.json and verify.json are
authenticated (pgdr.crypto.sign_record). For the WAL: the archive is continuous
from each verified backup's start on, and every segment's checksum holds.
Each backup's result is recorded next to it (``verify.json``) and shown by
``list``/``info``; every failure names the object and the check.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pgdr import __version__
from pgdr.crypto import KeyUnavailable
from pgdr.errors import IntegrityError, ObjectNotFound, PgdrError
from pgdr.lsn import parse_lsn
from pgdr.manifest import BackupManifest
from pgdr.pgbin import find_bin_dir
from pgdr.repository import MANIFEST, Repository
from pgdr.results import JsonResult, iso, utcnow
from pgdr.tarstream import TarChecker, TarExtractor
from pgdr.unpack import VerifiedObject, part_content, pg_verifybackup, require_key
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
    """One pass over the backup's objects: each piece checked against the manifest before it is decrypted,
    decompressed and (with ``pg_verify``) unpacked into a scratch directory for ``pg_verifybackup``."""
    from pgdr.results import parse_iso

    failures: list[VerifyFailure] = []
    require_key(repo, m)  # a missing or wrong key stops here, naming the key id
    stored = {o.key: o.size for o in repo.storage.list(repo.backup_prefix(m.label))}
    read = 0
    chain = None
    if m.type == "incr":
        # An incremental is only as good as its chain: every link must be there and fit.
        from pgdr.incremental import chain_of

        try:
            chain = chain_of(repo, m)
        except PgdrError as e:
            failures.append(VerifyFailure(repo.key(m.parent or m.label, MANIFEST), "chain", str(e)))
    # An incremental's own tar is not a data directory: its objects are checked here, then the whole chain is
    # applied in a scratch directory for pg_verifybackup.
    scratch = Path(tempfile.mkdtemp(prefix=f"pgdr-verify-{m.label}-", dir="/var/tmp")) \
        if pg_verify and m.type != "incr" else None
    tar = TarExtractor(scratch) if scratch else TarChecker()  # the restore's rules for every member, either way
    try:
        for f in m.files:
            key = repo.key(m.label, f.name)
            if key not in stored:
                failures.append(VerifyFailure(key, "exists", "the object is missing"))
                continue
            if stored[key] != f.stored_size:
                failures.append(VerifyFailure(key, "size", f"{stored[key]} bytes stored, the manifest says "
                                              f"{f.stored_size}"))
            unlocked = check_lock(repo.storage, key, parse_iso(m.start_time))
            if unlocked:
                failures.append(unlocked)
            obj = VerifiedObject(repo.storage, key, f)
            size, intact = 0, not failures  # once the tar stream is broken, later parts are only checked
            try:
                for chunk in part_content(repo, m, f, obj):
                    size += len(chunk)
                    if intact:
                        try:
                            tar.feed(chunk)
                        except IntegrityError as e:
                            e.check = "unpack"
                            raise
            except KeyUnavailable:
                raise
            except PgdrError as e:
                failures.append(VerifyFailure(key, getattr(e, "check", "decompress"), str(e)))
                continue
            except OSError as e:
                raise PgdrError(f"cannot unpack backup {m.label} into the scratch directory {scratch}: {e}") from e
            finally:
                read += obj.bytes_read
            if size != f.size:
                failures.append(VerifyFailure(key, "content_size", f"decompresses to {size} bytes, not {f.size}"))
        if not failures:
            try:
                tar.close()
            except IntegrityError as e:
                failures.append(VerifyFailure(repo.key(m.label, m.files[-1].name if m.files else MANIFEST),
                                              "unpack", str(e)))
        unlocked = check_lock(repo.storage, repo.key(m.label, MANIFEST), parse_iso(m.start_time))
        if unlocked:
            failures.append(unlocked)
        pg_result = "skipped"
        if pg_verify and chain and not failures:
            scratch = Path(tempfile.mkdtemp(prefix=f"pgdr-verify-{m.label}-", dir="/var/tmp"))
            try:
                from pgdr.incremental import restore_chain

                read += restore_chain(repo, chain, scratch)
            except KeyUnavailable:
                raise
            except PgdrError as e:
                failures.append(VerifyFailure(repo.key(m.label, MANIFEST), "chain_restore",
                                              f"applying the chain {' -> '.join(c.label for c in chain)}: {e}"))
        if scratch and not failures:
            try:
                bins = find_bin_dir(m.pg_major, pg_bin_dir, tool="pg_verifybackup")
                pg_result = pg_verifybackup(bins, scratch, m.pg_major, checksums=True, parse_wal=m.wal_included)
            except PgdrError as e:
                failures.append(VerifyFailure(repo.key(m.label, "backup_manifest"), "pg_verifybackup", str(e)))
                pg_result = "failed"
    finally:
        if isinstance(tar, TarExtractor):
            tar.release()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    result = BackupVerification(label=m.label, ok=not failures, verified_at=iso(utcnow()), tool_version=__version__,
                                objects_checked=len(m.files), bytes_read=read, pg_verifybackup=pg_result,
                                failures=[f.to_dict() for f in failures])
    key = repo.key(m.label, RESULT)
    repo.storage.put_bytes(key, json.dumps(repo.sign(result.to_dict(), key), indent=2).encode())
    log.info("backup %s: %s (%d objects, %.1f MB read)", m.label, "verified" if result.ok else
             f"{len(failures)} FAILURE(S)", len(m.files), read / 1e6)
    return result


def unreadable_backup(repo: Repository, label: str, error: str) -> BackupVerification:
    """A committed backup whose manifest.json cannot be trusted (fails authentication, unreadable)."""
    return BackupVerification(label=label, ok=False, verified_at=iso(utcnow()), tool_version=__version__,
                              objects_checked=0, bytes_read=0, pg_verifybackup="skipped",
                              failures=[VerifyFailure(repo.key(label, MANIFEST), "manifest", error).to_dict()])


def verify_wal(archive: WalArchive, backups: list[BackupManifest], incremental: bool = False) -> WalVerification:
    """Every archived segment's checksum, and continuity from the oldest backup's start to the newest segment.

    ``incremental``: read only segments newer than the last clean verification
    (continuity is still checked over the whole listing, which costs no reads).
    """

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
    """The last ``verify.json`` of a backup, None when never verified. One that fails authentication (or
    cannot be read) is reported as a failed verification naming it, with ``"authenticated": false``."""
    key = repo.key(label, RESULT)
    try:
        record = json.loads(repo.storage.get_bytes(key))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        try:
            repo.check_record(record, key, f"{RESULT} of backup {label}")
        except KeyUnavailable:  # pgdr list without the key: shown, marked as not checked
            return {**record, "authenticated": None}
        return record
    except ObjectNotFound:
        return None
    except (ValueError, IntegrityError) as e:
        return {"ok": False, "verified_at": None, "tool_version": None, "authenticated": False,
                "failures": [VerifyFailure(key, "authentication" if isinstance(e, IntegrityError) else "unreadable",
                                           str(e)).to_dict()]}


def run_verify(cluster, storage, which: str = "latest", pg_verify: bool = True, wal: bool = True) -> VerifyReport:
    repo = Repository(storage, cluster.name)
    entries = repo.catalog()
    backups = [e.manifest for e in entries if e.manifest is not None and e.manifest.status == "ok"]
    # A manifest that fails authentication or cannot be read is a failure of its own, never skipped quietly.
    damaged = [] if which not in ("all", "new") else [
        unreadable_backup(repo, e.label, e.error) for e in entries
        if e.manifest is None and not (e.error or "").startswith("unfinished")]
    if which == "all":
        chosen = backups
    elif which == "new":  # not verified yet (or its record is not authentic): what a new-backup trigger reads
        chosen = []
        for m in backups:
            v = last_verification(repo, m.label)
            if v is None or v.get("authenticated") is False:
                chosen.append(m)
    else:
        chosen = [repo.resolve(which)]
    results = damaged + [verify_backup(repo, m, cluster.pg_bin_dir, pg_verify) for m in chosen]
    wal_result = verify_wal(WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level),
                            backups, incremental=which == "new") if wal else None
    read = sum(r.bytes_read for r in results) + (wal_result.bytes_read if wal_result else 0)
    ok = all(r.ok for r in results) and (wal_result is None or wal_result.ok)
    return VerifyReport(cluster=cluster.name, ok=ok, bytes_read=read, backups=[r.to_dict() for r in results],
                        wal=wal_result.to_dict() if wal_result else None)


__all__ = ["run_verify", "verify_backup", "verify_wal", "last_verification", "SEG_SIZE", "parse_segment"]
