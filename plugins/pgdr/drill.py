"""The disaster-recovery drill: restore into a scratch cluster, prove it works, measure RTO and RPO.

Steps, each callable on its own (the DAG runs one per task and passes their
JSON results along) or all at once (``run_drill``, for ``pgdr drill``):

1. ``mark_moment``: on the source, a canary row (optional), then a restore
   point ``pgdr-drill-<run>`` (or, without the privilege, the current LSN);
   then wait until the repository holds WAL past it. That wait is the
   measured RPO.
2. ``restore_scratch``: the chosen backup plus WAL up to the mark, through
   ``pgdr.restore.run_restore`` (the path every restore takes), into the run's
   own directory under ``drill.scratch_dir``; started on a free port,
   loopback only, socket-only access, archiving off.
3. ``validate_scratch``: promoted; the mark reached (timeline switch LSN >=
   marked LSN); ``pg_amcheck`` of every database beside a full read
   (``pg_dump`` to /dev/null) of each, in parallel; user checks; the canary.
4. ``measure_rto``: per phase, and the total against ``rto_seconds``.
5. ``teardown``: stops the scratch server and removes the run's directory,
   whatever happened before; ``write_report`` keeps the JSON report in the
   repository (``<cluster>/reports/drill/``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from pgdr import __version__
from pgdr.config import ClusterConfig
from pgdr.errors import PgdrError, UsageError
from pgdr.lsn import format_lsn, parse_lsn
from pgdr.pgbin import find_bin_dir, reachable_by, user_ids
from pgdr.postgres import first_line
from pgdr.results import JsonResult, iso, utcnow
from pgdr.lock import pid_alive
from pgdr.server import server_env, start_server, stop_server

log = logging.getLogger(__name__)

VALIDATIONS = ("amcheck", "read_all", "checks", "canary")
MARKER = ".pgdr-drill"  # teardown only ever deletes a directory carrying this file
LABEL = re.compile(r"^(latest|\d{8}-\d{6}F(_\d{8}-\d{6}I)?)$")
LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC:")
PHASES = ("restore", "replay", "start_and_promotion", "validation")
PHASE_NAMES = {"restore": "restore (fetch + verify + unpack)", "replay": "WAL replay",
               "start_and_promotion": "start and promotion", "validation": "validation"}


class DrillFailed(PgdrError):
    """The drill ran and found a problem: a cause (``rpo``, ``restore``, ``amcheck``, ``check:<name>``, ``rto``…)
    and the step's record so far, for the report."""

    kind = "drill_failed"

    def __init__(self, cause: str, message: str, record: dict | None = None):
        super().__init__(message)
        self.cause = cause
        self.record = record or {}

    def to_dict(self) -> dict:
        return {**super().to_dict(), "cause": self.cause}


@dataclass
class DrillPlan(JsonResult):
    """What one drill run does; a pure function of the config, the run id and the (validated) parameters."""

    cluster: str
    run_id: str
    slug: str
    scratch: str  # the run's own directory under drill.scratch_dir
    backup: str = "latest"
    target_time: str | None = None  # a point in time instead of a fresh mark (no RPO then)
    light: bool = False  # the newest backup, its end (no mark), server up plus user checks
    validations: list = field(default_factory=lambda: list(VALIDATIONS))
    heapallindexed: bool = False
    keep_minutes: int = 0
    jobs: int = 2
    rto_seconds: int = 3600
    rpo_seconds: int = 60
    timeout_seconds: float = 14400

    @property
    def pgdata(self) -> Path:
        return Path(self.scratch) / "pgdata"

    @property
    def socket_dir(self) -> Path:
        """Short, beside /tmp: a Unix socket's path must fit in 107 bytes, and scratch paths can be long."""
        return Path("/tmp") / f"pgdr-drill-{hashlib.sha256(self.scratch.encode()).hexdigest()[:12]}"

    @property
    def server_log(self) -> Path:
        return Path(self.scratch) / "server.log"

    @property
    def restore_point(self) -> str:
        return f"pgdr-drill-{self.slug}"


