"""Continuous WAL capture by streaming: a replication client on the slot
``pgdr_<cluster>`` that archives every completed segment and uploads the
segment being written every few seconds, so the data at risk is seconds.

The slot never advances past the repository. pgdr speaks the streaming
replication protocol itself (on psycopg's libpq connection) and reports a
*flush* position only up to the end of the last completed segment whose
upload has returned: the server keeps every byte pgdr has not durably
archived. Nothing is spooled on local disk, so a worker that dies, or a run
that starts on another host, loses nothing: the next run starts at the slot's
position, which is always a segment boundary (or, for a new slot, inside the
first segment), and re-reads the segment being written.

Handover between runs: a run waiting for the slot makes itself visible on the
server (``application_name`` ``pgdr_wal_waiting_<cluster>``); the running
stream sees it within two seconds, uploads what it holds and releases the
slot, and the waiting run takes it at once.

A missing slot is never quietly created again once the archive holds WAL: that
is a gap (a dropped slot, or one lost in a failover), reported with its LSN
range, as is a slot PostgreSQL invalidated.
"""

from __future__ import annotations

import logging
import select
import struct
import threading
import time
from dataclasses import dataclass

from pgdr.config import ClusterConfig
from pgdr.errors import LockedError, PgdrError, PostgresError
from pgdr.lsn import format_lsn, parse_lsn
from pgdr.postgres import ConnInfo, connect, server_info
from pgdr.results import JsonResult, iso, parse_iso, utcnow
from pgdr.storage import Storage
from pgdr.wal import (HISTORY, SEG_SIZE, SEGMENT, WalArchive, parse_segment, require_supported_segment_size,
                      segment_name, segment_of)

log = logging.getLogger(__name__)

STATUS_INTERVAL = 10.0  # seconds between standby status updates (wal_sender_timeout is 60 s by default)
WAITER_CHECK_INTERVAL = 2.0  # seconds between looks for a run waiting to take the slot over
HANDOVER_TIMEOUT = 300.0  # how long a run waits for the previous one to release the slot
UPLOAD_RETRY_FOR = 300.0  # how long a failing segment upload is retried (the server keeps the WAL meanwhile)
_STATUS = struct.Struct(">cQQQqB")  # 'r', write, flush, apply, client clock, reply requested
_PG_EPOCH_US = 946_684_800 * 1_000_000  # 2000-01-01 in Unix microseconds


class WalGapError(PgdrError):
    """WAL was lost before it reached the archive: point-in-time restore cannot cross the range named."""

    kind = "wal_gap"


def slot_name(cluster: str) -> str:
    return f"pgdr_{cluster}"


def waiting_name(cluster: str) -> str:
    return f"pgdr_wal_waiting_{cluster}"


@dataclass
class SlotInfo(JsonResult):
    name: str
    exists: bool
    wal_status: str | None = None
    restart_lsn: str | None = None
    retained_bytes: int | None = None
    active_pid: int | None = None


@dataclass
class SlotState(JsonResult):
    """What the slot check found and did: ``ok``, ``created`` (first start), ``recreated`` (it was
    missing but the archive already reaches where it starts: nothing lost) or ``gap``."""

    cluster: str
    slot: str
    status: str
    restart_lsn: str | None
    archived_lsn: str | None
    gap_from: str | None
    gap_to: str | None
    detail: str


@dataclass
class StreamResult(JsonResult):
    cluster: str
    slot: str
    started_at: str
    stopped_at: str
    stopped_because: str
    start_lsn: str
    received_lsn: str
    confirmed_lsn: str | None  # the flush position the slot was given: end of the last archived segment
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
            "select wal_status, restart_lsn::text, pg_current_wal_lsn() - restart_lsn, active_pid "
            "from pg_replication_slots where slot_name = %s", (slot,)).fetchone()
    if row is None:
        return SlotInfo(slot, False)
    return SlotInfo(slot, True, row[0], row[1], int(row[2]) if row[2] is not None else None, row[3])


def server_segment_size(conn: ConnInfo) -> int:
    with connect(conn) as c:
        return int(c.execute("select setting from pg_settings where name = 'wal_segment_size'").fetchone()[0])


