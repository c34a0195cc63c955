"""The ``pgdr`` command: everything a restore needs, with Airflow down.

Exit codes: 0 ok, 1 the operation failed or was refused, 2 usage or config
error. ``wal-fetch`` (PostgreSQL's restore_command) is the exception: 1 only
for "not in the archive", 200 for every other failure (recovery must stop). With ``--json`` the result (or the error) is one JSON document on
stdout: a stable contract. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass

from pgdr import __version__
from pgdr.errors import PgdrError, UsageError
from pgdr.results import JsonResult

log = logging.getLogger("pgdr")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="configuration file (default: $PGDR_CONFIG, else /etc/pgdr/pgdr.yaml, else the "
                             "checkout's include/pgdr.yaml)",
                        default=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the result as JSON on stdout")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="log only warnings and errors")

    p = argparse.ArgumentParser(prog="pgdr", parents=[common],
                                description="PostgreSQL disaster recovery: backups and restores you can prove.")
    p.add_argument("--version", action="version", version=f"pgdr {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name, help_):
        # argparse %-formats help strings (not descriptions): a literal %p would crash `pgdr --help`.
        # An internal command (help_ None) is left out of the command list.
        kw = {"help": help_.replace("%", "%%"), "description": help_} if help_ else {}
        sp = sub.add_parser(name, parents=[common], **kw)
        sp.add_argument("--cluster", required=True, help="cluster name from the configuration")
        return sp

    kg = sub.add_parser("keygen", parents=[common], help="print a new master key entry for the keyring",
                        description="Print 'id:base64key', a new random 256-bit master key. Append it to the "
                                    "keyring ($PGDR_KEYRING or the Airflow connection) to rotate: new backups use "
                                    "the last key listed; keep old keys while backups need them.")
    kg.add_argument("--id", required=True, help="the key's id, recorded in every object it encrypts (like 2026-11)")
    cmd("check", "check that the cluster and repository are ready for backups")
    b = cmd("backup", "take a physical backup into the repository (full, or with --type incr|auto incremental)")
    b.add_argument("--label", help="backup label (default: now, like 20261125-020000F); reusing a committed label "
                                   "does nothing, reusing an unfinished one replaces it")
    b.add_argument("--wal-timeout", type=float, default=600,
                   help="with backup_wal: archive, how long to wait for the backup's WAL to be archived (default 600)")
    b.add_argument("--type", choices=("full", "incr", "auto"), default="full", dest="backup_type",
                   help="full (default); incr: incremental on top of the newest backup (PostgreSQL 17+ with "
                        "summarize_wal = on, else a full, saying why); auto: the cluster's backup_type_policy")
    cmd("list", "list the backups in the repository")
    i = cmd("info", "show one backup's manifest")
    i.add_argument("--backup", required=True, help="label or 'latest'")
    r = cmd("restore", "restore a backup into an empty data directory (below the cluster's restore_roots)")
    r.add_argument("--backup", default="latest", help="label or 'latest' (default); safety backups by label only")
    r.add_argument("--pgdata", required=True, help="target data directory: new or empty, below one of the "
                                                   "cluster's restore_roots (absolute; letters, digits, _ + - .)")
    r.add_argument("--replace", action="store_true",
                   help="replace a destination holding a data directory of this cluster (running or not), after "
                        "every check and a safety backup of it into the repository; needs --confirm CLUSTER")
    r.add_argument("--confirm", metavar="CLUSTER", help="the cluster's name again, to confirm --replace")
    r.add_argument("--listen", metavar="ADDRESSES", default="127.0.0.1",
                   help="listen_addresses of the started server (default 127.0.0.1: loopback only)")
    r.add_argument("--start", action="store_true", help="start the restored server (archiving off unless "
                                                        "--keep-archiving)")
    r.add_argument("--port", type=int, help="port for the started server")
    r.add_argument("--socket-dir", help="unix socket directory for the started server")
    t = r.add_mutually_exclusive_group()
    t.add_argument("--target-time", metavar="ISO8601", help="recover up to this time (with a zone: …+00:00)")
    t.add_argument("--target-lsn", metavar="LSN", help="recover up to this WAL position (like 0/3000060)")
    t.add_argument("--target-xid", metavar="XID", help="recover up to this transaction id")
    t.add_argument("--target-name", metavar="NAME", help="recover up to this named restore point")
    t.add_argument("--target", choices=["immediate", "latest"],
                   help="immediate: just consistent (end of the backup); latest: all archived WAL")
    r.add_argument("--target-action", choices=["promote", "pause", "shutdown"], default="promote",
                   help="what the server does at the target (default promote)")
    r.add_argument("--target-timeline", help="'latest' (default), 'current' or a timeline number")
    r.add_argument("--target-exclusive", action="store_true", help="stop just before the target, not after it")
    r.add_argument("--keep-archiving", action="store_true",
                   help="start with the backup's own archive settings: for a restore that becomes the new "
                        "primary and archives its new timeline into the repository (default: archiving off)")
    r.add_argument("--dry-run", action="store_true", help="print the plan (backup, WAL range) and write nothing")
    r.add_argument("--timeout", type=float, default=3600, help="seconds to wait for recovery (default 3600)")
    r.add_argument("--verify-checksums", action="store_true",
                   help="also have pg_verifybackup re-read every restored file and check its checksum")
    r.add_argument("--run-as", help="system user to own the data directory and run the server "
                                    "(default: the cluster's run_as, 'postgres')")
    v = cmd("verify", "verify stored backups (checksums, decompression, pg_verifybackup) and the WAL archive")
    v.add_argument("--backup", default="latest",
                   help="label, 'latest' (default), 'all' (a full sweep) or 'new' (only what was never verified, "
                        "and only WAL newer than the last clean check)")
    v.add_argument("--no-pg-verify", action="store_true", help="skip pg_verifybackup on a scratch copy")
    v.add_argument("--no-wal", action="store_true", help="skip the WAL archive")
    e = cmd("expire", "delete what the retention policy no longer needs (fails closed; never a parent of a kept incremental)")
    e.add_argument("--dry-run", action="store_true", help="print the plan and its reasons; delete nothing")
    e.add_argument("--now", metavar="ISO8601", help="plan as of this time instead of now (a future time only with "
                                                    "--dry-run)")
    k = cmd("keep", "pin a backup (and the WAL it needs) against retention: a legal hold")
    k.add_argument("--backup", required=True, help="label or 'latest'")
    k.add_argument("--until", metavar="DATE", help="pin until this date/time (ISO 8601); default: indefinitely")
    u = cmd("unkeep", "remove a backup's pin")
    u.add_argument("--backup", required=True, help="label or 'latest'")
    cmd("probe-write", "write, read back and delete a probe object where wal-push writes (pgdr check runs it as "
                       "the server's OS user in push mode)")
    wp = cmd("wal-push", "archive one WAL segment or history file (archive_command = 'pgdr wal-push … %p')")
    wp.add_argument("path", help="the file to archive (%%p)")
    wp.add_argument("--parallel", type=int, default=None, metavar="N",
                    help="archive through the push queue: one background pusher per server archives every segment "
                         "PostgreSQL marked ready, N in flight, and this call returns once its own segment is "
                         "durable (default 4, at most 8; 0: archive in this process only)")
    wp.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)  # the old name of --parallel
    wp.add_argument("--timeout", type=float, default=60.0, metavar="S",
                    help="with the push queue: fail this call (PostgreSQL retries) when the segment is not "
                         "archived within S seconds (default 60)")
    pq = cmd("wal-push-queue", None)  # internal: the pusher, started by wal-push
    pq.add_argument("pg_wal")
    pq.add_argument("--parallel", type=int, default=4)
    pq.add_argument("--idle", type=float, default=30.0)
    pq.add_argument("--identity", default=None)  # the configuration as the call that started it saw it
    wf = cmd("wal-fetch", "restore one WAL file from the archive (restore_command = 'pgdr wal-fetch … %f %p')")
    wf.add_argument("name", help="WAL file name (%%f)")
    wf.add_argument("dest", help="where to write it (%%p)")
    wf.add_argument("--prefetch", type=int, default=8, metavar="N",
                    help="keep the next N segments downloaded ahead by one background prefetcher per recovery "
                         "(default 8; 0: off)")
    pf = cmd("wal-prefetch", None)  # internal: started by wal-fetch
    pf.add_argument("after")
    pf.add_argument("directory")
    pf.add_argument("--count", type=int, default=8)
    pf.add_argument("--follow", action="store_true")  # the only mode now; accepted for old command lines
    pf.add_argument("--idle", type=float, default=60.0)
    cmd("wal-check", "archived WAL ranges per timeline and every gap")
    cmd("wal-lag", "how far WAL capture is behind the server, and the slot's health")
    ws = cmd("wal-stream", "stream WAL into the repository on a replication slot (the slot advances only "
                           "past what the repository holds)")
    ws.add_argument("--spool", help="ignored: nothing is kept on local disk (accepted for old command lines)")
    ws.add_argument("--duration", type=float, help="stop after this many seconds (default: until interrupted)")
    ws.add_argument("--partial-interval", type=float, default=5.0,
                    help="seconds between uploads of the segment being written (default 5)")
    dr = cmd("drill", "DR drill: mark the moment, restore into a scratch cluster, validate, measure RTO and RPO")
    dr.add_argument("--backup", default="latest", help="label or 'latest' (default)")
    dr.add_argument("--target-time", metavar="ISO8601",
                    help="restore to this point in time instead of a fresh mark (no RPO measured)")
    dr.add_argument("--validations", default=None,
                    help="comma-separated: amcheck, read_all, checks, canary (default: all; not with --light)")
    dr.add_argument("--heapallindexed", action="store_true", default=None,
                    help="pg_amcheck also checks every heap tuple has its index entries (slower)")
    dr.add_argument("--keep-minutes", type=int, help="keep the scratch server up this long before tearing down")
    dr.add_argument("--light", action="store_true", help="the newest backup to its end, started and queried "
                                                         "(no mark, no amcheck or full read)")
    dr.add_argument("--run-id", help="name of this drill run (default: cli-<UTC time>)")
    cmd("drills", "the drill history: each drill's result, RTO and RPO, oldest first")
    return p


@dataclass
class KeygenResult(JsonResult):
    key_id: str
    entry: str  # id:base64key, as the keyring lists it


def _context(args):
    from pgdr.config import load_config
    from pgdr.postgres import ConnInfo
    from pgdr.storage import open_storage

    config = load_config(getattr(args, "config", None))
    cluster = config.cluster(args.cluster)
    return cluster, ConnInfo(dsn=cluster.dsn or ""), open_storage(cluster.repository)


def run(args) -> object:
    if args.command == "keygen":
        from pgdr.crypto import generate_key

        return KeygenResult(args.id, generate_key(args.id))
    cluster, conn, storage = _context(args)
    if args.command == "check":
        from pgdr.check import run_check

        report = run_check(cluster, conn, storage)
        if not report.ok:
            args._exit = 1
        return report
    if args.command == "probe-write":
        from pgdr.check import write_probe

        item = write_probe(cluster, storage)
        if not item.ok:
            args._exit = 1
        return item
    if args.command == "backup":
        from pgdr.backup import run_backup

        return run_backup(cluster, conn, storage, label=args.label, wal_timeout=args.wal_timeout,
                          backup_type=args.backup_type)
    if args.command in ("drill", "drills"):
        from pgdr import drill

        if args.command == "drills":
            return drill.list_drills(storage, cluster.name)
        from pgdr.results import utcnow

        if args.light and args.validations is not None:
            raise UsageError("--light runs no validations besides 'started and queried': drop --validations, or "
                             "--light")
        params = {"backup": args.backup, "target_time": args.target_time,
                  "validations": args.validations or ",".join(("amcheck", "read_all", "checks", "canary"))}
        if args.heapallindexed is not None:
            params["heapallindexed"] = True
        if args.keep_minutes is not None:
            params["keep_minutes"] = args.keep_minutes
        plan = drill.plan_drill(cluster, args.run_id or "cli-" + utcnow().strftime("%Y%m%dT%H%M%SZ"), params,
                                light=args.light)
        report = drill.run_drill(cluster, conn, storage, plan,
                                 config_path=getattr(args, "config", None) or os.environ.get("PGDR_CONFIG"))
        args._exit = 0 if report.ok else 1
        return report
    from pgdr.repository import Repository

    repo = Repository(storage, cluster.name)
    if args.command == "list":
        from pgdr.catalog import list_backups

        return list_backups(repo)
    if args.command == "info":
        from pgdr.verify import last_verification

        m = repo.resolve(args.backup)
        return _Done({**m.to_dict(), "verification": last_verification(repo, m.label)})
    if args.command in ("expire", "keep", "unkeep"):
        from datetime import datetime, timezone

        from pgdr import retention
        from pgdr.recovery import parse_time

        now = datetime.now(timezone.utc)
        if args.command == "expire":
            if args.now:
                now = parse_time(args.now)
            policy = retention.RetentionPolicy(cluster.retention_window_days, cluster.retention_min_full)
            return _Done(retention.run_expire(cluster, storage, policy, now, args.dry_run))
        if args.command == "keep":
            until = parse_time(args.until if "T" in (args.until or "T") else args.until + "T00:00:00+00:00") \
                if args.until else None
            return _Done(retention.set_keep(repo, args.backup, until, now))
        return _Done(retention.clear_keep(repo, args.backup))
    if args.command == "verify":
        from pgdr.verify import run_verify

        if args.backup not in ("latest", "all", "new"):
            from pgdr.labels import check_label

            check_label(args.backup)
        report = run_verify(cluster, storage, args.backup, pg_verify=not args.no_pg_verify, wal=not args.no_wal)
        args._exit = 0 if report.ok else 1
        return report
    if args.command.startswith("wal-"):
        from pgdr.wal import WalArchive

        archive = WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level)
        if args.command == "wal-push":
            from pgdr.walpush import MAX_PARALLEL, push_file, spool_of

            parallel = args.parallel if args.parallel is not None else args.batch
            if parallel is not None and not 0 <= parallel <= MAX_PARALLEL:
                raise UsageError(f"--parallel {parallel}: between 0 and {MAX_PARALLEL}")
            if not 0 < args.timeout <= 3600:
                raise UsageError(f"--timeout {args.timeout:g}: between 0 and 3600 seconds")
            # Here when the push queue did not answer (pgdr.fast): archive in this process.
            return push_file(archive, args.path, spool_of(args.path))
        if args.command == "wal-push-queue":
            from pgdr.fast import identity
            from pgdr.walpush import MAX_PARALLEL, run_pusher

            if not 1 <= args.parallel <= MAX_PARALLEL:
                raise UsageError(f"--parallel {args.parallel}: between 1 and {MAX_PARALLEL}")
            config = getattr(args, "config", None)
            # The identity of the configuration this process read (its file as it was at the start).
            who = args.identity or identity(args.cluster, config)
            return _Done(run_pusher(archive, os.path.abspath(args.pg_wal), args.parallel, who,
                                    current_identity=lambda: identity(args.cluster, config), idle=args.idle))
        if args.command == "wal-fetch":
            from pgdr.fast import identity
            from pgdr.prefetch import own_spool
            from pgdr.wal import SEGMENT

            # Here when the spool did not answer (pgdr.fast): fetch in this process. Only the server's own
            # restore_command uses a spool and starts a prefetcher (pgdr.prefetch.own_spool).
            who = identity(args.cluster, getattr(args, "config", None))
            spool = own_spool(args.dest)
            if spool is not None and _take_prefetched(spool, args.name, args.dest, who):
                result = archive.result_for(args.name, args.dest)
            else:
                result = archive.fetch(args.name, args.dest)
            if spool is not None and args.prefetch > 0 and SEGMENT.fullmatch(args.name) and \
                    result.source == "segment":
                _ensure_prefetcher(args, spool, who)
            return result
        if args.command == "wal-prefetch":
            from pathlib import Path

            from pgdr.fast import identity
            from pgdr.prefetch import MAX_COUNT
            from pgdr.wal import run_prefetcher

            return _Done(run_prefetcher(archive, Path(args.directory).absolute(), max(1, min(args.count, MAX_COUNT)),
                                        identity(args.cluster, getattr(args, "config", None)), args.idle,
                                        after=args.after))
        if args.command == "wal-lag":
            from pgdr.walstream import measure_lag

            report = measure_lag(cluster, conn, storage)
            args._exit = 0 if report.ok else 1
            return report
        if args.command == "wal-stream":
            import signal
            import threading

            from pgdr.walstream import WalStreamer

            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *a: stop.set())
            signal.signal(signal.SIGINT, lambda *a: stop.set())
            return WalStreamer(cluster, conn, storage, args.spool, args.partial_interval).run(args.duration, stop)
        backups = repo.backups()
        report = archive.check(*(_lsn_tli(backups[0]) if backups else (None, None)),
                               *(_stop_lsn_tli(backups[-1]) if backups else (None, None)),
                               until_what=f"backup {backups[-1].label}" if backups else "")
        if not report.ok:
            args._exit = 1
        return report
    if args.command == "restore":
        import getpass

        from pgdr.paths import check_path
        from pgdr.replace import restore_request

        if args.port is not None and not 1 <= args.port <= 65535:
            raise UsageError(f"--port {args.port} is not a TCP port")
        socket_dir = str(check_path(args.socket_dir, "--socket-dir")) if args.socket_dir else None
        if args.confirm and not args.replace:
            raise UsageError("--confirm only goes with --replace")
        result = restore_request(
            cluster, storage, args.backup, args.pgdata, replace=args.replace, confirm=args.confirm,
            dry_run=args.dry_run, recovery_target=_target(args),
            requested_by={"triggered_by": f"cli:{getpass.getuser()}", "params": {
                k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("json", "quiet")}},
            start=args.start, port=args.port, socket_dir=socket_dir, run_as=args.run_as,
            verify_checksums=args.verify_checksums,
            config_path=getattr(args, "config", None) or os.environ.get("PGDR_CONFIG"),
            timeout=args.timeout, keep_archiving=args.keep_archiving, listen=args.listen)
        return _Done(result) if isinstance(result, dict) else result
    raise UsageError(f"unknown command {args.command}")


# Commands recorded in the cluster's audit log (pgdr.audit), by action, and those after which the catalog cache
# the API and the Disaster recovery page read is refreshed.
AUDITED = {"backup": "backup", "expire": "expire", "keep": "keep", "unkeep": "unkeep", "delete": "delete",
           "restore": "restore", "verify": "verify", "drill": "drill", "rotate-key": "rotate_key"}
REFRESHES = {"backup", "expire", "keep", "unkeep", "delete", "verify", "drill", "wal-lag"}


def _audited(args) -> object:
    """run(), with an audit record (the OS user, the command, its parameters, outcome, duration) and a catalog
    refresh afterwards where the command asks for them. Neither ever changes the command's outcome."""
    if args.command not in AUDITED and args.command not in REFRESHES:
        return run(args)
    import time

    started = time.monotonic()
    try:
        result = run(args)
    except PgdrError as e:
        _after(args, "refused" if e.kind in ("usage", "restore_refused", "locked") else "failed", started, error=e)
        raise
    _after(args, "ok" if args._exit == 0 else "failed", started, result=result)
    return result