def run_slug(run_id: str) -> str:
    """A file- and restore-point-safe name for a run id (Airflow's contain ':' and '+')."""
    clean = re.sub(r"[^A-Za-z0-9]+", "-", run_id).strip("-")[:36]
    return f"{clean}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def plan_drill(cluster: ClusterConfig, run_id: str, params: dict | None = None, light: bool = False) -> DrillPlan:
    """Validate the (untrusted) parameters of a drill: from the Airflow form or the command line."""
    p = dict(params or {})
    d = cluster.drill
    backup = str(p.get("backup") or "latest")
    if not LABEL.fullmatch(backup):
        raise UsageError(f"backup {backup!r} is neither 'latest' nor a label like 20261125-020000F")
    target_time = p.get("target_time") or None
    if target_time:
        from pgdr.recovery import parse_time

        target_time = parse_time(str(target_time)).isoformat()
    validations = p.get("validations")
    if validations is None:
        validations = list(VALIDATIONS)
    if isinstance(validations, str):
        validations = [v.strip() for v in validations.split(",") if v.strip()]
    unknown = [v for v in validations if v not in VALIDATIONS]
    if unknown:
        raise UsageError(f"unknown validation(s) {', '.join(map(str, unknown))} (known: {', '.join(VALIDATIONS)})")
    keep = p.get("keep_minutes", d.keep_minutes)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= 1440:
        raise UsageError(f"keep_minutes must be an integer from 0 to 1440, got {keep!r}")
    heap = p.get("heapallindexed", d.heapallindexed)
    if not isinstance(heap, bool):
        raise UsageError("heapallindexed must be true or false")
    if not run_id or len(run_id) > 250:
        raise UsageError("a drill needs a run id (at most 250 characters)")
    slug = run_slug(run_id)
    if light:
        validations = [v for v in validations if v == "checks"]
    return DrillPlan(
        cluster=cluster.name, run_id=run_id, slug=slug, scratch=str(Path(d.scratch_dir) / cluster.name / slug),
        backup=backup, target_time=target_time, light=light, validations=list(validations), heapallindexed=heap,
        keep_minutes=keep, jobs=d.jobs, rto_seconds=cluster.rto_seconds, rpo_seconds=cluster.rpo_target,
        timeout_seconds=d.timeout_minutes * 60)


# ---------------------------------------------------------------- 1. mark the moment

def mark_moment(cluster: ClusterConfig, conn, storage, plan: DrillPlan, poll: float = 0.2) -> dict:
    """Canary row, restore point (or current LSN), then wait for the archive to hold WAL past it."""
    if plan.light or plan.target_time:
        why = "light drill: the backup's own end" if plan.light else f"point in time {plan.target_time}"
        return {"method": "none", "detail": f"no mark: {why}", "rpo_seconds": None, "rpo_target": plan.rpo_seconds}
    import psycopg
    from psycopg import sql

    from pgdr.postgres import connect
    from pgdr.wal import WalArchive

    record: dict = {"name": plan.restore_point, "rpo_target": plan.rpo_seconds, "canary": None}
    canary = cluster.drill.canary
    if canary and "canary" in plan.validations:
        table = sql.Identifier(*canary.table.split("."))
        try:
            with connect(conn, dbname=canary.database) as c:
                c.execute(sql.SQL("create table if not exists {} (run_id text primary key, "
                                  "marked_at timestamptz not null default clock_timestamp())").format(table))
                c.execute(sql.SQL("insert into {} (run_id) values (%s) on conflict (run_id) do nothing")
                          .format(table), (plan.run_id,))
        except psycopg.Error as e:
            raise DrillFailed("canary", f"cannot write the canary row into {canary.database}.{canary.table} on the "
                              f"source (grant pgdr create/insert there, or create the table): "
                              f"{first_line(e)}", record) from None
        record["canary"] = {"database": canary.database, "table": canary.table, "run_id": plan.run_id}
    with connect(conn) as c:
        try:
            row = c.execute("select pg_create_restore_point(%s)::text, clock_timestamp()", (plan.restore_point,)) \
                .fetchone()
            record["method"] = "restore_point"
        except psycopg.errors.InsufficientPrivilege:
            row = c.execute("select pg_current_wal_lsn()::text, clock_timestamp()").fetchone()
            record["method"] = "lsn"
            log.info("no privilege for pg_create_restore_point(): marking the current LSN instead")
        except psycopg.Error as e:
            raise DrillFailed("mark", f"cannot mark the moment on the source: {first_line(e)}",
                              record) from None
    marked = time.monotonic()
    record["lsn"] = row[0]
    record["time"] = iso(row[1])
    log.info("marked %s at LSN %s (%s); waiting for the repository to hold WAL past it (RPO target %d s)",
             f"restore point {plan.restore_point}" if record["method"] == "restore_point" else "the current LSN",
             record["lsn"], record["time"], plan.rpo_seconds)
    archive = WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level)
    want = parse_lsn(record["lsn"])
    while True:
        newest = archive.newest_lsn()
        waited = time.monotonic() - marked
        if newest is not None and newest >= want:
            record.update(archived_lsn=format_lsn(newest), rpo_seconds=round(waited, 3),
                          rpo_ok=waited <= plan.rpo_seconds)
            log.info("the repository holds WAL to %s: measured RPO %.1f s", record["archived_lsn"], waited)
            return record
        if waited > plan.rpo_seconds:
            record.update(archived_lsn=format_lsn(newest) if newest is not None else None,
                          rpo_seconds=round(waited, 3), rpo_ok=False)
            raise DrillFailed("rpo", f"RPO target missed: {waited:.1f} s after the mark ({record['lsn']}) the "
                              f"repository holds WAL only to {record['archived_lsn']} (target {plan.rpo_seconds} s);"
                              " is WAL capture running?", record)
        time.sleep(poll)


# ---------------------------------------------------------------- 2. restore