def _create_slot(conn: ConnInfo, slot: str) -> SlotInfo:
    with connect(conn) as c:
        c.execute("select pg_create_physical_replication_slot(%s, true)", (slot,))
    return slot_info(conn, slot)


def prepare_slot(cluster: ClusterConfig, conn: ConnInfo, storage: Storage) -> SlotState:
    """Make sure the slot exists and say whether WAL was lost on the way.

    An invalidated slot, or a missing one while the archive already holds WAL that
    the new slot does not continue, is a gap: the slot is (re)created so capture can
    go on, and the state says ``gap`` with the LSN range that is not in the archive.
    """
    name = slot_name(cluster.name)
    info = slot_info(conn, name)
    archive = WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level)

    def state(status, detail, info, reach=None, gap=(None, None)):
        return SlotState(cluster.name, name, status, info.restart_lsn, format_lsn(reach) if reach is not None else None,
                         format_lsn(gap[0]) if gap[0] is not None else None,
                         format_lsn(gap[1]) if gap[1] is not None else None, detail)

    if info.exists and info.wal_status != "lost":
        return state("ok", f"slot {name} exists ({info.wal_status}, restart_lsn {info.restart_lsn})", info)
    timeline = server_info(conn).timeline
    reach = archive.newest_lsn(timeline)
    if info.exists:  # invalidated: PostgreSQL removed WAL the slot should have kept
        with connect(conn) as c:
            c.execute("select pg_drop_replication_slot(%s)", (name,))
        new = _create_slot(conn, name)
        start = segment_of(parse_lsn(new.restart_lsn)) * SEG_SIZE
        detail = (f"replication slot {name} was invalidated (max_slot_wal_keep_size): the server removed WAL before "
                  f"it was archived. WAL from LSN {format_lsn(reach) if reach is not None else '(nothing archived)'} "
                  f"to {format_lsn(start)} is missing from the archive; point-in-time restore cannot cross it. The "
                  f"slot was dropped and created again at {new.restart_lsn}; take a new full backup")
        log.error("%s", detail)
        return state("gap", detail, new, reach, (reach, start))
    anything = archive.newest_lsn()
    new = _create_slot(conn, name)
    start = segment_of(parse_lsn(new.restart_lsn)) * SEG_SIZE
    if anything is None:
        log.info("created physical replication slot %s at %s", name, new.restart_lsn)
        return state("created", f"created slot {name} at {new.restart_lsn}: the archive was empty", new)
    if reach is not None and reach >= start:
        detail = (f"replication slot {name} was missing (dropped?) and has been created again at {new.restart_lsn}; "
                  f"the archive already reaches LSN {format_lsn(reach)} on timeline {timeline}, so no WAL was lost")
        log.warning("%s", detail)
        return state("recreated", detail, new, reach)
    detail = (f"replication slot {name} was missing (dropped, or lost in a failover: physical slots are not copied "
              f"to standbys) while the archive holds WAL up to LSN "
              f"{format_lsn(reach if reach is not None else anything)}"
              f"{'' if reach is not None else f' (on another timeline than the server, {timeline})'}: WAL from "
              f"{format_lsn(reach) if reach is not None else 'there'} to {format_lsn(start)} is not in the archive "
              f"and point-in-time restore cannot cross it. The slot was created again at {new.restart_lsn}; take a "
              "new full backup")
    log.error("%s", detail)
    return state("gap", detail, new, reach, (reach if reach is not None else anything, start))


