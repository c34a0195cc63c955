"""A restore as a person asks for it (CLI or Airflow form): confined, planned, guarded, audited.

This is the one entry point both ``pgdr restore`` and the Airflow restore
operator call, so the guard holds with Airflow down too:

1. the destination is validated and must lie below the cluster's
   ``restore_roots`` (``pgdr.paths``);
2. a dry run only plans (which backup, which WAL, what will really happen);
3. an empty or new destination is restored into directly;
4. a destination holding data (or a running server) is refused unless
   ``replace`` is set and the cluster's name is typed as confirmation. Then,
   BEFORE anything in it is stopped or touched: the backup label, the key that
   opens it, the WAL its target needs, the destination's identity (a data
   directory of this cluster) and free space are all checked, and a safety
   backup of what is there is taken, committed and read back
   (``pgdr.safety``). Only then is the server stopped by signal and the
   directory emptied, and the restore runs.

Every request, dry or real, refused or done, leaves an audit record in the
repository (``<cluster>/reports/restore/``): who, which parameters, the result.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pgdr.audit import write_audit
from pgdr.config import ClusterConfig
from pgdr.errors import PgdrError, RestoreRefused
from pgdr.lsn import parse_lsn
from pgdr.paths import confine
from pgdr.pgbin import find_bin_dir
from pgdr.recovery import RecoveryTarget, plan_recovery
from pgdr.repository import Repository
from pgdr.restore import check_target, require_key, run_restore
from pgdr.server import check_listen, running_pid, stop_server
from pgdr.storage import Storage
from pgdr.wal import WalArchive

log = logging.getLogger(__name__)
SPACE_MARGIN = 1.05  # restored size times this, plus 64 MiB, must fit


def restore_request(cluster: ClusterConfig, storage: Storage, label: str, pgdata, *, replace: bool = False,
                    confirm: str | None = None, dry_run: bool = False,
                    recovery_target: RecoveryTarget | None = None, requested_by: dict | None = None,
                    **restore_kw):
    """Plan (dry run) or perform a restore with the replace guard; audit it either way.

    ``restore_kw`` goes to :func:`pgdr.restore.run_restore` (start, port, socket_dir, run_as, listen, …).
    Returns the dry run's plan (a dict) or the RestoreResult.
    """
    record = {**(requested_by or {}), "backup": label, "pgdata": str(pgdata), "replace": bool(replace),
              "dry_run": bool(dry_run), "target": recovery_target.to_dict() if recovery_target else None}
    try:
        target = confine(pgdata, cluster.restore_roots)
        check_listen(restore_kw.get("listen"))
        try:
            check_target(target)
            occupied = None
        except RestoreRefused as e:
            occupied = e
        confirmed = bool(replace) and confirm == cluster.name
        if dry_run:
            report = plan_restore(cluster, storage, label, target, recovery_target, occupied, confirmed)
            log.info("DRY RUN, nothing written: %s", report["summary"])
            _audit(storage, cluster, {**record, "outcome": "dry_run", "result": report})
            return report
        safety = None
        if occupied is not None:
            if not confirmed:
                how = (f"the confirmation must be the cluster's name '{cluster.name}'" if replace else
                       f"to replace it, pass --replace --confirm {cluster.name} (in the form: 'replace' and "
                       f"'{cluster.name}' in 'confirm_cluster')")
                raise RestoreRefused(f"{occupied} ({how})")
            safety = replace_destination(cluster, storage, label, target, recovery_target,
                                         start=bool(restore_kw.get("start")), port=restore_kw.get("port"),
                                         run_as=restore_kw.get("run_as"))
        try:
            result = run_restore(cluster, storage, label, target, recovery_target=recovery_target, **restore_kw)
        except PgdrError as e:
            if safety is not None:
                e.args = (f"{e} (the destination's previous contents are safe in backup {safety.label}: "
                          f"pgdr restore --cluster {cluster.name} --backup {safety.label} --pgdata {target})",)
            raise
        if safety is not None:
            result.safety_backup = safety.to_dict()
            log.warning("destination %s replaced; its previous contents are backup %s", target, safety.label)
    except Exception as e:
        _audit(storage, cluster, {**record, "outcome": "refused" if isinstance(e, RestoreRefused) else "failed",
                                  "error": str(e)})
        raise
    _audit(storage, cluster, {**record, "outcome": "restored", "result": result.to_dict()})
    if result.started:
        record_rto(storage, cluster, result, requested_by)
    return result


def record_rto(storage: Storage, cluster: ClusterConfig, result, requested_by: dict | None = None) -> str | None:
    """A real restore that started its server records its RTO the way a drill does, under
    ``<cluster>/reports/rto/``: each phase, the total against ``rto_seconds``, the backup and what recovery
    reached. (Only a drill validates the result; this is the time a real recovery took.)"""
    total = (result.phases or {}).get("total", result.duration_seconds)
    recovery = result.recovery or {}
    record = {**(requested_by or {}), "kind": "restore", "backup": {"label": result.label, "size": result.size,
                                                                    "stored_size": result.stored_size},
              "pgdata": result.pgdata,
              "rto": {"phases": result.phases, "total_seconds": total, "target_seconds": cluster.rto_seconds,
                      "ok": total <= cluster.rto_seconds},
              "recovery": {k: recovery.get(k) for k in ("state", "reached_lsn", "reached_time", "expected_lsn")}}
    try:
        key = write_audit(storage, cluster.name, "rto", record)
    except PgdrError as e:  # never hide the restore's own outcome behind a report write failure
        log.error("could not write the restore's RTO record: %s", e)
        return None
    log.info("restore RTO %.1f s (target %d s): %s", total, cluster.rto_seconds,
             ", ".join(f"{k} {v:.1f} s" for k, v in (result.phases or {}).items()))
    return key


def replace_destination(cluster: ClusterConfig, storage: Storage, label: str, target: Path,
                        recovery_target: RecoveryTarget | None, *, start: bool, port: int | None,
                        run_as: str | None):
    """Every check, then the safety backup, then (only then) stop and empty ``target``. Returns the safety
    backup's record."""
    from pgdr.safety import inspect_data_dir, take_safety_backup

    repo = Repository(storage, cluster.name)
    # 1. The backup, its key and the WAL its target needs.
    manifest, _plan = _resolve(repo, storage, cluster, label, recovery_target)
    require_key(repo, manifest)
    # 2. What the restore will need to run: no wiping first and failing on a missing binary after.
    if start and port is None:
        raise RestoreRefused("--start needs --port: pick a free port for the restored server; nothing was touched")
    find_bin_dir(manifest.pg_major, cluster.pg_bin_dir, tool="pg_verifybackup")
    if start:
        find_bin_dir(manifest.pg_major, cluster.pg_bin_dir, tool="postgres", exact=True)
    # 3. The destination is a data directory of this cluster, not anything else a typo could name.
    info = inspect_data_dir(target, cluster.pg_bin_dir)
    known = (repo.identity() or {}).get("system_identifier") or manifest.system_identifier
    if info.system_identifier != known:
        raise RestoreRefused(f"{target} is a data directory of another cluster (system identifier "
                             f"{info.system_identifier}; cluster '{cluster.name}' is {known}); refusing to replace "
                             "it; nothing was touched")
    # 4. Room for the restored files once the old ones are gone.
    _check_space(target, manifest.size)
    # 5. The safety backup: committed and read back before anything in the destination changes.
    safety = take_safety_backup(cluster, storage, target, run_as or cluster.run_as, info)
    _check_space(target, manifest.size)  # a file repository on the same disk just grew
    # Irreversible from here on: every check above passed.
    if running_pid(target):
        log.warning("stopping the PostgreSQL server running in %s (its contents are backup %s)", target,
                    safety.label)
        stop_server(target)
    empty_directory(target)
    return safety