def prepare_scratch(cluster: ClusterConfig, plan: DrillPlan) -> Path:
    """The run's own directory, marked as the drill's, owned by the server's user; refused if someone else's."""
    run = Path(plan.scratch)
    base = Path(cluster.drill.scratch_dir)
    base.mkdir(parents=True, exist_ok=True)
    (base / cluster.name).mkdir(exist_ok=True)
    if run.exists():
        if not (run / MARKER).exists():
            raise DrillFailed("restore", f"{run} exists and is not a drill's scratch directory; refusing to use it")
        _stop_server(cluster, plan)  # an earlier try of the same run: start afresh
        _remove_tree(run)
    _remove_socket_dir(plan)
    run.mkdir(mode=0o700)
    (run / MARKER).write_text(plan.run_id + "\n")
    plan.socket_dir.mkdir(mode=0o700)
    if os.geteuid() == 0:
        uid, gid = user_ids(cluster.run_as)
        os.chown(run, uid, gid)
        os.chown(plan.socket_dir, uid, gid)
    return run


def _remove_socket_dir(plan: DrillPlan) -> None:
    """The run's socket directory in /tmp: removed only when it is a plain directory of sockets and lock files."""
    sock = plan.socket_dir
    if not os.path.lexists(sock):
        return
    if sock.is_symlink() or not sock.is_dir() or \
            any(not p.name.startswith(".s.PGSQL.") for p in sock.iterdir()):
        raise PgdrError(f"{sock} is not a drill's socket directory (a symlink, a file or foreign content); "
                        "not touching it")
    shutil.rmtree(sock)


def check_free_space(where: Path, need: int) -> dict:
    free = shutil.disk_usage(where).free
    if free < need:
        raise DrillFailed("disk", f"{where} has {free / 1e9:.2f} GB free; the drill needs about {need / 1e9:.2f} GB "
                          "(backup size plus WAL plus 10%); free space or set drill.scratch_dir elsewhere")
    return {"free_bytes": free, "needed_bytes": need}


def _recovery_target(plan: DrillPlan, mark: dict):
    from pgdr.recovery import RecoveryTarget

    if plan.light:
        return RecoveryTarget("immediate", action="promote")
    if plan.target_time:
        return RecoveryTarget("time", plan.target_time, action="promote")
    if mark.get("method") == "restore_point":
        return RecoveryTarget("name", mark["name"], action="promote")
    return RecoveryTarget("lsn", mark["lsn"], action="promote")


def restore_scratch(cluster: ClusterConfig, storage, plan: DrillPlan, mark: dict, config_path: str | None = None,
                    on_scratch=None) -> dict:
    """The chosen backup plus WAL up to the mark, through run_restore, then the server started and promoted."""
    from pgdr.repository import Repository
    from pgdr.restore import run_restore
    from pgdr.sandbox import free_port

    run = prepare_scratch(cluster, plan)
    port = free_port()
    record: dict = {"scratch": str(run), "pgdata": str(plan.pgdata), "port": port, "socket_dir": str(plan.socket_dir),
                    "host": socket.gethostname(), "pid": None, "phases": {}}
    if on_scratch:
        on_scratch(dict(record))
    try:
        repo = Repository(storage, cluster.name)
        manifest = repo.resolve(plan.backup)
        wal_bytes = max(parse_lsn(mark["lsn"]) - parse_lsn(manifest.stop_lsn), 0) if mark.get("lsn") else 0
        restored = manifest.size
        if manifest.type == "incr":  # restored in place: the full's size plus what the incrementals add, at most
            from pgdr.incremental import chain_of

            restored = sum(m.size for m in chain_of(repo, manifest))
        record["disk"] = check_free_space(run, int((restored + wal_bytes) * 1.1) + (64 << 20))
        target = _recovery_target(plan, mark)
        t0 = time.monotonic()
        # The drill restores only into its own scratch directory: that is its restore root, and the only one.
        confined = replace(cluster, restore_roots=(str(Path(cluster.drill.scratch_dir) / cluster.name),))
        result = run_restore(confined, storage, plan.backup, plan.pgdata, start=False, recovery_target=target,
                             config_path=config_path, timeout=plan.timeout_seconds)
        record["phases"]["restore"] = round(time.monotonic() - t0, 3)
        plan_ = (result.recovery or {}).get("plan") or {}
        record["backup"] = {"label": result.label, "pg_version": result.pg_version, "stop_lsn": result.stop_lsn,
                            "size": result.size, "stored_size": result.stored_size,
                            "parts_verified": result.parts_verified, "pg_verifybackup": result.pg_verifybackup}
        record["wal"] = {"from": plan_.get("wal_from") or result.stop_lsn, "to": mark.get("lsn") or plan_.get("wal_to"),
                         "timeline": plan_.get("timeline")}
        record["target"] = target.to_dict()
    except PgdrError as e:
        raise DrillFailed("restore", f"restore failed: {e}", record) from None
    try:
        record.update(_start_and_recover(cluster, storage, plan, port, target, manifest.pg_major))
    except PgdrError as e:
        fetch = [ln.split(" ERROR ", 1)[-1].strip() for ln in _read(plan.server_log).splitlines()
                 if "pgdr ERROR" in ln]  # what restore_command (pgdr wal-fetch) said: the damaged segment
        record["wal_fetch_errors"] = fetch[-5:]
        why = f"; WAL fetch failed: {fetch[-1]}" if fetch else ""
        raise DrillFailed("recovery", f"the restored server did not recover to the mark: {e}{why}", record) \
            from None
    return record