class ReplicationStream:
    """The streaming replication protocol on one libpq connection: START_REPLICATION, then
    XLogData and keepalives in and standby status updates out. It reports as flushed only
    what it is told to (``confirm``): never what a keepalive says the server has."""

    def __init__(self, conn: ConnInfo, application_name: str):
        self._conn = connect(conn, replication="true", application_name=application_name)
        self.pg = self._conn.pgconn
        self.write_lsn = 0
        self.flush_lsn = 0
        self._last_status = 0.0

    def _exec(self, sql: str):
        from psycopg import pq

        res = self.pg.exec_(sql.encode())
        if res.status != pq.ExecStatus.TUPLES_OK:
            raise PostgresError(f"{sql.split()[0]} failed: {res.error_message.decode(errors='replace').strip()}")
        return res

    def identify(self) -> tuple[str, int]:
        res = self._exec("IDENTIFY_SYSTEM")
        return res.get_value(0, 0).decode(), int(res.get_value(0, 1).decode())

    def timeline_history(self, tli: int) -> tuple[str, bytes]:
        res = self._exec(f"TIMELINE_HISTORY {int(tli)}")
        name, content = res.get_value(0, 0).decode(), bytes(res.get_value(0, 1))
        if content.startswith(b"\\x"):  # bytea in text form (PostgreSQL 16+)
            content = bytes.fromhex(content[2:].decode())
        return name, content

    def start(self, slot: str, lsn: int, tli: int) -> None:
        from psycopg import pq

        self.pg.send_query(f'START_REPLICATION SLOT "{slot}" PHYSICAL {format_lsn(lsn)} TIMELINE {int(tli)}'.encode())
        res = self.pg.get_result()
        if res is None or res.status != pq.ExecStatus.COPY_BOTH:
            msg = res.error_message.decode(errors="replace").strip() if res is not None else "no result"
            raise PostgresError(f"START_REPLICATION on slot {slot} at {format_lsn(lsn)} failed: {msg}")
        self.write_lsn = lsn

    def read(self, timeout: float):
        """The next (start LSN, payload) of WAL, or None when nothing came within ``timeout`` seconds."""
        from psycopg import OperationalError

        deadline = time.monotonic() + timeout
        while True:
            try:
                n, data = self.pg.get_copy_data(1)
            except OperationalError as e:
                raise PostgresError(f"WAL streaming connection failed: {str(e).strip()}") from None
            if n > 0:
                kind = data[0:1].tobytes()
                if kind == b"w":
                    start = struct.unpack_from(">Q", data, 1)[0]
                    return start, data[25:].tobytes()
                if kind == b"k":
                    if data[17]:  # the server asks for a reply now
                        self.status()
                    continue
                raise PostgresError(f"unexpected replication message type {kind!r}")
            if n == -1:
                res = self.pg.get_result()
                msg = res.error_message.decode(errors="replace").strip() if res is not None else ""
                raise PostgresError(f"the server ended WAL streaming{': ' + msg if msg else ''}")
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.pg.socket], [], [], left)
            if ready:
                try:
                    self.pg.consume_input()
                except OperationalError as e:
                    raise PostgresError(f"WAL streaming connection failed: {str(e).strip()}") from None

    def status(self, force: bool = True) -> None:
        """Tell the server what was received (write) and what is durably archived (flush)."""
        now = time.monotonic()
        if not force and now - self._last_status < STATUS_INTERVAL:
            return
        from psycopg import OperationalError

        clock = int(time.time() * 1_000_000) - _PG_EPOCH_US
        try:
            self.pg.put_copy_data(_STATUS.pack(b"r", self.write_lsn, self.flush_lsn, 0, clock, 0))
            self.pg.flush()
        except OperationalError as e:
            raise PostgresError(f"WAL streaming connection failed: {str(e).strip()}") from None
        self._last_status = now

    def confirm(self, lsn: int) -> None:
        """The slot may now let go of WAL before ``lsn``: it is in the repository."""
        if lsn > self.flush_lsn:
            self.flush_lsn = lsn
            self.status()

    def close(self) -> None:
        try:
            self._conn.close()
        except Exception:  # closing a broken connection: nothing left to save
            pass