def _after(args, outcome: str, started: float, result=None, error: PgdrError | None = None) -> None:
    import time

    try:
        cluster, _, storage = _context(args)
        from pgdr.audit import repository_exists

        if not repository_exists(storage, cluster.name):
            return  # nothing to record into: never create a repository for the record's sake
    except PgdrError:
        return  # no configuration to say where the repository is, or it cannot be read
    if args.command in AUDITED:
        from pgdr.audit import os_actor, record_operation

        params = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("json", "quiet")}
        summary = None
        if result is not None and hasattr(result, "to_dict"):
            d = result.to_dict()
            summary = {k: d[k] for k in ("label", "status", "ok", "dry_run", "backup_label", "deleted_backups")
                       if isinstance(d, dict) and k in d}
        try:
            record_operation(storage, cluster.name, actor=os_actor(), actor_type="os", source="cli",
                             action=AUDITED[args.command], parameters=params, outcome=outcome,
                             duration_seconds=time.monotonic() - started, error=error.kind if error else None,
                             message=str(error) if error else None, result=summary)
        except Exception as e:  # noqa: BLE001 - the record never changes the command's outcome
            log.warning("could not write the audit record: %s", e)
    if args.command in REFRESHES and outcome != "refused" and not getattr(args, "dry_run", False):
        from pgdr.catalog import refresh_catalog
        from pgdr.repository import Repository

        lag = result.to_dict() if args.command == "wal-lag" and result is not None else None
        try:
            refresh_catalog(Repository(storage, cluster.name), lag=lag)
        except Exception as e:  # noqa: BLE001 - nor does the cache
            log.warning("could not refresh the catalog cache (%s): the API shows older data until the next "
                        "refresh", e)