def _start_and_recover(cluster, storage, plan: DrillPlan, port: int, target, major: int) -> dict:
    """Start the restored data directory loopback-only, socket-only, archiving off; wait for promotion."""
    from pgdr.recovery import wait_for_recovery

    user = cluster.run_as if os.geteuid() == 0 else None
    bins = reachable_by(find_bin_dir(major, cluster.pg_bin_dir, tool="postgres", exact=True), user)
    pgdata, sock, hba = plan.pgdata, plan.socket_dir, Path(plan.scratch) / "pg_hba.conf"
    # Only the server's user (and root) can reach the socket directory; no TCP client is accepted at all.
    hba.write_text("# pgdr drill: socket only (the socket directory is private to the server's user)\n"
                   "local all all trust\n")
    if not (pgdata / "postgresql.conf").exists():
        (pgdata / "postgresql.conf").write_text("# written by pgdr drill: the backup held no postgresql.conf\n")
    if user:
        ids = user_ids(user)
        for p in (hba, pgdata / "postgresql.conf"):
            os.chown(p, *ids)
    # postgres itself, no pg_ctl (whose command line goes through /bin/sh), with the same minimal
    # environment a restored server gets: what its restore_command needs, nothing else of the worker's.
    settings = {"listen_addresses": "127.0.0.1", "archive_mode": "off", "hba_file": str(hba),
                "logging_collector": "off", "log_destination": "stderr", "log_timezone": "UTC",
                "log_line_prefix": "%m: ", "primary_conninfo": "", "shared_preload_libraries": ""}
    launched = time.time()
    start_server(bins.tool("postgres"), pgdata, port, user=user, log_file=plan.server_log, settings=settings,
                 socket_dir=str(sock), env=server_env(cluster, storage), wait=False)

    def running() -> bool:
        pid = _pid(pgdata)
        if pid is None:
            return time.time() - launched < 30 and "database system is shut down" not in _read(plan.server_log)
        return pid_alive(pid)

    outcome = wait_for_recovery(plan.server_log, "promote", running, plan.timeout_seconds)
    ready = _wait_ready(bins, user, port, sock, deadline=time.monotonic() + 120)
    times = _log_times(_read(plan.server_log))
    phases = {}
    up = times.get("ready") or ready
    replay = max(times["redo_done"] - times["redo_start"], 0.0) if "redo_done" in times and "redo_start" in times else 0.0
    phases["replay"] = round(replay, 3)
    phases["start_and_promotion"] = round(max(up - launched - replay, 0.0), 3)
    return {"pid": _pid(pgdata), "recovery": outcome.to_dict() | {"log": outcome.log[-5:]},
            "phases_detail": {"launched": launched, **times}, "server_bins": bins.path,
            "phases_server": phases}


def _wait_ready(bins, user, port, sock, deadline) -> float:
    while time.monotonic() < deadline:
        if subprocess.run([bins.tool("pg_isready"), "-q", "-h", str(sock), "-p", str(port)]).returncode == 0:
            return time.time()
        time.sleep(0.1)
    raise PgdrError(f"the restored server on port {port} does not accept connections")