class WalStreamer:
    def __init__(self, cluster: ClusterConfig, conn: ConnInfo, storage: Storage, spool=None,
                 partial_interval: float = 5.0, handover_timeout: float = HANDOVER_TIMEOUT):
        # ``spool`` is accepted for compatibility and unused: nothing is kept on local disk.
        self.cluster = cluster
        self.conn = conn
        self.partial_interval = partial_interval
        self.handover_timeout = handover_timeout
        self.archive = WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level)
        self.slot = slot_name(cluster.name)
        self.archived = self.already = self.partials = 0
        self._progress: int | None = None  # newest LSN known to be in the archive

    def _note_progress(self, lsn: int) -> None:
        """Record the archive's reach; it never moves backwards."""
        self._progress = max(lsn, self._progress or 0)
        self.archive.note_progress(self._progress)

    def _take_slot(self, stop: threading.Event) -> tuple[ReplicationStream, int, int, str]:
        """Wait until no one streams from the slot (visible to the holder as a waiting run), then start."""
        waiter = None
        deadline = time.monotonic() + self.handover_timeout
        try:
            while True:
                info = slot_info(self.conn, self.slot)
                if not info.exists:
                    raise WalGapError(f"replication slot {self.slot} disappeared; the next run reports the gap")
                if info.active_pid is None:
                    stream = ReplicationStream(self.conn, f"pgdr_wal_{self.cluster.name}")
                    try:
                        sysid, tli = stream.identify()
                        info = slot_info(self.conn, self.slot)
                        if info.restart_lsn is None:
                            raise WalGapError(f"replication slot {self.slot} holds no WAL (invalidated?)")
                        start = segment_of(parse_lsn(info.restart_lsn)) * SEG_SIZE
                        stream.start(self.slot, start, tli)
                        return stream, start, tli, sysid
                    except PostgresError as e:
                        stream.close()
                        if "active for PID" not in str(e) or time.monotonic() > deadline:
                            raise
                elif waiter is None:
                    log.info("slot %s is in use by PID %s (the previous run); asking it to hand over", self.slot,
                             info.active_pid)
                    waiter = connect(self.conn, application_name=waiting_name(self.cluster.name))
                if time.monotonic() > deadline or stop.is_set():
                    raise LockedError(f"replication slot {self.slot} is still in use by PID {info.active_pid} after "
                                      f"{self.handover_timeout:.0f} s: is another wal-stream running?")
                time.sleep(0.2)
        finally:
            if waiter is not None:
                waiter.close()

    def _upload(self, what: str, fn, stop: threading.Event, stream: ReplicationStream):
        """Run an upload, retrying a failing repository for a while; the server keeps the WAL meanwhile."""
        delay, give_up = 1.0, time.monotonic() + UPLOAD_RETRY_FOR
        while True:
            try:
                return fn()
            except PgdrError as e:
                if time.monotonic() > give_up or stop.is_set():
                    raise
                log.error("uploading %s failed (%s); retrying in %.0f s (the slot keeps this WAL on the server)",
                          what, e, delay)
                end = time.monotonic() + delay
                while time.monotonic() < end and not stop.is_set():
                    stream.status(force=False)  # stay connected: wal_sender_timeout
                    time.sleep(0.2)
                delay = min(delay * 2, 30.0)

    def run(self, duration: float | None = None, stop: threading.Event | None = None) -> StreamResult:
        stop = stop or threading.Event()
        info = server_info(self.conn)
        require_supported_segment_size(server_segment_size(self.conn), f"cluster '{self.cluster.name}'")
        self.archive._check_identity(info.system_identifier)
        state = prepare_slot(self.cluster, self.conn, self.archive.storage)
        if state.status == "gap":
            raise WalGapError(state.detail)
        self._progress = self.archive.newest_lsn()  # one listing here, none per upload
        started = utcnow()
        deadline = time.monotonic() + duration if duration else None
        stream, start, tli, sysid = self._take_slot(stop)
        log.info("streaming WAL of cluster %s from %s on slot %s (timeline %d, from %s) into %s%s", self.cluster.name,
                 self.conn.describe(), self.slot, tli, format_lsn(start), self.archive.storage.describe(),
                 f" for {duration:.0f} s" if duration else "")
        segno, pos = segment_of(start), start
        buf = bytearray(SEG_SIZE)
        uploaded_to = start  # what the newest partial upload holds
        because = "duration reached"
        status_conn = connect(self.conn)
        try:
            if tli > 1:
                self._archive_history(stream, tli)
            next_partial = time.monotonic() + self.partial_interval
            next_waiter_check = time.monotonic() + WAITER_CHECK_INTERVAL
            while True:
                if stop.is_set():
                    because = "stopped"
                    break
                if deadline and time.monotonic() >= deadline:
                    break
                msg = stream.read(min(0.5, self.partial_interval))
                if msg is not None:
                    at, payload = msg
                    if at != pos:
                        raise PostgresError(f"WAL stream jumped from {format_lsn(pos)} to {format_lsn(at)}")
                    view = memoryview(payload)
                    while view:
                        off = pos - segno * SEG_SIZE
                        take = min(len(view), SEG_SIZE - off)
                        buf[off:off + take] = view[:take]
                        view = view[take:]
                        pos += take
                        stream.write_lsn = pos
                        if pos == (segno + 1) * SEG_SIZE:
                            self._complete(segno, tli, bytes(buf), sysid, stop, stream)
                            stream.confirm(pos)  # only now may the server let go of this segment
                            segno += 1
                            buf = bytearray(SEG_SIZE)
                            uploaded_to = pos
                stream.status(force=False)
                if time.monotonic() >= next_partial:
                    if pos > uploaded_to:
                        self._partial(segno, tli, buf, pos, stop, stream)
                        uploaded_to = pos
                    next_partial = time.monotonic() + self.partial_interval
                if time.monotonic() >= next_waiter_check:
                    if self._someone_waiting(status_conn):
                        because = "handed over to the next run"
                        break
                    next_waiter_check = time.monotonic() + WAITER_CHECK_INTERVAL
            if pos > uploaded_to:  # the handover keeps the data at risk at seconds
                self._partial(segno, tli, buf, pos, stop, stream)
        except PostgresError:
            if pos > uploaded_to:  # the server went away: what was received still narrows the gap to restore
                try:
                    name = segment_name(tli, segno)
                    self.archive.push_partial_bytes(name, bytes(buf), pos)
                    self._note_progress(pos)
                except PgdrError as e:
                    log.error("could not upload the partial segment after the stream failed: %s", e)
            raise
        finally:
            stream.close()
            status_conn.close()
        return self.report(started, because, start, pos, stream.flush_lsn or None)

    def _complete(self, segno: int, tli: int, data: bytes, sysid: str, stop, stream) -> None:
        name = segment_name(tli, segno)
        result = self._upload(name, lambda: self.archive.push_segment(name, data, sysid), stop, stream)
        if result.status == "archived":
            self.archived += 1
        else:
            self.already += 1
        self._upload(f"{name}.partial (removal)", lambda: self.archive.remove_partial(name), stop, stream)
        self._note_progress((segno + 1) * SEG_SIZE)

    def _partial(self, segno: int, tli: int, buf: bytearray, pos: int, stop, stream) -> None:
        name = segment_name(tli, segno)
        data = bytes(buf)  # a copy: the zero-padded segment, good up to pos
        self._upload(f"{name}.partial", lambda: self.archive.push_partial_bytes(name, data, pos), stop, stream)
        self._note_progress(pos)
        self.partials += 1

    def _archive_history(self, stream: ReplicationStream, tli: int) -> None:
        name = f"{tli:08X}.history"
        if self.archive.find(name):
            return
        got, content = stream.timeline_history(tli)
        if not HISTORY.fullmatch(got):
            raise PostgresError(f"TIMELINE_HISTORY {tli} returned {got!r}")
        self.archive.push_history(got, content)

    def _someone_waiting(self, c) -> bool:
        row = c.execute("select count(*) from pg_stat_activity where application_name = %s",
                        (waiting_name(self.cluster.name),)).fetchone()
        return bool(row and row[0])

    def report(self, started, because: str, start: int, received: int, confirmed: int | None) -> StreamResult:
        with connect(self.conn) as c:
            server_lsn = c.execute("select pg_current_wal_lsn()::text").fetchone()[0]
        archived = self.archive.newest_lsn()
        slot = slot_info(self.conn, self.slot)
        lag = max(parse_lsn(server_lsn) - archived, 0) if archived is not None else None
        result = StreamResult(
            cluster=self.cluster.name, slot=self.slot, started_at=iso(started), stopped_at=iso(utcnow()),
            stopped_because=because, start_lsn=format_lsn(start), received_lsn=format_lsn(received),
            confirmed_lsn=format_lsn(confirmed) if confirmed else None, segments_archived=self.archived,
            segments_already_archived=self.already, partial_uploads=self.partials, server_lsn=server_lsn,
            archived_lsn=format_lsn(archived) if archived is not None else None, lag_bytes=lag,
            slot_retained_bytes=slot.retained_bytes)
        log.info("WAL streaming of %s stopped (%s): %d segments archived, %d partial uploads, lag %s bytes",
                 self.cluster.name, because, self.archived, self.partials, lag)
        return result


