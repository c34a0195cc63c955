"""Restore a backup into a new data directory, trusting nothing unchecked.

Every stored object's SHA-256 (as stored, and after decompression) must match
the manifest, and PostgreSQL's own ``pg_verifybackup`` must accept the result,
before the directory is handed over. If anything fails, the target directory is
returned to the empty state it was found in.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pgdr.config import ClusterConfig
from pgdr.errors import PgdrError, RecoveryShort, RestoreRefused
from pgdr.lock import pid_alive
from pgdr.pgbin import as_user, find_bin_dir, reachable_by, user_ids
from pgdr.lsn import parse_lsn
from pgdr.recovery import (RecoveryPlan, RecoveryTarget, measure_recovery, plan_recovery, query_replay_position,
                           restore_command, restore_command_argv, wait_for_recovery, write_recovery_settings)
from pgdr.repository import Repository
from pgdr.results import JsonResult
from pgdr.paths import confine
from pgdr.server import SERVER_ENV_PASS, check_listen, server_env, start_server
from pgdr.storage import Storage
from pgdr.unpack import pg_verifybackup as _pg_verifybackup
from pgdr.incremental import chain_of, restore_chain
from pgdr.unpack import require_key
from pgdr.unpack import unpack as _unpack
from pgdr.wal import PREFETCH_DIR, WalArchive

log = logging.getLogger(__name__)


@dataclass
class RestoreResult(JsonResult):
    cluster: str
    label: str
    pgdata: str
    repository: str
    pg_version: str
    system_identifier: str
    stop_lsn: str
    size: int
    stored_size: int
    parts_verified: int
    pg_verifybackup: str
    duration_seconds: float
    throughput_mb_s: float
    owner: str
    started: bool
    port: int | None
    recovery: dict | None = None  # target restores: the plan and what recovery reached
    chain: list | None = None  # an incremental: the labels applied, full first
    safety_backup: dict | None = None  # a confirmed replace: the backup of what the destination held
    # The restore's RTO by phase, measured like a drill's: fetch + verify + unpack, then start and recovery
    # (WAL replay and promotion) until the server accepts connections; total from "restore begins".
    phases: dict | None = None


def check_target(pgdata: Path) -> None:
    """Refuse a running or non-empty data directory before touching anything."""
    if pgdata.exists() and not pgdata.is_dir():
        raise RestoreRefused(f"{pgdata} exists and is not a directory; nothing was touched")
    if not pgdata.exists():
        return
    pid_file = pgdata / "postmaster.pid"
    if pid_file.exists():
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (ValueError, OSError):
            pid = 0
        if pid and pid_alive(pid):
            raise RestoreRefused(f"{pgdata} belongs to a running PostgreSQL server (pid {pid}); stop it and "
                                 "restore into an empty directory; nothing was touched")
    entries = sorted(os.listdir(pgdata))
    if entries:
        shown = ", ".join(entries[:5]) + (" …" if len(entries) > 5 else "")
        raise RestoreRefused(f"{pgdata} is not empty ({shown}); restore only writes into an empty or new "
                             "directory; nothing was touched")


def _empty(pgdata: Path, created: bool) -> None:
    if created:
        shutil.rmtree(pgdata, ignore_errors=True)
        return
    for entry in pgdata.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def run_restore(cluster: ClusterConfig, storage: Storage, label: str, pgdata: str | os.PathLike, *,
                start: bool = False, port: int | None = None, socket_dir: str | None = None,
                run_as: str | None = None, verify_checksums: bool = False,
                recovery_target: RecoveryTarget | None = None, config_path: str | None = None,
                dry_run: bool = False, timeout: float = 3600,
                keep_archiving: bool = False, listen: str | None = None) -> RestoreResult | RecoveryPlan:
    t0 = time.monotonic()
    target = confine(pgdata, cluster.restore_roots)  # absolute, no '..', safe characters, inside restore_roots
    listen = check_listen(listen)
    owner = run_as or cluster.run_as
    repo = Repository(storage, cluster.name)
    plan = manifest = None
    if recovery_target is None and not dry_run:
        manifest = repo.resolve(label)
        if not manifest.wal_included:
            # WAL was not embedded: even "the end of the backup" is reached by replaying archived WAL.
            recovery_target = RecoveryTarget("immediate", action="promote")
    if recovery_target is not None or dry_run:
        archive = WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level)
        manifest, plan = plan_recovery(repo.backups(), archive, recovery_target, label)
    check_target(target)
    if dry_run:
        log.info("dry run: would restore backup %s into %s%s", manifest.label, target,
                 f", then replay WAL {plan.wal_from} .. {plan.wal_to or 'newest archived'}"
                 if recovery_target else "")
        return plan
    if start and port is None:
        raise RestoreRefused("--start needs --port: pick a free port for the restored server")
    verify_bins = find_bin_dir(manifest.pg_major, cluster.pg_bin_dir, tool="pg_verifybackup")
    if verify_bins.major != manifest.pg_major:
        log.warning("no PostgreSQL %d pg_verifybackup; using %d's, which cannot parse this version's WAL "
                    "(file checksums are still verified)", manifest.pg_major, verify_bins.major)
    server_bins = find_bin_dir(manifest.pg_major, cluster.pg_bin_dir, tool="postgres", exact=True) if start else None
    uid_gid = user_ids(owner) if os.geteuid() == 0 else None

    log.info("restoring backup %s of cluster %s (PostgreSQL %s, %.1f MB) from %s into %s",
             manifest.label, cluster.name, manifest.pg_version_text, manifest.size / 1e6,
             storage.describe(), target)
    # An incremental restores through its chain: every link is checked, every member's key opened, before
    # anything is written.
    chain = chain_of(repo, manifest) if manifest.type == "incr" else [manifest]
    if len(chain) > 1:
        log.info("backup %s is an incremental: restoring the chain %s, applied in place",
                 manifest.label, " -> ".join(m.label for m in chain))
    for member in chain:
        require_key(repo, member)
    if recovery_target is not None and start:
        _check_restore_command(config_path, cluster.name, owner if uid_gid else None, server_env(cluster, storage))
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if len(chain) > 1:
            restore_chain(repo, chain, target)
        else:
            _unpack(repo, manifest, target)
        if uid_gid:
            _chown_tree(target, *uid_gid)
        os.chmod(target, 0o700)
        verify = _pg_verifybackup(verify_bins, target, manifest.pg_major, verify_checksums,
                                  parse_wal=manifest.wal_included)
        if recovery_target is not None:
            write_recovery_settings(target, recovery_target, restore_command(config_path, cluster.name), uid_gid)
        t_unpacked = time.monotonic()
    except BaseException:
        log.error("restore into %s failed; emptying it again", target)
        _empty(target, created)
        raise
    started = False
    recovery = {"plan": plan.to_dict(), "state": "configured: start the server to recover"} if plan else None
    if start:
        user = owner if uid_gid else None
        try:
            bins = reachable_by(server_bins, user)
            _start(bins, target, port, socket_dir, user, wait=recovery_target is None,
                   keep_archiving=keep_archiving, env=server_env(cluster, storage), listen=listen)
            started = True
            if recovery_target is not None:
                recovery = _recover(bins, target, plan, recovery_target, user, port, socket_dir, timeout)
        except BaseException as e:
            # Never leave a half-recovered server running, nor its data directory looking restored.
            _stop_server(target)
            _empty(target, created)
            state = "removed" if created else "emptied"
            log.error("restore into %s failed after writing; server stopped, directory %s", target, state)
            if isinstance(e, RecoveryShort):
                e.args = (f"{e.args[0]}; restore failed: {target} was {state} and no server is left running",)
                if e.expected_lsn is None and plan is not None and recovery_target is not None:
                    e.expected_lsn = recovery_target.value if recovery_target.kind == "lsn" else plan.expected_lsn
            elif isinstance(e, PgdrError):
                e.args = (f"{e.args[0]}; {target} was {state} and no server is left running",)
            raise
    t_end = time.monotonic()
    duration = max(t_end - t0, 1e-6)
    phases = {"fetch_verify_unpack": round(t_unpacked - t0, 3)}
    if started:
        phases["start_and_recovery"] = round(t_end - t_unpacked, 3)
    phases["total"] = round(duration, 3)
    result = RestoreResult(
        cluster=cluster.name, label=manifest.label, pgdata=str(target), repository=storage.describe(),
        pg_version=manifest.pg_version_text, system_identifier=manifest.system_identifier,
        stop_lsn=manifest.stop_lsn, size=manifest.size, stored_size=manifest.stored_size,
        parts_verified=sum(len(m.files) for m in chain), pg_verifybackup=verify,
        duration_seconds=round(duration, 3), throughput_mb_s=round(manifest.size / duration / 1e6, 1),
        owner=owner if uid_gid else str(os.geteuid()), started=started, port=port if start else None,
        recovery=recovery, phases=phases, chain=[m.label for m in chain] if len(chain) > 1 else None,
    )
    log.info("restore of %s into %s done: %d parts verified, pg_verifybackup %s, %.1f s%s",
             manifest.label, target, result.parts_verified, verify, result.duration_seconds,
             f", server started on port {port}" if started else "")
    return result


def _recover(bins, target: Path, plan: RecoveryPlan, recovery_target: RecoveryTarget, user, port, socket_dir,
             timeout: float) -> dict:
    """Wait for recovery to end, then measure it against the plan (RecoveryShort when it fell short)."""
    outcome = wait_for_recovery(target / "pgdr-restore-start.log", recovery_target.action,
                                _running_check(target), timeout)
    if outcome.state in ("promoted", "paused"):
        pos = query_replay_position(bins.tool("psql"), user, port, socket_dir)
        if pos:
            # The end of the last record replayed (PostgreSQL's "redo done at" is its start): the larger.
            known = [x for x in (outcome.reached_lsn, pos[0]) if x]
            outcome.reached_lsn = max(known, key=parse_lsn) if known else None
            outcome.reached_time = outcome.reached_time or pos[1]
    measure_recovery(plan, recovery_target, outcome)
    shutil.rmtree(target / "pg_wal" / PREFETCH_DIR, ignore_errors=True)
    log.info("recovery %s at LSN %s (last transaction %s); expected %s", outcome.state, outcome.reached_lsn,
             outcome.reached_time, plan.expected_lsn)
    return {"plan": plan.to_dict(), **outcome.to_dict(), "expected_lsn": plan.expected_lsn}


def _check_restore_command(config_path: str | None, cluster: str, user: str | None, env: dict | None) -> None:
    """Before anything is written: the restored server's restore_command (pgdr wal-fetch, as the server's
    user, with its environment) must be able to start, read the configuration and reach the repository.
    It is asked for a file no archive holds (timeline 0's history); only "not archived" (1) is the answer of
    a working command — anything else would stop recovery at its first segment."""
    cmd = restore_command_argv(config_path, cluster) + ["--prefetch", "0", "00000000.history", "/nonexistent/pgdr-check"]
    try:
        proc = subprocess.run(as_user(cmd, user), capture_output=True, text=True, env=env, cwd="/", timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RestoreRefused(f"the restored server's restore_command cannot run: {e}; nothing was written") from None
    if proc.returncode != 1:
        detail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RestoreRefused(
            f"the restored server's restore_command (pgdr wal-fetch{f' as user {user}' if user else ''}) fails: "
            f"exit {proc.returncode}: {detail}; recovery could not fetch any WAL. Make pgdr and its configuration "
            "readable by that user; nothing was written")


def _server_processes(target: Path) -> list[int]:
    """The restored server's processes: PostgreSQL's, and pgdr's restore_command (wal-fetch and its
    prefetchers), running as the directory's owner with their working directory in it (the postmaster and its
    children chdir into the data directory; restore_command starts there). Nobody else's."""
    out, target = [], target.resolve()
    try:
        owner = target.stat().st_uid
    except OSError:
        return out
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            uid = entry.stat().st_uid
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (cwd == target or target in cwd.parents) and uid == owner and (b"postgres" in cmdline
                                                                           or b"pgdr" in cmdline):
            out.append(int(entry.name))
    return out