def _log_times(text: str) -> dict:
    """Wall-clock times (epoch seconds) of recovery's milestones, from the server log's %m prefix."""
    marks = {"redo_start": "redo starts at", "redo_done": "redo done at",
             "ready": "database system is ready to accept connections"}
    out: dict = {}
    for line in text.splitlines():
        m = LOG_TS.match(line)
        if not m:
            continue
        ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()
        for k, needle in marks.items():
            if needle in line:
                out[k] = ts  # the last one: "ready" after promotion
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def server_processes(pgdata: str | os.PathLike) -> list[int]:
    """Live processes whose command line names this data directory (for tests and the teardown's proof)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            cmd = _read(d / "cmdline").replace("\0", " ")
            if str(pgdata) in cmd and "postgres" in cmd and pid_alive(int(d.name)):
                out.append(int(d.name))
    return out


# ---------------------------------------------------------------- 3. validate

class _Scratch:
    """Client access to the scratch server: socket only, as its bootstrap superuser."""

    def __init__(self, cluster: ClusterConfig, plan: DrillPlan, restored: dict, major: int):
        self.port = restored["port"]
        self.sock = restored["socket_dir"]
        self.bins = find_bin_dir(major, cluster.pg_bin_dir, tool="pg_amcheck")
        self.dump_bins = find_bin_dir(major, cluster.pg_bin_dir, tool="pg_dump")
        self.user = self._superuser(cluster)

    def connect(self, dbname: str = "postgres", user: str | None = None):
        import psycopg

        return psycopg.connect(host=self.sock, port=self.port, user=user or self.user, dbname=dbname,
                               autocommit=True, connect_timeout=10)

    def _superuser(self, cluster) -> str:
        import psycopg

        dsn_user = dict(p.split("=", 1) for p in (cluster.dsn or "").split() if "=" in p).get("user")
        last = None
        for candidate in dict.fromkeys(u for u in ("postgres", cluster.run_as, dsn_user, os.environ.get("PGUSER"))
                                       if u):
            try:
                with self.connect("postgres", candidate) as c:
                    return c.execute("select rolname from pg_roles where oid = 10").fetchone()[0]
            except psycopg.Error as e:
                last = e
        raise PgdrError(f"cannot connect to the restored server on port {self.port}: {last}")


def validate_scratch(cluster: ClusterConfig, plan: DrillPlan, mark: dict, restored: dict) -> dict:
    """Every validation, each with its outcome; fails (naming the causes) when any failed."""
    same_host(restored)
    t0 = time.monotonic()
    results: list[dict] = []
    major = int((Path(restored["pgdata"]) / "PG_VERSION").read_text().strip())

    def add(name, ok, detail, seconds=0.0, **extra):
        results.append({"name": name, "ok": bool(ok), "detail": detail, "seconds": round(seconds, 3), **extra})
        (log.info if ok else log.error)("validation %s: %s — %s", name, "ok" if ok else "FAILED", detail)

    try:
        s = _Scratch(cluster, plan, restored, major)
        with s.connect() as c:
            in_recovery = c.execute("select pg_is_in_recovery()").fetchone()[0]
            databases = [r[0] for r in c.execute("select datname from pg_database where datallowconn "
                                                 "and datname <> 'template1' order by 1")]
        add("server", not in_recovery, f"up on port {s.port} (socket {s.sock}), "
            + ("promoted" if not in_recovery else "still in recovery"))
    except Exception as e:
        add("server", False, f"not answering: {e}")
        raise DrillFailed("server", f"the restored server does not answer: {e}",
                          {"validations": results, "seconds": round(time.monotonic() - t0, 3)}) from None
    add(*_target_reached(plan, mark, restored))
    with ThreadPoolExecutor(max_workers=max(plan.jobs, 1) + 1) as pool:
        amcheck = pool.submit(_amcheck, s, plan) if "amcheck" in plan.validations else None
        dumps = {db: pool.submit(_read_all, s, db) for db in databases} if "read_all" in plan.validations else {}
        if amcheck:
            add("amcheck", *amcheck.result())
        if dumps:
            outcomes = {db: f.result() for db, f in dumps.items()}
            bad = {db: o for db, o in outcomes.items() if not o[0]}
            secs = max((o[2] for o in outcomes.values()), default=0.0)
            mb = sum(o[3] for o in outcomes.values()) / 1e6
            add("read_all", not bad, "; ".join(f"{db}: {o[1]}" for db, o in bad.items()) if bad else
                f"every table of {len(outcomes)} database(s) read in full ({', '.join(outcomes)}; {mb:.1f} MB)",
                secs, databases=sorted(outcomes))
    if "checks" in plan.validations:
        for check in cluster.drill.checks:
            add(*_user_check(s, check))
    if "canary" in plan.validations and mark.get("canary"):
        add(*_canary(s, mark["canary"]))
    seconds = round(time.monotonic() - t0, 3)
    record = {"validations": results, "seconds": seconds, "databases": databases,
              "parallel": {"amcheck_seconds": next((r["seconds"] for r in results if r["name"] == "amcheck"), None),
                           "read_all_seconds": next((r["seconds"] for r in results if r["name"] == "read_all"), None)}}
    failed = [r for r in results if not r["ok"]]
    if failed:
        raise DrillFailed(failed[0]["name"], "validation failed: " + "; ".join(f"{r['name']}: {r['detail']}"
                                                                               for r in failed), record)
    return record


def _target_reached(plan: DrillPlan, mark: dict, restored: dict) -> tuple:
    """The timeline switch the promotion wrote: its LSN (where recovery ended) against the marked LSN."""
    wal = Path(restored["pgdata"]) / "pg_wal"
    histories = sorted(wal.glob("*.history"))
    if not histories:
        return "target_reached", False, "no timeline history after promotion: recovery did not end at a target"
    lines = [ln for ln in histories[-1].read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    tli, switch, *reason = lines[-1].split("\t")
    reason = reason[0] if reason else ""
    reached = switch.strip()
    if plan.light or plan.target_time:
        return "target_reached", True, f"recovery ended at {reached} ({reason})", 0.0
    ok = parse_lsn(reached) >= parse_lsn(mark["lsn"])
    if mark.get("method") == "restore_point":
        ok = ok and mark["name"] in reason
    detail = (f"reached LSN {reached} >= marked {mark['lsn']} ({reason})" if ok else
              f"recovery ended at {reached}, before the mark {mark['lsn']} ({reason})")
    return "target_reached", ok, detail, 0.0


def _amcheck(s: _Scratch, plan: DrillPlan) -> tuple:
    t0 = time.monotonic()
    cmd = [s.bins.tool("pg_amcheck"), "-h", s.sock, "-p", str(s.port), "-U", s.user, "--all", "--install-missing",
           "--jobs", str(max(plan.jobs, 1)), "--no-password"]
    if plan.heapallindexed:
        cmd.append("--heapallindexed")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=plan.timeout_seconds)
    secs = time.monotonic() - t0
    what = "heap and btree of every database" + (", heapallindexed" if plan.heapallindexed else "")
    if proc.returncode == 0 and not proc.stdout.strip():
        return True, f"no corruption ({what})", secs
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return False, f"pg_amcheck exit {proc.returncode}: " + " | ".join(lines[:6]), secs


def _read_all(s: _Scratch, db: str) -> tuple:
    """pg_dump of one database to /dev/null: every row of every table, TOAST included, is read."""
    t0 = time.monotonic()
    cmd = [s.dump_bins.tool("pg_dump"), "-h", s.sock, "-p", str(s.port), "-U", s.user, "--no-password", "-d", db]
    size = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        while chunk := proc.stdout.read(1 << 20):
            size += len(chunk)
        err = proc.stderr.read().decode(errors="replace")
    secs = time.monotonic() - t0
    if proc.returncode != 0:
        return False, f"pg_dump exit {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}", \
            secs, size
    return True, "read", secs, size


def _user_check(s: _Scratch, check) -> tuple:
    t0 = time.monotonic()
    name = f"check:{check.name}"
    try:
        with s.connect(check.database) as c:
            row = c.execute(check.sql).fetchone()
    except Exception as e:
        return name, False, f"query failed in {check.database}: {first_line(e)}", \
            time.monotonic() - t0
    got = None if row is None else row[0]
    got_text = ("t" if got else "f") if isinstance(got, bool) else (None if got is None else str(got))
    ok = got_text == check.expected
    return name, ok, (f"{got_text!r} as expected" if ok else f"expected {check.expected!r}, got {got_text!r}"), \
        time.monotonic() - t0


def _canary(s: _Scratch, canary: dict) -> tuple:
    from psycopg import sql

    t0 = time.monotonic()
    try:
        with s.connect(canary["database"]) as c:
            n = c.execute(sql.SQL("select count(*) from {} where run_id = %s")
                          .format(sql.Identifier(*canary["table"].split("."))), (canary["run_id"],)).fetchone()[0]
    except Exception as e:
        return "canary", False, f"cannot read {canary['database']}.{canary['table']}: {e}", time.monotonic() - t0
    return "canary", n == 1, (f"the row written just before the mark is there ({canary['table']})" if n == 1 else
                              f"the row written just before the mark is missing from {canary['table']}"), \
        time.monotonic() - t0


# ---------------------------------------------------------------- 4. measure

def measure_rto(plan: DrillPlan, restored: dict, validated: dict) -> dict:
    phases = {"restore": restored["phases"].get("restore", 0.0),
              **restored.get("phases_server", {}), "validation": validated.get("seconds", 0.0)}
    phases = {k: round(float(phases.get(k, 0.0)), 3) for k in PHASES}
    total = round(sum(phases.values()), 3)
    record = {"phases": phases, "total_seconds": total, "target_seconds": plan.rto_seconds,
              "ok": total <= plan.rto_seconds,
              "validation_share": round(phases["validation"] / total, 3) if total else None}
    log.info("RTO %.1f s (target %d s): %s", total, plan.rto_seconds,
             ", ".join(f"{PHASE_NAMES[k]} {v:.2f} s" for k, v in phases.items()))
    if not record["ok"]:
        raise DrillFailed("rto", f"RTO target missed: {total:.1f} s from restore to validated, target "
                          f"{plan.rto_seconds} s", record)
    return record


# ---------------------------------------------------------------- 5. tear down

def _stop_server(cluster: ClusterConfig, plan: DrillPlan) -> str:
    pgdata = plan.pgdata
    pid = _pid(pgdata)
    if pid is None or not pid_alive(pid):
        return "not running"
    try:
        if stop_server(pgdata, timeout=60):  # fast, then immediate; signals only the postmaster of pgdata
            return "stopped"
    except (PgdrError, OSError) as e:
        log.warning("the scratch server did not stop (%s); killing the postmaster", e)
    cmdline = _read(Path(f"/proc/{pid}/cmdline")).replace("\0", " ")
    if "postgres" in cmdline and str(pgdata) in cmdline:
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not pid_alive(pid):
                return "killed"
            time.sleep(0.1)
    if pid_alive(pid):
        raise PgdrError(f"the scratch server (pid {pid}) in {pgdata} could not be stopped")
    return "stopped"


def _remove_tree(run: Path) -> None:
    if os.path.ismount(run):
        raise PgdrError(f"{run} is a mount point; not removing it")
    shutil.rmtree(run)


def same_host(restored: dict | None) -> None:
    """The scratch server lives on the worker that restored it: a step elsewhere would see nothing there."""
    host = (restored or {}).get("host")
    if host and host != socket.gethostname():
        raise PgdrError(f"this step runs on {socket.gethostname()}, but the scratch server is on {host}: route the "
                        "drill's tasks to one worker (drill.queue served by a single worker)")


def teardown(cluster: ClusterConfig, plan: DrillPlan, wait=time.sleep, restored: dict | None = None) -> dict:
    """Stop the scratch server and remove the run's directory — only the drill's own (fails closed)."""
    same_host(restored)
    run = Path(plan.scratch)
    base = Path(cluster.drill.scratch_dir).resolve()
    record: dict = {"scratch": str(run), "kept_minutes": 0}
    if plan.keep_minutes and _pid(plan.pgdata):
        log.info("keeping the scratch server up for %d minute(s): psql -h %s -p <port> -U <superuser>",
                 plan.keep_minutes, plan.socket_dir)
        record["kept_minutes"] = plan.keep_minutes
        wait(plan.keep_minutes * 60)
    record["server"] = _stop_server(cluster, plan) if run.exists() else "not running"
    _remove_socket_dir(plan)
    record["socket_dir_removed"] = not os.path.lexists(plan.socket_dir)
    if not run.exists():
        record["scratch_removed"] = True
        return record
    resolved = run.resolve()
    if resolved.parent.parent != base or not (run / MARKER).is_file() or \
            (run / MARKER).read_text().strip() != plan.run_id:
        raise PgdrError(f"{run} is not this drill's scratch directory (no matching {MARKER}); not removing it")
    _remove_tree(run)
    record["scratch_removed"] = not run.exists()
    log.info("scratch server %s; %s removed", record["server"], run)
    return record


# ---------------------------------------------------------------- report

@dataclass
class DrillReport(JsonResult):
    cluster: str
    run_id: str
    ok: bool
    failures: list  # [{"cause", "step", "message"}]
    backup: dict | None
    wal: dict | None
    mark: dict | None
    rpo: dict
    rto: dict
    validations: list
    teardown: dict | None
    versions: dict
    started_at: str | None = None
    finished_at: str | None = None
    light: bool = False
    key: str | None = None  # where the report is stored in the repository


def make_report(cluster: ClusterConfig, plan: DrillPlan, steps: dict, errors: dict,
                started_at: str | None = None) -> DrillReport:
    """The report from whatever each step returned (``steps``) or failed with (``errors``: step -> error dict)."""
    mark = steps.get("mark") or (errors.get("mark") or {}).get("record")
    restored = steps.get("restore") or (errors.get("restore") or {}).get("record") or {}
    validated = steps.get("validate") or (errors.get("validate") or {}).get("record") or {}
    rto = steps.get("measure") or (errors.get("measure") or {}).get("record")
    if rto is None and restored.get("phases"):
        phases = {"restore": restored["phases"].get("restore", 0.0), **restored.get("phases_server", {}),
                  "validation": validated.get("seconds", 0.0)}
        rto = {"phases": phases, "total_seconds": round(sum(phases.values()), 3), "target_seconds": plan.rto_seconds,
               "ok": None, "detail": "not measured: an earlier step failed"}
    failures = [{"step": step, "cause": e.get("cause") or "error", "message": e.get("message")}
                for step, e in errors.items() if e]
    if mark and mark.get("rpo_ok") is False and not any(f["cause"] == "rpo" for f in failures):
        failures.append({"step": "mark", "cause": "rpo", "message": "RPO target missed"})
    mark_ = {k: v for k, v in (mark or {}).items() if not k.startswith("rpo")} or None
    rpo = {"seconds": (mark or {}).get("rpo_seconds"), "target_seconds": plan.rpo_seconds,
           "ok": (mark or {}).get("rpo_ok"), "archived_lsn": (mark or {}).get("archived_lsn")}
    recovery = restored.get("recovery") or {}
    return DrillReport(
        cluster=cluster.name, run_id=plan.run_id, ok=not failures, failures=failures,
        backup=restored.get("backup"), wal={**(restored.get("wal") or {}), "reached": recovery.get("reached_lsn"),
                                            "stopped_at": recovery.get("stopped_at")} if restored.get("wal") else None,
        mark=mark_, rpo=rpo, rto=rto or {"target_seconds": plan.rto_seconds, "ok": None},
        validations=validated.get("validations", []), teardown=steps.get("teardown") or errors.get("teardown"),
        versions={"pgdr": __version__, "postgresql": (restored.get("backup") or {}).get("pg_version")},
        started_at=started_at, finished_at=iso(utcnow()), light=plan.light)


def write_report(storage, report: DrillReport) -> str:
    """Into ``<cluster>/reports/drill/`` (locked under Object Lock when configured)."""
    from pgdr.audit import write_audit

    record = report.to_dict()
    record.pop("key", None)
    key = write_audit(storage, report.cluster, "drill", record)
    report.key = key
    return key


def summary_line(report: DrillReport) -> str:
    """One line for an alert: backup, RTO, RPO, the failed check."""
    rto, rpo = report.rto or {}, report.rpo or {}
    parts = [f"drill of cluster '{report.cluster}' {'PASSED' if report.ok else 'FAILED'}",
             f"backup {(report.backup or {}).get('label', '?')}",
             f"RTO {_secs(rto.get('total_seconds'))} (target {rto.get('target_seconds')} s)",
             f"RPO {_secs(rpo.get('seconds'))} (target {rpo.get('target_seconds')} s)"]
    if report.failures:
        f = report.failures[0]
        parts.append(f"failed: {f['cause']} at step {f['step']}: {f['message']}")
    return "; ".join(parts)


def _secs(v) -> str:
    return "n/a" if v is None else f"{v:.1f} s"


def render_summary(report: DrillReport) -> str:
    """The readable table that ends the task log and `pgdr drill`'s output."""
    b, rto, rpo = report.backup or {}, report.rto or {}, report.rpo or {}
    out = [f"DR drill of cluster '{report.cluster}' (run {report.run_id}): {'PASSED' if report.ok else 'FAILED'}",
           f"  backup   {b.get('label', 'n/a')}  PostgreSQL {b.get('pg_version', '?')}  "
           f"{(b.get('size') or 0) / 1e6:.1f} MB ({(b.get('stored_size') or 0) / 1e6:.1f} MB stored)"]
    if report.mark and report.mark.get("lsn"):
        out.append(f"  mark     {report.mark.get('method')} {report.mark.get('name', '')} at {report.mark['lsn']} "
                   f"({report.mark.get('time')})")
    if report.wal:
        out.append(f"  WAL      {report.wal.get('from')} .. {report.wal.get('to') or 'end of backup'}"
                   f" (recovery ended: {report.wal.get('stopped_at') or report.wal.get('reached') or 'n/a'})")
    out.append(f"  RPO      {_secs(rpo.get('seconds'))}  target {rpo.get('target_seconds')} s  "
               f"{_verdict(rpo.get('ok'))}")
    out.append(f"  {'phase':34} {'seconds':>9}")
    for k in PHASES:
        v = (rto.get("phases") or {}).get(k)
        out.append(f"  {PHASE_NAMES[k]:34} {('%.2f' % v) if v is not None else 'n/a':>9}")
    out.append(f"  {'RTO total':34} {_secs(rto.get('total_seconds')):>9}  target {rto.get('target_seconds')} s  "
               f"{_verdict(rto.get('ok'))}")
    if report.validations:
        out.append(f"  {'validation':22} {'result':6} {'seconds':>8}  detail")
        for v in report.validations:
            out.append(f"  {v['name'][:22]:22} {'ok' if v['ok'] else 'FAIL':6} {v['seconds']:8.2f}  {v['detail'][:110]}")
    for f in report.failures:
        out.append(f"  FAILED   {f['cause']} (step {f['step']}): {(f['message'] or '')[:300]}")
    t = report.teardown or {}
    out.append(f"  teardown server {t.get('server', 'n/a')}; scratch removed: {t.get('scratch_removed', 'n/a')}")
    if report.key:
        out.append(f"  report   {report.key}")
    return "\n".join(out)


