"""The safety backup taken before a confirmed restore replaces a data directory.

Whatever is in the directory is stopped (if it runs), streamed as a compressed
tar into the repository under ``<cluster>/safety/``, checked, and only then
removed. The object's key is named in the restore's result and audit record.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pgdr.compression import SUFFIX, compress_stream
from pgdr.crypto import seal
from pgdr.errors import PgdrError
from pgdr.lock import pid_alive
from pgdr.pgbin import as_user, find_bin_dir
from pgdr.results import JsonResult, utcnow
from pgdr.storage import Storage
from pgdr.streams import Digest, read_pipe

log = logging.getLogger(__name__)


@dataclass
class SafetyBackup(JsonResult):
    key: str
    pgdata: str
    size: int
    stored_size: int
    sha256: str
    stopped_server: bool


def _running_pid(pgdata: Path) -> int | None:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def take_safety_backup(storage: Storage, cluster: str, pgdata: Path, owner: str | None,
                       pg_bin_dir: str | None = None, compression: str = "zstd", level: int = 3) -> SafetyBackup:
    pgdata = Path(pgdata)
    data_key = storage.keyring.new_data_key() if storage.encrypt else None  # fails before anything is stopped
    stopped = False
    if _running_pid(pgdata):
        major = int((pgdata / "PG_VERSION").read_text().strip())
        bins = find_bin_dir(major, pg_bin_dir, tool="pg_ctl", exact=True)
        log.warning("stopping the PostgreSQL server running in %s before replacing it", pgdata)
        user = owner if os.geteuid() == 0 else None
        proc = subprocess.run(as_user([bins.tool("pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "-t", "120",
                                       "stop"], user), capture_output=True, text=True)
        if proc.returncode != 0:
            raise PgdrError(f"cannot stop the server in {pgdata}: {proc.stderr.strip()}")
        stopped = True
    key = (f"{cluster}/safety/{utcnow().strftime('%Y%m%dT%H%M%SZ')}-{pgdata.name}.tar{SUFFIX[compression]}"
           f"{'.enc' if data_key else ''}")
    raw, stored = Digest(), Digest()
    with tempfile.TemporaryFile() as errfile:
        tar = subprocess.Popen(["tar", "-c", "-f", "-", "-C", str(pgdata), "."], stdout=subprocess.PIPE,
                               stderr=errfile)
        try:
            body = compress_stream(raw.tap(read_pipe(tar.stdout)), compression, level)
            storage.put_stream(key, stored.tap(seal(body, data_key, key.rsplit("/", 1)[-1]) if data_key else body), lock=True)
        finally:
            rc = tar.wait()
        if rc != 0:
            storage.delete(key)
            errfile.seek(0)
            raise PgdrError(f"safety backup of {pgdata} failed: {errfile.read().decode(errors='replace')[-500:]}")
    log.info("safety backup of %s stored as %s (%.1f MB)", pgdata, key, stored.size / 1e6)
    for entry in pgdata.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return SafetyBackup(key, str(pgdata), raw.size, stored.size, stored.hexdigest, stopped)