def _stop_server(target: Path, timeout: float = 60) -> None:
    """Stop whatever runs in ``target`` (immediate shutdown of the postmaster, then anything left)."""
    import signal

    try:
        pid = int((target / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        pid = 0
    if pid and pid_alive(pid) and pid in _server_processes(target):
        try:
            os.kill(pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = _server_processes(target)
        for p in left:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            left = [p for p in left if pid_alive(p)]
            time.sleep(0.1)
        if not left:
            return
    raise PgdrError(f"could not stop the processes still working in {target}: {left}")


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def _running_check(target: Path):
    """A callable telling whether the server in ``target`` is still running."""
    state = {"pid": None, "since": time.monotonic()}

    def running() -> bool:
        pid_file = target / "postmaster.pid"
        if state["pid"] is None:
            try:
                state["pid"] = int(pid_file.read_text().split("\n", 1)[0])
            except (OSError, ValueError):
                log_file = target / "pgdr-restore-start.log"
                if log_file.exists() and "database system is shut down" in log_file.read_text(errors="replace"):
                    return False
                return time.monotonic() - state["since"] < 30  # still starting
        return pid_alive(state["pid"])

    return running


def _start(bins, target: Path, port: int, socket_dir: str | None, user: str | None, wait: bool = True,
           keep_archiving: bool = False, env: dict | None = None, listen: str = "127.0.0.1") -> None:
    if not (target / "postgresql.conf").exists():
        # Debian keeps postgresql.conf in /etc; give the restored cluster a minimal one.
        (target / "postgresql.conf").write_text("# written by pgdr restore: the backup held no postgresql.conf\n")
        if user:
            os.chown(target / "postgresql.conf", *user_ids(user))
    # Archiving off unless asked: a test restore must never push a new timeline into the
    # repository. Logging to our file: recovery progress is read from it. Loopback only unless asked.
    # postgres itself, no pg_ctl: nothing here passes through a shell.
    settings = {"listen_addresses": listen, "logging_collector": "off", "log_destination": "stderr"}
    if not keep_archiving:
        settings["archive_mode"] = "off"
    log_file = target / "pgdr-restore-start.log"
    try:
        start_server(bins.tool("postgres"), target, port, user=user, log_file=log_file, settings=settings,
                     socket_dir=socket_dir, env=env if env is not None else _minimal_env(), wait=wait)
    except PgdrError as e:
        raise PgdrError(f"{target} is restored and verified, but the server did not start: {e}") from None


def _minimal_env() -> dict:
    return {k: v for k, v in os.environ.items() if k in SERVER_ENV_PASS or k.startswith("LC_")}
