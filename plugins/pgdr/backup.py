"""Physical backups: pg_basebackup's tar stream, compressed and hashed on
the way into the repository, never staged on local disk.

A backup is a full, or (PostgreSQL 17+, ``summarize_wal = on``) an
incremental on top of the newest backup: ``pg_basebackup --incremental`` with
that backup's own backup_manifest. Its label names its chain's full
(``20261125-020000F_20261126-020000I``), its manifest its parent and full.
Whatever cannot take an incremental falls back to a full and says why.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from pgdr.compression import SUFFIX, compress_stream
from pgdr.config import ClusterConfig
from pgdr.crypto import CIPHER, seal
from pgdr.errors import IntegrityError, LockedError, PgdrError, PostgresError
from pgdr.labels import check_label, chain_full, is_incremental, label_time, make_incr_label, make_label
from pgdr.lock import ClusterLock
from pgdr.lsn import parse_lsn
from pgdr.manifest import BackupManifest, StoredFile
from pgdr.pgbin import find_bin_dir
from pgdr.postgres import ConnInfo, server_info
from pgdr.repository import MANIFEST, Repository
from pgdr.results import JsonResult, iso, utcnow
from pgdr.storage import Storage
from pgdr.streams import CHUNK, ChunkDigests, ChunkReader, Prefetch, read_pipe
from pgdr.tarstream import TarWatcher

log = logging.getLogger(__name__)
PART_SIZE = 1 << 30  # raw bytes per stored part


@dataclass
class BackupResult(JsonResult):
    cluster: str
    label: str
    status: str  # "ok", or "already_exists" when this label was committed before
    repository: str
    pg_version: str
    system_identifier: str
    timeline: int
    start_lsn: str
    stop_lsn: str
    start_time: str
    stop_time: str
    size: int
    stored_size: int
    compression: str
    compression_ratio: float
    parts: int
    pg_file_count: int
    duration_seconds: float
    throughput_mb_s: float
    type: str = "full"  # full | incr
    parent: str | None = None  # incr: the backup it was taken on top of
    type_reason: str | None = None  # why this type (the policy's decision, or why an incremental fell back)

    @classmethod
    def from_manifest(cls, m: BackupManifest, repository: str, status: str) -> "BackupResult":
        from pgdr.results import parse_iso

        duration = max((parse_iso(m.stop_time) - parse_iso(m.start_time)).total_seconds(), 1e-6)
        return cls(
            cluster=m.cluster, label=m.label, status=status, repository=repository,
            pg_version=m.pg_version_text, system_identifier=m.system_identifier, timeline=m.timeline,
            start_lsn=m.start_lsn, stop_lsn=m.stop_lsn, start_time=m.start_time, stop_time=m.stop_time,
            size=m.size, stored_size=m.stored_size, compression=m.compression,
            compression_ratio=round(m.size / m.stored_size, 3) if m.stored_size else 0.0,
            parts=len(m.files), pg_file_count=m.pg_file_count,
            duration_seconds=round(duration, 3), throughput_mb_s=round(m.size / duration / 1e6, 1),
            type=m.type, parent=m.parent,
        )


def basebackup_command(bins, conn: ConnInfo, cluster: ClusterConfig, label: str,
                       incremental_from: str | None = None) -> list[str]:
    wal = "fetch" if cluster.backup_wal == "embed" else "none"
    cmd = [bins.tool("pg_basebackup"), "-D", "-", "-F", "t", "-X", wal, "-c", cluster.checkpoint,
           "--manifest-checksums=CRC32C", "-l", f"pgdr {cluster.name} {label}", "-w"]
    if incremental_from:
        cmd.append(f"--incremental={incremental_from}")
    if conn.dsn:
        cmd += ["-d", conn.dsn]
    return cmd


@dataclass
class TypeDecision:
    type: str  # full | incr
    parent: BackupManifest | None
    reason: str


def choose_type(requested: str, backups: list[BackupManifest], policy, now, support: tuple[bool, str],
                system_identifier: str | None = None, pg_major: int | None = None) -> TypeDecision:
    """full, or incr on top of the newest backup: ``requested`` is full | incr | auto (the config's policy)."""
    if requested == "full":
        return TypeDecision("full", None, "a full backup was asked for")
    if requested == "auto" and policy is None:
        return TypeDecision("full", None, "no backup_type_policy configured: every backup is a full")
    ok, why = support
    if not ok:
        return TypeDecision("full", None, f"falling back to a full backup: {why}")
    base = [b for b in backups if b.status == "ok" and b.type in ("full", "incr") and not b.label.endswith("S")
            and (system_identifier is None or b.system_identifier == system_identifier)
            and (pg_major is None or b.pg_major == pg_major)]
    if not base:
        return TypeDecision("full", None, "falling back to a full backup: no earlier backup of this cluster and "
                                          "PostgreSQL version to build an incremental on")
    parent = max(base, key=lambda b: (label_time(b.label), b.label))
    if requested == "auto":
        full_label = parent.full or parent.label
        chain = sum(1 for b in base if b.full == full_label)
        age = now - label_time(full_label)
        if chain >= policy.max_chain:
            return TypeDecision("full", None, f"policy: the chain from {full_label} already holds {chain} "
                                              f"incremental(s) (max_chain {policy.max_chain})")
        if age.total_seconds() >= policy.full_every_days * 86400:
            return TypeDecision("full", None, f"policy: the newest full {full_label} is {age.days} day(s) old "
                                              f"(full_every_days {policy.full_every_days})")
    return TypeDecision("incr", parent, f"incremental on top of {parent.label}")


def run_backup(cluster: ClusterConfig, conn: ConnInfo, storage: Storage, label: str | None = None,
               part_size: int = PART_SIZE, wal_timeout: float = 600, backup_type: str = "full") -> BackupResult:
    """``backup_type``: full, incr (on top of the newest backup), or auto (the cluster's backup_type_policy).
    ``label`` is the run's slot (``…F``); an incremental is named from it and its chain's full."""
    if backup_type not in ("full", "incr", "auto"):
        raise PgdrError(f"backup type {backup_type!r} is not full, incr or auto")
    if label and is_incremental(check_label(label)):
        raise PgdrError(f"{label}: give the slot's label (like 20261126-020000F); pgdr names incrementals itself")
    if backup_type == "full":
        return _run_backup(cluster, conn, storage, label, part_size, wal_timeout, None)
    slot = label_time(label) if label else utcnow()
    repo = Repository(storage, cluster.name)
    info = server_info(conn, psql_for(cluster))
    entries = repo.catalog()  # read once: every manifest is a request on S3, and a repository holds hundreds
    if label:
        # A retry of a slot that already produced a backup (full or incremental) returns it.
        done = [e.manifest for e in entries if e.manifest is not None and (
            e.label == label or (is_incremental(e.label) and e.label.endswith("_" + label[:15] + "I")))]
        if done:
            return _run_backup(cluster, conn, storage, done[-1].label, part_size, wal_timeout, None,
                               existing_only=True, info=info)
    from pgdr.incremental import incremental_support

    decision = choose_type(backup_type, repo.backups(entries), cluster.backup_type_policy, slot,
                           incremental_support(info), info.system_identifier, info.major)
    if decision.type == "full":
        log.info("backup of cluster %s: full (%s)", cluster.name, decision.reason)
        result = _run_backup(cluster, conn, storage, label, part_size, wal_timeout, None, info=info)
        result.type_reason = decision.reason
        return result
    parent = decision.parent
    full = chain_full(parent.full or parent.label)
    if label:
        incr_label = make_incr_label(full, slot)
    else:
        taken = {e.label for e in entries}
        incr_label = label_now(lambda now: make_incr_label(full, now), taken.__contains__)
    log.info("backup of cluster %s: incremental %s on top of %s", cluster.name, incr_label, parent.label)
    try:
        result = _run_backup(cluster, conn, storage, incr_label, part_size, wal_timeout, parent, info=info)
    except PostgresError as e:
        if "summar" not in str(e).lower() and "incremental" not in str(e).lower():
            raise
        why = f"pg_basebackup could not take an incremental on top of {parent.label} ({e})"
        log.warning("falling back to a full backup: %s", why)
        result = _run_backup(cluster, conn, storage, label, part_size, wal_timeout, None, info=info)
        result.type_reason = f"falling back to a full backup: {why}"
        return result
    result.type_reason = decision.reason
    return result


def psql_for(cluster: ClusterConfig) -> str | None:
    """The psql a backup asks the server with before pg_basebackup runs (postgres.server_info): the configured
    binaries', else the newest installed server package's. Not the one on PATH: on Debian that is a Perl
    wrapper, slower than what it saves. None: none found (the Python client asks)."""
    import glob
    import os

    from pgdr.pgbin import embedded_bin_dir

    if cluster.pg_bin_dir:
        dirs = [cluster.pg_bin_dir]
    else:
        packaged = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if d.split("/")[-2].isdigit()]
        dirs = sorted(packaged, key=lambda d: int(d.split("/")[-2]), reverse=True) + [embedded_bin_dir() or ""]
    for d in dirs:
        exe = os.path.join(d, "psql") if d else ""
        if exe and os.path.isfile(exe) and os.access(exe, os.X_OK):
            return exe
    return None