@dataclass
class WalLagReport(JsonResult):
    cluster: str
    ok: bool
    mode: str
    server_lsn: str
    archived_lsn: str | None
    lag_bytes: int | None
    lag_seconds: float | None
    rpo_seconds: int
    archive_updated_at: str | None
    slot: dict | None
    archiver: dict | None
    problems: list


def _archiver(conn: ConnInfo) -> dict:
    with connect(conn) as c:
        row = c.execute(
            "select archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal, "
            "last_failed_time, current_setting('archive_mode'), current_setting('archive_timeout'), now() "
            "from pg_stat_archiver").fetchone()
    keys = ("archived_count", "last_archived_wal", "last_archived_time", "failed_count", "last_failed_wal",
            "last_failed_time", "archive_mode", "archive_timeout", "now")
    return dict(zip(keys, row))


def _seconds(setting: str) -> int:
    """archive_timeout as current_setting() shows it ('0', '60s', '5min', '1h') in seconds."""
    units = {"ms": 0.001, "s": 1, "min": 60, "h": 3600, "d": 86400}
    num = setting.rstrip("abcdefghijklmnopqrstuvwxyz")
    return int(float(num or 0) * units.get(setting[len(num):] or "s", 1))


def measure_lag(cluster: ClusterConfig, conn: ConnInfo, storage: Storage) -> WalLagReport:
    """Primary's current LSN against the newest LSN safely in the repository; in stream mode the
    slot's health, in push mode the archiver's (``pg_stat_archiver``)."""
    archive = WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level)
    with connect(conn) as c:
        server_lsn = c.execute("select pg_current_wal_lsn()::text").fetchone()[0]
    archived = archive.newest_lsn()
    progress = archive.progress() or {}
    lag_bytes = max(parse_lsn(server_lsn) - archived, 0) if archived is not None else None
    rpo = cluster.wal.rpo_seconds
    problems: list[str] = []
    slot = archiver = None
    lag_seconds = None
    if cluster.wal.mode == "push":
        a = _archiver(conn)
        archiver = {k: (iso(v) if hasattr(v, "isoformat") else v) for k, v in a.items() if k != "now"}
        failed_after = a["failed_count"] and a["last_failed_time"] is not None and (
            a["last_archived_time"] is None or a["last_failed_time"] > a["last_archived_time"])
        if a["archive_mode"] == "off":
            problems.append("archive_mode is off: push mode needs archive_mode = on and archive_command = "
                            "'pgdr … wal-push --cluster … %p' (restart required)")
        if failed_after:
            problems.append(
                f"archive_command is failing: pg_stat_archiver shows {a['failed_count']} failures, the last for "
                f"{a['last_failed_wal']} at {iso(a['last_failed_time'])}, after the last success "
                f"({a['last_archived_wal'] or 'none'}"
                f"{' at ' + iso(a['last_archived_time']) if a['last_archived_time'] else ''}); see the server log "
                "(is the repository writable, and pgdr runnable, by the server's user?)")
        # Push mode archives whole segments: what the server wrote into the segment it is still
        # writing is at risk by design until the segment is switched (archive_timeout bounds that).
        server = parse_lsn(server_lsn)
        since = a["last_archived_time"]
        waited = round((a["now"] - since).total_seconds(), 1) if since is not None else None
        timeout = _seconds(a["archive_timeout"])
        if archived is not None and server <= archived:
            lag_seconds = 0.0
        elif archived is not None and segment_of(server - 1) == segment_of(archived) and waited is not None:
            lag_seconds = min(waited, timeout) if timeout else waited  # only the open segment
        else:
            lag_seconds = waited  # completed segments wait for archive_command
        if archived is None and not a["archived_count"]:
            problems.append("nothing is archived yet: pg_stat_archiver has archived no WAL")
        elif archived is None:
            problems.append(f"pg_stat_archiver reports {a['archived_count']} files archived, but the repository "
                            f"holds no WAL of cluster '{cluster.name}': does archive_command push into it?")
        elif lag_seconds is not None and lag_seconds > rpo:
            problems.append(
                f"WAL written since {archiver['last_archived_time']} is not archived: {lag_bytes} bytes and "
                f"{lag_seconds:.0f} s behind, past the RPO target of {rpo} s"
                + ("" if timeout and timeout <= rpo else
                   f" (archive_timeout is {a['archive_timeout']}; set it at or below the RPO)"))
        return WalLagReport(cluster=cluster.name, ok=not problems, mode="push", server_lsn=server_lsn,
                            archived_lsn=format_lsn(archived) if archived is not None else None, lag_bytes=lag_bytes,
                            lag_seconds=lag_seconds, rpo_seconds=rpo, archive_updated_at=archiver["last_archived_time"],
                            slot=None, archiver=archiver, problems=problems)
    if lag_bytes == 0:
        lag_seconds = 0.0
    elif progress.get("updated_at"):
        lag_seconds = round((utcnow() - parse_iso(progress["updated_at"])).total_seconds(), 1)
    if archived is None:
        problems.append("nothing is archived yet: is WAL capture running?")
    elif lag_seconds is None or lag_seconds > rpo:
        problems.append(f"WAL capture is behind by {lag_bytes} bytes"
                        + (f" and {lag_seconds:.0f} s" if lag_seconds is not None else "")
                        + f", past the RPO target of {rpo} s")
    info = slot_info(conn, slot_name(cluster.name))
    slot = info.to_dict()
    if not info.exists:
        problems.append(f"replication slot {info.name} does not exist"
                        + (": WAL since the archive's end may be gone (a gap); the WAL DAG's slot check reports the "
                           "range and triggers a full backup" if archived is not None else ""))
    elif info.wal_status == "lost":
        problems.append(f"replication slot {info.name} was invalidated: the archive has a gap; "
                        "take a new full backup")
    elif info.retained_bytes and info.retained_bytes > cluster.wal.slot_retained_alert_mb * 1024 * 1024:
        problems.append(f"replication slot {info.name} holds {info.retained_bytes / 2**20:.0f} MB of WAL on "
                        f"the server (alert at {cluster.wal.slot_retained_alert_mb} MB): the disk may fill; "
                        "is WAL capture running? (max_slot_wal_keep_size caps it)")
    return WalLagReport(cluster=cluster.name, ok=not problems, mode="stream", server_lsn=server_lsn,
                        archived_lsn=format_lsn(archived) if archived is not None else None, lag_bytes=lag_bytes,
                        lag_seconds=lag_seconds, rpo_seconds=rpo, archive_updated_at=progress.get("updated_at"),
                        slot=slot, archiver=None, problems=problems)


def reset_invalidated_slot(conn: ConnInfo, cluster: str) -> SlotInfo:
    """Drop a slot PostgreSQL invalidated (kept for callers of the old API; prepare_slot does more)."""
    info = slot_info(conn, slot_name(cluster))
    if info.exists and info.wal_status == "lost":
        with connect(conn) as c:
            c.execute("select pg_drop_replication_slot(%s)", (info.name,))
        log.error("replication slot %s was invalidated and has been dropped: WAL between the last archived "
                  "segment and now is lost; a new full backup is needed", info.name)
    return info


__all__ = ["WalStreamer", "ReplicationStream", "prepare_slot", "measure_lag", "slot_info", "slot_name", "SlotState",
           "StreamResult", "WalLagReport", "WalGapError", "SEGMENT", "parse_segment"]