def _verdict(ok) -> str:
    return "ok" if ok else ("n/a" if ok is None else "MISSED")


# ---------------------------------------------------------------- all in one (the CLI)

def run_drill(cluster: ClusterConfig, conn, storage, plan: DrillPlan, config_path: str | None = None,
              wait=time.sleep) -> DrillReport:
    """The whole drill in one call; the teardown always runs and the report is always written."""
    started = iso(utcnow())
    steps: dict = {}
    errors: dict = {}

    def step(name, fn, *args):
        try:
            steps[name] = fn(*args)
            return True
        except DrillFailed as e:
            errors[name] = {**e.to_dict(), "record": e.record}
        except PgdrError as e:
            errors[name] = {**e.to_dict(), "cause": name}
        log.error("drill step %s failed: %s", name, errors[name]["message"])
        return False

    try:
        if step("mark", mark_moment, cluster, conn, storage, plan) and \
                step("restore", restore_scratch, cluster, storage, plan, steps["mark"], config_path) and \
                step("validate", validate_scratch, cluster, plan, steps["mark"], steps["restore"]):
            step("measure", measure_rto, plan, steps["restore"], steps["validate"])
    finally:
        step("teardown", teardown, cluster, plan, wait)
    report = make_report(cluster, plan, steps, errors, started)
    write_report(storage, report)
    return report