def label_now(make, taken, clock=utcnow, sleep=time.sleep) -> str:
    """The label of a backup asked for now, with no label given: ``make(now)``, waiting for the next second
    while that label is ``taken``. Labels are to the second (as pgBackRest's, which waits the same way): a
    second backup asked for within the second of the last one would otherwise be answered with that one,
    "already exists", holding nothing of what changed since. (A label given is a retry's: it answers with
    the backup already taken, on purpose.)"""
    label = make(clock())
    for _ in range(3):
        if not taken(label):
            break
        log.info("backup %s was taken within this second; waiting for the next second's label", label)
        sleep(1.001 - clock().microsecond / 1e6)
        label = make(clock())
    return label


def _parent_manifest(storage: Storage, repo: Repository, parent: BackupManifest, out) -> None:
    """The parent's own backup_manifest into ``out`` (a binary file), as pg_basebackup --incremental needs
    it, streamed (a cluster of a million files has a manifest of hundreds of MB); checked against pgdr's."""
    from pgdr.crypto import unseal

    name = "backup_manifest.enc" if parent.encryption else "backup_manifest"
    key = repo.key(parent.label, name)
    body = storage.get_stream(key)
    if parent.encryption:
        body = unseal(body, storage.keyring, f"{parent.label}/{name}", key)
    for chunk in body:
        out.write(chunk)
    out.flush()
    try:
        stop = max(parse_lsn(r["End-LSN"]) for r in wal_ranges(out))
    except IntegrityError as e:
        raise IntegrityError(f"{key}: {e}; take a full backup") from None
    if stop != parse_lsn(parent.stop_lsn):
        raise IntegrityError(f"{key} ends its WAL at a different LSN than backup {parent.label} "
                             f"({parent.stop_lsn}): refusing to build an incremental on it")