class _Done:
    def __init__(self, data):
        self.data = data

    def to_json(self):
        return json.dumps(self.data)

    def to_dict(self):
        return self.data


def _ensure_prefetcher(args, spool, who: str) -> None:
    """Tell the prefetcher of this recovery which segment was just fetched; start it unless it runs. Never
    fails the fetch: a prefetch that does not happen only means the next call fetches for itself."""
    from pgdr.prefetch import PrefetchDeclined

    try:
        spool.want(args.name)
        if spool.holder() is None:
            spool.start_prefetcher(args.cluster, getattr(args, "config", None), args.name, args.prefetch)
    except PrefetchDeclined as e:
        if spool.note_once("declined"):  # said once per recovery, not once per segment
            log.warning("WAL prefetch is off for this recovery: %s", e)
    except Exception as e:  # noqa: BLE001 - the segment is in place: nothing here may fail the fetch
        log.warning("could not start WAL prefetch: %s", e)


def _take_prefetched(spool, name: str, dest: str, who: str) -> bool:
    """A prefetched copy, if there is a good one; a broken spool just means the fetch does the work."""
    try:
        return spool.take(name, dest, who) is not None
    except Exception as e:  # noqa: BLE001
        log.warning("ignoring the prefetch spool for %s: %s", name, e)
        return False


