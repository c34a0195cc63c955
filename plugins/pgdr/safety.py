"""The safety backup taken before a confirmed restore replaces a data directory.

It is a real pgdr backup of what the destination holds, in the catalog like
any other (``<cluster>/backup/<label>S/``, manifest type ``safety``): listed by
``pgdr list``, restored with ``pgdr restore --backup <label>``, expired by the
retention policy once older than the recovery window. It carries its own WAL
and is never a base for replaying the cluster's archived WAL (``latest`` and
point-in-time planning skip it).

- A running server is backed up online, untouched: ``pg_basebackup`` as the
  data directory's owner over the server's own unix socket (WAL fetched into
  the backup, PostgreSQL's ``backup_manifest`` included).
- A stopped data directory is copied cold (a tar of its files, pid file aside).

Every stored part is read back and its SHA-256 compared before the manifest is
committed; only then may the caller stop and empty the destination.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pgdr.config import ClusterConfig
from pgdr.backup import PART_SIZE, store_backup_manifest, store_tar
from pgdr.crypto import CIPHER
from pgdr.errors import IntegrityError, PgdrError, RestoreRefused
from pgdr.labels import make_label
from pgdr.lsn import parse_lsn
from pgdr.manifest import BackupManifest, StoredFile
from pgdr.pgbin import as_user, find_bin_dir, reachable_by
from pgdr.repository import MANIFEST, Repository
from pgdr.results import JsonResult, iso, utcnow
from pgdr.server import pid_file_lines, running_pid
from pgdr.storage import Storage
from pgdr.streams import Digest, read_pipe
from pgdr.tarstream import TarWatcher

log = logging.getLogger(__name__)
# Left out of a cold copy: the pid file, and a backup_manifest left by an earlier restore (it describes that
# backup, not this copy; pg_basebackup leaves it out of online backups for the same reason).
SKIP = ("postmaster.pid", "postmaster.opts", "backup_manifest")


@dataclass
class SafetyBackup(JsonResult):
    label: str
    pgdata: str
    method: str  # "pg_basebackup (server running)" | "cold copy (server stopped)"
    server_was_running: bool
    size: int
    stored_size: int
    parts: int
    checked: str


@dataclass
class DataDirInfo:
    major: int
    version_num: int
    version_text: str
    system_identifier: str
    timeline: int
    checkpoint_lsn: str
    redo_lsn: str


def inspect_data_dir(pgdata: Path, pg_bin_dir: str | None) -> DataDirInfo:
    """What pg_controldata says of ``pgdata``; RestoreRefused if it is not a PostgreSQL data directory."""
    try:
        major = int((pgdata / "PG_VERSION").read_text().strip().split(".")[0])
    except (OSError, ValueError):
        raise RestoreRefused(f"{pgdata} holds files but no PostgreSQL data directory (no readable PG_VERSION); "
                             "pgdr only replaces data directories: empty it yourself if it really must go; "
                             "nothing was touched") from None
    bins = find_bin_dir(major, pg_bin_dir, tool="pg_controldata", exact=True)
    proc = subprocess.run([bins.tool("pg_controldata"), "-D", str(pgdata)], capture_output=True, text=True,
                          env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    if proc.returncode != 0:
        raise RestoreRefused(f"pg_controldata cannot read {pgdata}: {proc.stderr.strip()}; refusing to replace a "
                             "data directory whose identity is unknown; nothing was touched")
    fields = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    m = re.search(r"(\d+)(?:\.(\d+))?", bins.version)
    try:
        return DataDirInfo(
            major=major, version_num=int(m.group(1)) * 10000 + int(m.group(2) or 0), version_text=bins.version,
            system_identifier=fields["Database system identifier"],
            timeline=int(fields["Latest checkpoint's TimeLineID"]),
            checkpoint_lsn=fields["Latest checkpoint location"],
            redo_lsn=fields["Latest checkpoint's REDO location"])
    except (KeyError, ValueError, AttributeError) as e:
        raise RestoreRefused(f"pg_controldata output for {pgdata} lacks {e}; nothing was touched") from None


def _safety_label(repo: Repository) -> str:
    now = utcnow()
    for _ in range(120):
        label = make_label(now, "S")
        if not repo.storage.list(repo.backup_prefix(label)):
            return label
        from datetime import timedelta

        now += timedelta(seconds=1)
    raise PgdrError("no free safety backup label in the next two minutes")


def take_safety_backup(cluster: ClusterConfig, storage: Storage, pgdata: Path, owner: str | None,
                       info: DataDirInfo | None = None) -> SafetyBackup:
    """Back up what ``pgdata`` holds as a committed, checked pgdr backup; touches nothing in ``pgdata``."""
    pgdata = Path(pgdata)
    info = info or inspect_data_dir(pgdata, cluster.pg_bin_dir)
    repo = Repository(storage, cluster.name)
    data_key = storage.keyring.new_data_key() if storage.encrypt else None  # fails before anything runs
    label = _safety_label(repo)
    pid = running_pid(pgdata)
    user = owner if os.geteuid() == 0 else None
    start = utcnow()
    try:
        if pid:
            cmd, method = _basebackup_command(cluster, pgdata, info, user, label), "pg_basebackup (server running)"
        else:
            entries = sorted(e for e in os.listdir(pgdata) if e not in SKIP)
            cmd, method = ["tar", "-c", "-f", "-", "--format=gnu", "-C", str(pgdata), "--", *entries], \
                "cold copy (server stopped)"
        log.info("safety backup %s of %s: %s", label, pgdata, method)
        files, watcher = _store_stream(cmd, repo, label, cluster, data_key)
        if pid:
            try:
                ranges = store_backup_manifest(watcher, repo, label, data_key)
            finally:
                watcher.close()
            start_lsn = min((r["Start-LSN"] for r in ranges), key=parse_lsn)
            stop_lsn = max((r["End-LSN"] for r in ranges), key=parse_lsn)
            timeline = int(max(ranges, key=lambda r: parse_lsn(r["End-LSN"]))["Timeline"])
        else:
            watcher.close()
            start_lsn, stop_lsn, timeline = info.redo_lsn, info.checkpoint_lsn, info.timeline
        checked = _check_stored(repo, label, files)
        manifest = BackupManifest(
            cluster=cluster.name, label=label, type="safety", status="ok", pg_version=info.version_num,
            pg_version_text=info.version_text, system_identifier=info.system_identifier, timeline=timeline,
            start_lsn=start_lsn, stop_lsn=stop_lsn, start_time=iso(start), stop_time=iso(utcnow()),
            compression=cluster.compression, compression_level=cluster.compression_level, files=files,
            pg_file_count=watcher.members, size=sum(f.size for f in files),
            stored_size=sum(f.stored_size for f in files), wal_included=True, databases=[],
            encryption={"cipher": CIPHER, "key_id": data_key.key_id} if data_key else None)
        repo.commit(manifest)  # the commit point: from here on it is a backup like any other
    except BaseException:
        try:
            if not storage.exists(repo.key(label, MANIFEST)):
                repo.remove_unfinished(label)
        except PgdrError as e:
            log.error("could not remove the unfinished safety backup %s (it has no manifest, so it is never "
                      "used): %s", label, e)
        raise
    result = SafetyBackup(label, str(pgdata), method, bool(pid), manifest.size, manifest.stored_size, len(files),
                          checked)
    log.info("safety backup %s of %s committed and checked: %.1f MB stored in %d part(s)", label, pgdata,
             manifest.stored_size / 1e6, len(files))
    return result


def _basebackup_command(cluster, pgdata: Path, info: DataDirInfo, user: str | None, label: str) -> list[str]:
    """pg_basebackup of the server running in pgdata, as its owner, over its own unix socket."""
    lines = pid_file_lines(pgdata)
    port = lines[3].strip() if len(lines) > 3 else ""
    sockdir = lines[4].strip() if len(lines) > 4 else ""
    if not port.isdigit():
        raise RestoreRefused(f"cannot tell the port of the server running in {pgdata} from its postmaster.pid; "
                             "nothing was touched")
    bins = reachable_by(find_bin_dir(info.major, cluster.pg_bin_dir, tool="pg_basebackup"), user)
    host = sockdir if sockdir.startswith("/") else "127.0.0.1"
    return as_user([bins.tool("pg_basebackup"), "-D", "-", "-F", "t", "-X", "fetch", "-c", "fast",
                    "--manifest-checksums=CRC32C", "-l", f"pgdr safety {label}", "-w",
                    "-d", f"host={host} port={port} dbname=postgres"], user)


def _store_stream(cmd: list[str], repo: Repository, label: str, cluster, data_key,
                  part_size: int = PART_SIZE) -> tuple[list[StoredFile], TarWatcher]:
    """A tar stream from ``cmd`` into the repository as parts, as ``pgdr backup`` stores them."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "PGCONNECT_TIMEOUT": "10"}
    with tempfile.TemporaryFile() as errfile:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errfile, stdin=subprocess.DEVNULL, env=env)
        try:
            files, watcher = store_tar(read_pipe(proc.stdout), repo, label, cluster, data_key, part_size)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        errfile.seek(0)
        stderr = errfile.read().decode(errors="replace").strip()
    if rc != 0:
        tool = "pg_basebackup" if any(c.endswith("pg_basebackup") for c in cmd) else "tar"
        raise PgdrError(f"safety backup failed ({tool} exit {rc}): "
                        + ("; ".join(stderr.splitlines()[-5:]) or "(no output)") + "; nothing was touched")
    return files, watcher


def _check_stored(repo: Repository, label: str, files: list[StoredFile]) -> str:
    """Read every stored part back: the repository must hold exactly the bytes that were sent."""
    for f in files:
        d = Digest()
        for _ in d.tap(repo.storage.get_stream(repo.key(label, f.name))):
            pass
        if d.size != f.stored_size or d.hexdigest != f.sha256:
            raise IntegrityError(f"safety backup {label}: {f.name} read back as {d.size} bytes, sha256 {d.hexdigest}; "
                                 f"{f.stored_size} bytes, {f.sha256} were stored; nothing was touched")
    return f"ok ({len(files)} part(s) read back, SHA-256 equal)"