def _run_backup(cluster: ClusterConfig, conn: ConnInfo, storage: Storage, label: str | None,
                part_size: int, wal_timeout: float, parent: BackupManifest | None,
                existing_only: bool = False, info=None) -> BackupResult:
    info = info or server_info(conn, psql_for(cluster))
    if info.wal_level == "minimal":
        raise PostgresError("wal_level is 'minimal'; physical backups need 'replica' or 'logical' (restart required)")
    if info.tablespaces:
        raise PgdrError(
            f"cluster '{cluster.name}' has extra tablespaces ({', '.join(info.tablespaces)}); pgdr does not yet "
            "back up tablespaces outside the data directory and refuses rather than take an incomplete backup")
    from pgdr.wal import require_supported_segment_size

    # A backup whose WAL pgdr could not archive or replay is refused before anything is written.
    require_supported_segment_size(info.wal_segment_size, f"cluster '{cluster.name}'")
    bins = find_bin_dir(info.major, cluster.pg_bin_dir, tool="pg_basebackup")
    repo = Repository(storage, cluster.name)
    repo.check_identity(info.system_identifier, info.version_num)
    label = check_label(label) if label else label_now(make_label, lambda lb: storage.exists(repo.key(lb, MANIFEST)))

    with ClusterLock(storage, repo.lock_key, f"backup {label}") as lock:
        if storage.exists(repo.key(label, MANIFEST)):
            existing = repo.manifest(label)
            if existing.status == "waiting_for_wal":
                log.info("backup %s was taken earlier and waits for its WAL; waiting again", label)
                _wait_for_archived_wal(cluster, storage, existing, wal_timeout)
                existing.status = "ok"
                lock.renew()
                repo.commit(existing)
                return BackupResult.from_manifest(existing, storage.describe(), "ok")
            log.info("backup %s of cluster %s already exists and is committed; nothing to do", label, cluster.name)
            return BackupResult.from_manifest(existing, storage.describe(), "already_exists")
        if existing_only:
            raise PgdrError(f"backup {label} disappeared while this run looked at it; run it again")
        leftovers = repo.remove_unfinished(label)
        if leftovers:
            log.info("removed %d objects of an earlier unfinished attempt at backup %s", leftovers, label)
        try:
            manifest = _stream_backup(cluster, conn, storage, repo, bins, info, label, part_size, abort=lock.lost,
                                      parent=parent)
        except BaseException:
            if lock.lost.is_set():
                # Whoever holds the lock now may be writing this very label: delete nothing, commit nothing.
                raise LockedError(f"lost {repo.lock_key} during backup {label} ({lock.lost_reason}): pg_basebackup "
                                  "was stopped and nothing was committed; the partial objects are left for "
                                  "expire") from None
            log.error("backup %s failed; removing its partial objects", label)
            try:
                repo.remove_unfinished(label)
            except PgdrError as e:
                log.error("could not remove partial backup %s (it has no manifest, so it is never used): %s",
                          label, e)
            raise
        # Each commit comes right after a renewal: a lock that is not ours any more raises here, and one
        # that is cannot be taken over for the next STALE_AFTER.
        if not manifest.wal_included:
            manifest.status = "waiting_for_wal"
            lock.renew()
            repo.commit(manifest)  # visible as waiting, never offered for restore
            _wait_for_archived_wal(cluster, storage, manifest, wal_timeout)
            manifest.status = "ok"
        lock.renew()
        repo.commit(manifest)
    result = BackupResult.from_manifest(manifest, storage.describe(), "ok")
    log.info("backup %s of cluster %s committed: %.1f MB read, %.1f MB stored (%s), %.1f s, %.1f MB/s",
             label, cluster.name, result.size / 1e6, result.stored_size / 1e6, cluster.compression,
             result.duration_seconds, result.throughput_mb_s)
    return result