@dataclass
class DrillHistory(JsonResult):
    cluster: str
    drills: list


def list_drills(storage, cluster: str) -> DrillHistory:
    from pgdr.audit import read_audit

    rows = []
    for r in read_audit(storage, cluster, "drill"):
        rows.append({"recorded_at": r.get("recorded_at"), "run_id": r.get("run_id"), "ok": r.get("ok"),
                     "backup": (r.get("backup") or {}).get("label"),
                     "rto_seconds": (r.get("rto") or {}).get("total_seconds"),
                     "rto_target": (r.get("rto") or {}).get("target_seconds"),
                     "rpo_seconds": (r.get("rpo") or {}).get("seconds"),
                     "rpo_target": (r.get("rpo") or {}).get("target_seconds"),
                     "failures": [f.get("cause") for f in r.get("failures") or []],
                     "light": r.get("light", False)})
    return DrillHistory(cluster=cluster, drills=rows)


def render_history(h: DrillHistory) -> str:
    out = [f"cluster {h.cluster}: {len(h.drills)} drill(s)",
           f"  {'recorded at':27} {'result':6} {'backup':17} {'RTO':>9} {'RPO':>9}  failed"]
    for d in h.drills:
        out.append(f"  {d['recorded_at']:27} {'ok' if d['ok'] else 'FAIL':6} {d['backup'] or 'n/a':17} "
                   f"{_secs(d['rto_seconds']):>9} {_secs(d['rpo_seconds']):>9}  {', '.join(d['failures']) or '-'}")
    return "\n".join(out)