def _target(args):
    from pgdr.recovery import RecoveryTarget

    for kind in ("time", "lsn", "xid", "name"):
        value = getattr(args, f"target_{kind}")
        if value:
            break
    else:
        kind, value = args.target, None
    if kind is None:
        if args.target_exclusive or args.target_timeline or args.target_action != "promote":
            raise UsageError("--target-action, --target-timeline and --target-exclusive need a target")
        return None
    return RecoveryTarget(kind, value, args.target_action, args.target_timeline, args.target_exclusive)


def _lsn_tli(manifest):
    from pgdr.lsn import parse_lsn

    return parse_lsn(manifest.start_lsn), manifest.timeline


def _stop_lsn_tli(manifest):
    from pgdr.lsn import parse_lsn

    return parse_lsn(manifest.stop_lsn), manifest.timeline


def _human(result) -> str:
    from pgdr.catalog import CatalogReport
    from pgdr.check import CheckReport
    from pgdr.wal import WalFetchResult, WalPushResult

    if isinstance(result, KeygenResult):
        return result.entry
    from pgdr.drill import DrillHistory, DrillReport, render_history, render_summary

    if isinstance(result, DrillReport):
        return render_summary(result)
    if isinstance(result, DrillHistory):
        return render_history(result)
    if isinstance(result, (WalFetchResult, WalPushResult)):
        return ""  # archive_command / restore_command: the log line on stderr says it all
    if isinstance(result, CheckReport):
        lines = [f"cluster {result.cluster}: {'ready' if result.ok else 'NOT READY'}"]
        for c in result.checks:
            mark = "ok  " if c.ok else ("FAIL" if c.critical else "warn")
            lines.append(f"  [{mark}] {c.name}: {c.detail}")
        return "\n".join(lines)
    if isinstance(result, CatalogReport):
        lines = [f"cluster {result.cluster} in {result.repository}: {len(result.backups)} backup(s)"]
        for b in result.backups:
            if b.status == "ok":
                lines.append(f"  {b.label}  {b.status:10}  PostgreSQL {b.pg_version}  {b.stop_time}  "
                             f"{(b.size or 0) / 1e6:10.1f} MB -> {(b.stored_size or 0) / 1e6:.1f} MB  "
                             f"LSN {b.start_lsn}..{b.stop_lsn}")
            else:
                lines.append(f"  {b.label}  {b.status:10}  {b.detail}")
        return "\n".join(lines)
    return json.dumps(result.to_dict(), indent=2)