def _wait_for_archived_wal(cluster, storage, manifest: BackupManifest, timeout: float) -> None:
    """A backup without embedded WAL is complete only once its WAL, start to stop, is archived."""
    from pgdr.wal import WalArchive

    archive = WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level)
    start, stop = parse_lsn(manifest.start_lsn), parse_lsn(manifest.stop_lsn)
    deadline = time.monotonic() + timeout
    while True:
        missing = archive.missing_between(manifest.timeline, start, stop)
        if not missing:
            log.info("WAL %s..%s of backup %s is archived", manifest.start_lsn, manifest.stop_lsn, manifest.label)
            return
        if time.monotonic() > deadline:
            raise PgdrError(f"backup {manifest.label} stays incomplete: WAL {missing[0]}"
                            f"{' … ' + missing[-1] if len(missing) > 1 else ''} did not reach the archive within "
                            f"{timeout:.0f} s (is WAL capture running?)")
        time.sleep(1)


def _kill_when(abort, proc) -> threading.Event:
    """Kill proc the moment ``abort`` is set (the lock was lost), until the returned event is set."""
    done = threading.Event()

    def watch():
        while not done.is_set():
            if abort.wait(0.2):
                proc.kill()
                return

    if abort is not None:
        threading.Thread(target=watch, name="pgdr-backup-abort", daemon=True).start()
    return done


def _stream_backup(cluster, conn, storage, repo, bins, info, label, part_size, abort=None,
                   parent: BackupManifest | None = None) -> BackupManifest:
    # One random data key for the whole backup, wrapped by the keyring's newest master key;
    # asked for before pg_basebackup starts, so a missing key fails fast.
    data_key = storage.keyring.new_data_key() if storage.encrypt else None
    parent_file = None
    if parent is not None:
        parent_file = tempfile.NamedTemporaryFile(prefix="pgdr-parent-manifest-")
        try:
            _parent_manifest(storage, repo, parent, parent_file)
        except BaseException:
            parent_file.close()
            raise
    try:
        return _stream(cluster, conn, storage, repo, bins, info, label, part_size, abort, parent, data_key,
                       parent_file.name if parent_file else None)
    finally:
        if parent_file is not None:
            parent_file.close()