def _resolve(repo, storage, cluster, label, recovery_target):
    if recovery_target is None:
        manifest = repo.resolve(label)
        if manifest.wal_included:
            return manifest, None
        recovery_target = RecoveryTarget("immediate", action="promote")
    archive = WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level)
    return plan_recovery(repo.backups(), archive, recovery_target, label)


def _used_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _check_space(target: Path, needed: int) -> None:
    st = os.statvfs(target)
    free = st.f_bavail * st.f_frsize + _used_bytes(target)
    want = int(needed * SPACE_MARGIN) + (64 << 20)
    if free < want:
        raise RestoreRefused(f"{target}: {free / 1e9:.2f} GB would be free once emptied, the restore needs about "
                             f"{want / 1e9:.2f} GB; nothing was touched")


def empty_directory(target: Path) -> None:
    """Remove everything inside ``target`` (links themselves, never what they point to); fails closed."""
    for entry in sorted(target.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def plan_restore(cluster, storage, label, target: Path, recovery_target, occupied, confirmed) -> dict:
    """The dry run: which backup, which WAL, what will really happen, and what the destination holds."""
    repo = Repository(storage, cluster.name)
    archive = WalArchive(storage, cluster.name, cluster.compression, cluster.compression_level)
    manifest = repo.resolve(label) if label != "latest" else None
    if manifest is not None and manifest.type == "safety":
        plan = None
    else:
        manifest, plan = plan_recovery(repo.backups(), archive, recovery_target, label)
    destination = ("empty or new" if occupied is None else
                   "holds data: would be replaced after a safety backup" if confirmed else
                   f"would be refused: {occupied}")
    summary = describe_plan(manifest, plan, recovery_target)
    report = {**(plan.to_dict() if plan else {"backup": manifest.label, "backup_stop_lsn": manifest.stop_lsn,
                                              "backup_stop_time": manifest.stop_time}),
              "dry_run": True, "summary": f"restore backup {manifest.label} into {target} ({destination}); {summary}",
              "destination": str(target), "destination_state": destination,
              "stored_bytes": manifest.stored_size, "restored_bytes": manifest.size}
    return report


def describe_plan(manifest, plan, target: RecoveryTarget | None) -> str:
    """What recovery will actually do, in words (never 'replay to the newest archived' when there is none)."""
    stop = manifest.stop_lsn
    if target is None or target.kind == "immediate" or plan is None:
        how = "no WAL replayed beyond what the backup holds" if manifest.wal_included else \
            "the backup's own WAL fetched from the archive"
        return f"the restore ends at the backup's end, {stop} ({how})"
    archived = plan.archived_lsn
    beyond = archived is not None and parse_lsn(archived) > parse_lsn(stop)
    if target.kind == "latest":
        if not beyond:
            return f"no WAL archived after this backup: the restore ends at the backup's end, {stop}"
        return f"replay archived WAL from {plan.wal_from} to {plan.wal_to or archived}, the newest archived"
    limit = f"{target.kind} {target.value}"
    if not beyond:
        return (f"replay toward {limit}, but no WAL is archived after this backup: recovery can only end at the "
                f"backup's end, {stop}")
    return f"replay archived WAL from {plan.wal_from} until {limit} (archived up to {archived})"


def _audit(storage, cluster, record: dict) -> None:
    try:
        write_audit(storage, cluster.name, "restore", record)
    except PgdrError as e:  # never hide the restore's own outcome behind an audit write failure
        log.error("could not write the restore audit record: %s", e)
