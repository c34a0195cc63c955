"""Continuous WAL capture by streaming: pg_receivewal on a replication slot,
every completed segment archived, and the segment being written uploaded every
few seconds, so the data at risk is seconds, not a 16 MiB segment.

Stop and start it at will: the slot keeps the server's WAL in between, and
pg_receivewal resumes from the spool directory or, if that is gone, from the
slot. Segments seen twice are archived once (same content: nothing to do).
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pgdr.config import ClusterConfig
from pgdr.errors import PgdrError, PostgresError
from pgdr.lsn import format_lsn, parse_lsn
from pgdr.pgbin import find_bin_dir
from pgdr.postgres import ConnInfo, connect, server_info
from pgdr.results import JsonResult, iso, utcnow
from pgdr.storage import Storage
from pgdr.wal import HISTORY, SEG_SIZE, SEGMENT, WalArchive, parse_segment

log = logging.getLogger(__name__)


def slot_name(cluster: str) -> str:
    return f"pgdr_{cluster}"


@dataclass
class SlotInfo(JsonResult):
    name: str
    exists: bool
    wal_status: str | None = None
    restart_lsn: str | None = None
    retained_bytes: int | None = None


@dataclass
class StreamResult(JsonResult):
    cluster: str
    slot: str
    started_at: str
    stopped_at: str
    stopped_because: str
    segments_archived: int
    segments_already_archived: int
    partial_uploads: int
    server_lsn: str
    archived_lsn: str | None
    lag_bytes: int | None
    slot_retained_bytes: int | None


def slot_info(conn: ConnInfo, slot: str) -> SlotInfo:
    with connect(conn) as c:
        row = c.execute(
            "select wal_status, restart_lsn::text, pg_current_wal_lsn() - restart_lsn "
            "from pg_replication_slots where slot_name = %s", (slot,)).fetchone()
    if row is None:
        return SlotInfo(slot, False)
    return SlotInfo(slot, True, row[0], row[1], int(row[2]) if row[2] is not None else None)


def _die_with_parent():
    """Run in the child: if pgdr is killed, pg_receivewal goes too (Linux)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class WalStreamer:
    def __init__(self, cluster: ClusterConfig, conn: ConnInfo, storage: Storage, spool: Path,
                 partial_interval: float = 5.0):
        self.cluster = cluster
        self.conn = conn
        self.spool = Path(spool)
        self.partial_interval = partial_interval
        self.archive = WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level)
        self.slot = slot_name(cluster.name)
        self.archived = self.already = self.partials = 0
        self._last_partial: tuple | None = None
        self._progress: int | None = None  # newest LSN known to be in the archive
        self._uploaded_partial: str | None = None

    def ensure_slot(self, bins) -> SlotInfo:
        info = slot_info(self.conn, self.slot)
        if info.exists and info.wal_status == "lost":
            raise PgdrError(
                f"replication slot {self.slot} was invalidated (max_slot_wal_keep_size): WAL is missing from the "
                "archive since it fell behind; take a new full backup, then drop and recreate the slot "
                f"(select pg_drop_replication_slot('{self.slot}'))")
        if not info.exists:
            cmd = [bins.tool("pg_receivewal"), "--create-slot", "--if-not-exists", "-S", self.slot, "-w"]
            if self.conn.dsn:
                cmd += ["-d", self.conn.dsn]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=self.conn.process_env())
            if proc.returncode != 0:
                raise PostgresError(f"cannot create replication slot {self.slot}: {proc.stderr.strip()}")
            log.info("created physical replication slot %s", self.slot)
            info = slot_info(self.conn, self.slot)
        return info

    def sweep(self) -> None:
        """Archive every completed file in the spool, then forget it locally."""
        newest = None
        for path in sorted(self.spool.iterdir()):
            if not (SEGMENT.match(path.name) or HISTORY.match(path.name)):
                continue
            result = self.archive.push(path)
            if result.status == "archived":
                self.archived += 1
            else:
                self.already += 1
            if SEGMENT.match(path.name):
                self.archive.remove_partial(path.name)
                tli, segno = parse_segment(path.name)
                newest = max(newest or 0, (segno + 1) * SEG_SIZE)
            path.unlink()
        if newest is not None:
            self._note_progress(newest)

    def _note_progress(self, lsn: int) -> None:
        """Record the archive's reach; it never moves backwards (a partial may trail a finished segment)."""
        self._progress = max(lsn, self._progress or 0)
        self.archive.note_progress(self._progress)

    def upload_partial(self, force: bool = False) -> None:
        partial = sorted(self.spool.glob("*.partial"))
        if not partial:
            return
        path = partial[-1]
        stat = path.stat()
        state = (path.name, stat.st_size, stat.st_mtime_ns)
        if state == self._last_partial and not force:
            return
        # What the server knows pg_receivewal has flushed, read BEFORE the file: the
        # copy we upload holds at least this much.
        info = slot_info(self.conn, self.slot)
        safe = parse_lsn(info.restart_lsn) if info.restart_lsn else 0
        self.archive.push_partial(path, safe)
        self._note_progress(safe)
        self._last_partial = state
        self.partials += 1

    def run(self, duration: float | None = None, stop: threading.Event | None = None) -> StreamResult:
        info = server_info(self.conn)
        bins = find_bin_dir(info.major, self.cluster.pg_bin_dir, tool="pg_receivewal")
        self.archive._check_identity(info.system_identifier)
        self.ensure_slot(bins)
        self._progress = self.archive.newest_lsn()  # one listing here, none per upload
        self.spool.mkdir(parents=True, exist_ok=True)
        started = utcnow()
        self.sweep()  # whatever an earlier run left behind
        cmd = [bins.tool("pg_receivewal"), "-D", str(self.spool), "-S", self.slot, "--synchronous", "-n", "-w"]
        if self.conn.dsn:
            cmd += ["-d", self.conn.dsn]
        log.info("streaming WAL of cluster %s from %s on slot %s into %s (spool %s)%s", self.cluster.name,
                 self.conn.describe(), self.slot, self.archive.storage.describe(), self.spool,
                 f" for {duration:.0f} s" if duration else "")
        stop = stop or threading.Event()
        deadline = time.monotonic() + duration if duration else None
        because = "duration reached"
        with tempfile.TemporaryFile() as errfile:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errfile, env=self.conn.process_env(),
                                    preexec_fn=_die_with_parent)
            try:
                next_partial = 0.0
                while True:
                    if stop.is_set():
                        because = "stopped"
                        break
                    if deadline and time.monotonic() >= deadline:
                        break
                    if proc.poll() is not None:
                        because = f"pg_receivewal exited with code {proc.returncode}"
                        break
                    self.sweep()
                    if time.monotonic() >= next_partial:
                        self.upload_partial()
                        next_partial = time.monotonic() + self.partial_interval
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)  # pg_receivewal flushes and exits
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            self.sweep()
            self.upload_partial(force=True)
            errfile.seek(0)
            stderr = errfile.read().decode(errors="replace").strip()
        if because.startswith("pg_receivewal exited"):
            raise PostgresError(f"{because}: {stderr[-1000:] or '(no output)'}")
        return self.report(started, because)

    def report(self, started, because: str) -> StreamResult:
        with connect(self.conn) as c:
            server_lsn = c.execute("select pg_current_wal_lsn()::text").fetchone()[0]
        archived = self.archive.newest_lsn()
        slot = slot_info(self.conn, self.slot)
        lag = max(parse_lsn(server_lsn) - archived, 0) if archived is not None else None
        result = StreamResult(
            cluster=self.cluster.name, slot=self.slot, started_at=iso(started), stopped_at=iso(utcnow()),
            stopped_because=because, segments_archived=self.archived, segments_already_archived=self.already,
            partial_uploads=self.partials, server_lsn=server_lsn,
            archived_lsn=format_lsn(archived) if archived is not None else None, lag_bytes=lag,
            slot_retained_bytes=slot.retained_bytes)
        log.info("WAL streaming of %s stopped (%s): %d segments archived, %d partial uploads, lag %s bytes",
                 self.cluster.name, because, self.archived, self.partials, lag)
        return result