def store_parts(reader: ChunkReader, watcher: TarWatcher, repo: Repository, label: str, cluster: ClusterConfig,
                data_key, part_size: int = PART_SIZE, abort=None) -> list[StoredFile]:
    """A tar stream into the repository as a backup's parts: ``part_size`` raw bytes each, compressed, sealed
    when encrypting, with the SHA-256 of the whole part and of every few MiB as stored (restore checks each
    piece before using it). ``abort`` (an Event) stops it between chunks: a lost lock."""
    storage = repo.storage
    suffix = SUFFIX[cluster.compression]
    files: list[StoredFile] = []
    eof = False
    while not eof:
        stored = ChunkDigests()
        state = {"eof": False, "raw": 0}

        def raw_chunks():
            while state["raw"] < part_size:
                data = reader.read(min(CHUNK, part_size - state["raw"]))
                if abort is not None and abort.is_set():
                    raise LockedError(f"backup {label} aborted: its lock was lost")
                if not data:
                    state["eof"] = True
                    return
                watcher.feed(data)
                state["raw"] += len(data)
                yield data

        name = f"base.tar.{len(files):05d}{suffix}{'.enc' if data_key else ''}"
        key = repo.key(label, name)
        body = compress_stream(raw_chunks(), cluster.compression, cluster.compression_level)
        if data_key:
            body = seal(body, data_key, f"{label}/{name}")
        storage.put_stream(key, stored.tap(body), lock=True)
        eof = state["eof"]
        if state["raw"] == 0 and files:
            storage.delete(key)  # the stream ended exactly on a part boundary
            break
        files.append(StoredFile(name, state["raw"], stored.size, stored.hexdigest,
                                stored.chunk_size, stored.finish()))
        log.info("stored %s: %.1f MB -> %.1f MB", name, state["raw"] / 1e6, stored.size / 1e6)
    return files


def store_tar(chunks, repo: Repository, label: str, cluster: ClusterConfig, data_key, part_size: int = PART_SIZE,
              abort=None, watcher=None) -> tuple[list[StoredFile], TarWatcher]:
    """A backup's tar stream (chunks, read ahead in a thread) into the repository as its parts: the parts, and
    the TarWatcher that saw it (the caller closes it; or ``watcher``, what the stream's writer knows of it).
    The source is closed however this ends: a generator runs its cleanup at once (a local copy's session ends,
    and the server abandons the backup). LockedError if ``abort`` was set by the end."""
    prefetch = Prefetch(chunks, depth=16)
    watcher = TarWatcher() if watcher is None else watcher
    try:
        files = store_parts(ChunkReader(prefetch), watcher, repo, label, cluster, data_key, part_size, abort)
        if abort is not None and abort.is_set():  # set after the last chunk: the stream may have been cut short
            raise LockedError(f"backup {label} aborted: its lock was lost")
    except BaseException:
        watcher.close()
        raise
    finally:
        prefetch.close()
    return files, watcher


def wal_ranges(f) -> list[dict]:
    """The WAL-Ranges of a backup_manifest (a binary file object), read from its end, where PostgreSQL writes
    them: parsing the whole document would take gigabytes for a cluster of a million files."""
    f.seek(0, 2)
    f.seek(max(0, f.tell() - (1 << 20)))
    tail = f.read()
    at = tail.rfind(b'"WAL-Ranges"')
    try:
        ranges = json.loads(b"{" + tail[at:])["WAL-Ranges"] if at >= 0 else None
        if not ranges or not all(isinstance(r, dict) and {"Timeline", "Start-LSN", "End-LSN"} <= set(r)
                                 for r in ranges):
            raise ValueError("no WAL-Ranges at its end")
        for r in ranges:
            parse_lsn(r["Start-LSN"]), parse_lsn(r["End-LSN"]), int(r["Timeline"])
    except (ValueError, TypeError, KeyError) as e:
        raise IntegrityError(f"unreadable backup_manifest ({e})") from None
    return ranges