def main(argv: list[str] | None = None, answered: bool = False) -> int:
    """``answered``: pgdr.fast already declined this call (python -m pgdr, the pgdr command): not again."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "wal-fetch" in argv:
        return _wal_fetch_main(argv, answered)
    return _main(argv, answered)


def _wal_fetch_main(argv: list[str], answered: bool = False) -> int:
    """``pgdr wal-fetch`` is PostgreSQL's restore_command, which reads its exit status: 0 restored; 1 (any
    status up to 125) "not in the archive", so recovery may end there; above 125 abort recovery (FATAL). Only
    a file the archive does not hold may exit 1: every other failure — repository unreachable, checksum or
    decryption failure, missing key, bad configuration or usage, an unexpected exception — exits
    FETCH_FAILED (200), so a fetch error never ends recovery early as if the WAL had ended there."""
    FETCH_FAILED = 200  # pgdr.errors.WAL_FETCH_FAILED, spelled out: nothing may fail before the try

    try:
        code = _main(argv, answered)
        sys.stdout.flush()
    except SystemExit as e:  # argparse: 2 on a usage error, 0 for --help
        if e.code in (0, None) and not _names_a_wal_file(argv):
            return 0  # help asked for at a terminal; as restore_command (%f given) it restored nothing
        print(f"pgdr wal-fetch: exit {FETCH_FAILED} (fetch failed; recovery must stop)", file=sys.stderr)
        return FETCH_FAILED
    except BaseException as e:  # noqa: BLE001 - anything at all must stop recovery, never end it
        log.exception("wal-fetch failed unexpectedly (%s); exit %d: recovery must stop", e, FETCH_FAILED)
        return FETCH_FAILED
    return code


def _names_a_wal_file(argv: list[str]) -> bool:
    from pgdr.fast import is_wal_file_name

    return any(is_wal_file_name(a) for a in argv)


def _main(argv: list[str], answered: bool = False) -> int:
    if not answered:
        from pgdr.fast import answer

        code = answer(argv)
        if code is not None:
            return code  # archive_command / restore_command answered from local disk (pgdr.fast)
    parser = _parser()
    args = parser.parse_args(argv)
    fetching = args.command == "wal-fetch"
    as_json = getattr(args, "json", False)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(asctime)s pgdr %(levelname)s %(message)s", stream=sys.stderr)
    args._exit = 0
    try:
        result = _audited(args)
    except PgdrError as e:
        code = e.exit_code
        if fetching:
            from pgdr.errors import WAL_FETCH_FAILED, WAL_NOT_ARCHIVED
            from pgdr.wal import WalNotFound

            code = WAL_NOT_ARCHIVED if isinstance(e, WalNotFound) else WAL_FETCH_FAILED
        log.error("%s%s", e, f" (exit {code}: recovery must stop)" if fetching and code != 1 else "")
        if as_json:
            print(json.dumps({**e.to_dict(), "command": args.command}, indent=2))
        return code
    except KeyboardInterrupt:
        if fetching:
            raise  # wal-fetch: interrupted is a failure (200), never "not archived"
        log.error("interrupted; nothing half-written is visible in the repository")
        return 1
    text = result.to_json() if as_json else _human(result)
    if text:
        try:
            print(text)
            sys.stdout.flush()
        except BrokenPipeError:  # `pgdr info … | head`: the reader had enough; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return args._exit


if __name__ == "__main__":
    sys.exit(main())