@dataclass
class WalLagReport(JsonResult):
    cluster: str
    ok: bool
    server_lsn: str
    archived_lsn: str | None
    lag_bytes: int | None
    lag_seconds: float | None
    rpo_seconds: int
    archive_updated_at: str | None
    slot: dict | None
    problems: list


def measure_lag(cluster: ClusterConfig, conn: ConnInfo, storage: Storage) -> WalLagReport:
    """Primary's current LSN against the newest LSN safely in the repository, and the slot's health."""
    from pgdr.results import parse_iso

    archive = WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level)
    with connect(conn) as c:
        server_lsn = c.execute("select pg_current_wal_lsn()::text").fetchone()[0]
    archived = archive.newest_lsn()
    progress = archive.progress() or {}
    lag_bytes = max(parse_lsn(server_lsn) - archived, 0) if archived is not None else None
    lag_seconds = None
    if lag_bytes == 0:
        lag_seconds = 0.0
    elif progress.get("updated_at"):
        lag_seconds = round((utcnow() - parse_iso(progress["updated_at"])).total_seconds(), 1)
    problems = []
    if archived is None:
        problems.append("nothing is archived yet: is WAL capture running?")
    elif lag_seconds is None or lag_seconds > cluster.wal.rpo_seconds:
        problems.append(f"WAL capture is behind by {lag_bytes} bytes"
                        + (f" and {lag_seconds:.0f} s" if lag_seconds is not None else "")
                        + f", past the RPO target of {cluster.wal.rpo_seconds} s")
    slot = None
    if cluster.wal.mode == "stream":
        info = slot_info(conn, slot_name(cluster.name))
        slot = info.to_dict()
        if info.exists and info.wal_status == "lost":
            problems.append(f"replication slot {info.name} was invalidated: the archive has a gap; "
                            "take a new full backup")
        elif info.retained_bytes and info.retained_bytes > cluster.wal.slot_retained_alert_mb * 1024 * 1024:
            problems.append(f"replication slot {info.name} holds {info.retained_bytes / 2**20:.0f} MB of WAL on "
                            f"the server (alert at {cluster.wal.slot_retained_alert_mb} MB): the disk may fill; "
                            "is WAL capture running? (max_slot_wal_keep_size caps it)")
    return WalLagReport(cluster=cluster.name, ok=not problems, server_lsn=server_lsn,
                        archived_lsn=format_lsn(archived) if archived is not None else None, lag_bytes=lag_bytes,
                        lag_seconds=lag_seconds, rpo_seconds=cluster.wal.rpo_seconds,
                        archive_updated_at=progress.get("updated_at"), slot=slot, problems=problems)


def reset_invalidated_slot(conn: ConnInfo, cluster: str) -> SlotInfo:
    """Drop a slot PostgreSQL invalidated, so streaming can start again (after a gap)."""
    info = slot_info(conn, slot_name(cluster))
    if info.exists and info.wal_status == "lost":
        with connect(conn) as c:
            c.execute("select pg_drop_replication_slot(%s)", (info.name,))
        log.error("replication slot %s was invalidated and has been dropped: WAL between the last archived "
                  "segment and now is lost; a new full backup is needed", info.name)
    return info