def store_backup_manifest(watcher: TarWatcher, repo: Repository, label: str, data_key) -> list[dict]:
    """The backup_manifest the tar stream carried, into the repository from its spool (sealed when encrypting):
    no size limit, never whole in memory. Returns its WAL-Ranges."""
    spool = watcher.spooled.get("backup_manifest")
    if spool is None:
        raise PgdrError("the backup's tar stream held no backup_manifest; PostgreSQL 13 or newer is required")
    ranges = wal_ranges(spool)
    spool.seek(0)
    body = iter(lambda: spool.read(CHUNK), b"")
    name = "backup_manifest.enc" if data_key else "backup_manifest"
    if data_key:
        body = seal(body, data_key, f"{label}/{name}")
    repo.storage.put_stream(repo.key(label, name), body, lock=True)
    return ranges


def _local_copy(cluster, conn, info, label, parent):
    """The LocalCopy of a full backup with ``backup_method: local``; None where pg_basebackup takes it."""
    if cluster.backup_method != "local":
        return None
    if parent is not None:
        log.info("backup %s: an incremental goes through pg_basebackup, whose server knows the changed blocks", label)
        return None
    from pgdr.localcopy import LocalCopy

    local = LocalCopy.open(conn, info, cluster.name, label, cluster.checkpoint, cluster.backup_wal == "embed")
    if local is None:
        log.info("backup %s: the server is a standby; backup_method local reads a primary's data directory, so "
                 "pg_basebackup takes this one", label)
    return local


def _stream_basebackup(cluster, conn, repo, bins, label, part_size, abort, data_key, parent_path):
    """pg_basebackup's tar stream into the repository: the stored parts and the TarWatcher that saw it."""
    cmd = basebackup_command(bins, conn, cluster, label, parent_path)
    log.info("backup %s of cluster %s: streaming pg_basebackup (PostgreSQL %s, %s) from %s into %s",
             label, cluster.name, bins.version, bins.path, conn.describe(), repo.storage.describe())
    with tempfile.TemporaryFile() as errfile:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errfile, env=conn.process_env())
        stop_on_abort = _kill_when(abort, proc)
        try:
            files, watcher = store_tar(read_pipe(proc.stdout), repo, label, cluster, data_key, part_size, abort)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            stop_on_abort.set()
        if abort is not None and abort.is_set():  # set while pg_basebackup was waited for: killed
            watcher.close()
            raise LockedError(f"backup {label} aborted: its lock was lost")
        errfile.seek(0)
        stderr = errfile.read().decode(errors="replace").strip()
    if rc != 0:
        tail = "\n".join(stderr.splitlines()[-5:]) or "(no output)"
        raise PostgresError(f"pg_basebackup failed with exit code {rc}: {tail}")
    return files, watcher


def _stream(cluster, conn, storage, repo, bins, info, label, part_size, abort, parent, data_key,
            parent_path) -> BackupManifest:
    start = utcnow()
    local = _local_copy(cluster, conn, info, label, parent)
    if local is not None:
        log.info("backup %s of cluster %s: reading the data directory %s directly (PostgreSQL %s) into %s",
                 label, cluster.name, local.datadir, info.version, storage.describe())
        files, watcher = store_tar(local.chunks(), repo, label, cluster, data_key, part_size, abort,
                                   watcher=local.watcher)
    else:
        files, watcher = _stream_basebackup(cluster, conn, repo, bins, label, part_size, abort, data_key,
                                            parent_path)
    try:
        ranges = store_backup_manifest(watcher, repo, label, data_key)
    finally:
        watcher.close()
    first = min(ranges, key=lambda r: parse_lsn(r["Start-LSN"]))
    last = max(ranges, key=lambda r: parse_lsn(r["End-LSN"]))
    stop = utcnow()
    return BackupManifest(
        cluster=cluster.name, label=label, type="incr" if parent else "full", status="ok",
        parent=parent.label if parent else None, full=chain_full(label) if parent else None,
        pg_version=info.version_num, pg_version_text=info.version,
        system_identifier=info.system_identifier, timeline=int(last["Timeline"]),
        start_lsn=first["Start-LSN"], stop_lsn=last["End-LSN"],
        start_time=iso(start), stop_time=iso(stop),
        compression=cluster.compression, compression_level=cluster.compression_level,
        files=files, pg_file_count=watcher.members,
        size=sum(f.size for f in files), stored_size=sum(f.stored_size for f in files),
        wal_included=cluster.backup_wal == "embed", databases=list(info.databases),
        encryption={"cipher": CIPHER, "key_id": data_key.key_id} if data_key else None,
    )
