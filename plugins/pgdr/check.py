"""``pgdr check``: is this cluster ready to be backed up into this repository?

Every check runs and is reported, critical or not, instead of stopping at the
first problem (Barman's style): an operator sees the whole picture at once.

Beyond "can we connect and write", it looks for what silently breaks restores
and archiving: an archiver that fails (``pg_stat_archiver``: a failure newer
than the last success), in push mode a repository the server's OS user cannot
write or a ``pgdr`` it cannot run (probed by running ``archive_command``'s own
``pgdr`` as that user), in stream mode a slot that is missing, lost or ahead
of the archive, and a WAL segment size pgdr does not support.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pgdr.config import ClusterConfig
from pgdr.errors import ObjectNotFound, PgdrError
from pgdr.pgbin import as_user, find_bin_dir
from pgdr.postgres import ConnInfo, connect, replication_probe, server_info
from pgdr.repository import Repository
from pgdr.results import JsonResult
from pgdr.storage import Storage


@dataclass
class CheckItem(JsonResult):
    name: str
    ok: bool
    critical: bool
    detail: str


@dataclass
class CheckReport(JsonResult):
    cluster: str
    ok: bool
    checks: list[CheckItem] = field(default_factory=list)

    def failed(self) -> list[CheckItem]:
        return [c for c in self.checks if not c.ok and c.critical]


def run_check(cluster: ClusterConfig, conn: ConnInfo, storage: Storage) -> CheckReport:
    checks: list[CheckItem] = []

    def add(name, ok, detail, critical=True):
        checks.append(CheckItem(name, bool(ok), critical, detail))

    info = None
    try:
        info = server_info(conn)
        add("connection", True, f"connected to {conn.describe()}: PostgreSQL {info.version}")
    except PgdrError as e:
        add("connection", False, str(e))
    if info:
        add("wal_level", info.wal_level in ("replica", "logical"),
            f"wal_level = {info.wal_level}" + ("" if info.wal_level != "minimal" else "; set it to replica and restart"))
        add("max_wal_senders", info.max_wal_senders >= 1,
            f"max_wal_senders = {info.max_wal_senders}" + ("" if info.max_wal_senders >= 1 else "; needs at least 1"))
        add("max_wal_senders_headroom", info.max_wal_senders >= 3,
            f"max_wal_senders = {info.max_wal_senders}; 3 or more leaves room for WAL streaming and a backup "
            "at the same time", critical=False)
        add("replication_privilege", info.can_replicate,
            "role may replicate" if info.can_replicate else "the role needs REPLICATION (ALTER ROLE … REPLICATION)")
        try:
            replication_probe(conn)
            add("replication_connection", True, "pg_hba.conf allows a replication connection")
        except PgdrError as e:
            add("replication_connection", False,
                f"{e} (add a 'host replication <role> <address> scram-sha-256' line to pg_hba.conf)")
        add("tablespaces", not info.tablespaces,
            "no extra tablespaces" if not info.tablespaces
            else f"extra tablespaces {', '.join(info.tablespaces)} are not supported yet; backups will refuse")
        try:
            from pgdr.incremental import incremental_support

            ok, detail = incremental_support(info)
            wanted = cluster.backup_type_policy is not None
            add("summarize_wal", ok or not wanted, detail + ("" if ok or not wanted else
                "; backup_type_policy asks for incrementals, so every backup falls back to a full"), critical=False)
        except PgdrError as e:
            add("summarize_wal", False, str(e), critical=False)
        try:
            b = find_bin_dir(info.major, cluster.pg_bin_dir, tool="pg_basebackup")
            add("binaries", True, f"pg_basebackup {b.version} in {b.path}")
        except PgdrError as e:
            add("binaries", False, str(e))
        if cluster.backup_method == "local":
            add(*_local_read_check(cluster, conn, info))
    add(*_repository_check(storage))
    if info:
        for item in _archiving_checks(cluster, conn, storage):
            add(*item)
    if storage.encrypt:
        add(*_encryption_check(storage))
    if storage.object_lock is not None:
        add(*_object_lock_check(storage))
    if info:
        add(*_identity_check(storage, cluster, info.system_identifier))
    return CheckReport(cluster=cluster.name, ok=all(c.ok for c in checks if c.critical), checks=checks)


def _local_read_check(cluster: ClusterConfig, conn: ConnInfo, info) -> tuple[str, bool, str]:
    """backup_method local: the data directory here is provably the server's, and readable (no backup started)."""
    from pgdr.localcopy import READ_HINT, LocalCopy

    try:
        local = LocalCopy.open(conn, info, cluster.name, "check", cluster.checkpoint, cluster.backup_wal == "embed")
    except PgdrError as e:
        return "local_read", False, f"backup_method local: {e}"
    if local is None:
        return "local_read", True, "backup_method local: the server is a standby, so its backups use pg_basebackup"
    unreadable = local.unreadable()
    if unreadable:
        return "local_read", False, f"backup_method local: cannot read {unreadable}; {READ_HINT}"
    held = ""
    if local.embed_wal:
        why = local.wal_hold()
        held = ("; a temporary replication slot holds each backup's WAL" if why is None else
                f"; {why}, so no slot holds a backup's WAL: a long copy on a busy server may lose its start "
                "segment")
    return "local_read", True, f"backup_method local: reads {local.datadir}, proven to be this server's{held}"


def _repository_check(storage: Storage, prefix: str = "") -> tuple[str, bool, str]:
    key = f"{prefix}.pgdr-check-{uuid.uuid4().hex}"
    try:
        storage.put_bytes(key, b"pgdr write check")
        ok = storage.get_bytes(key) == b"pgdr write check"
        storage.delete(key)
        return ("repository_write", ok,
                f"wrote, read back and deleted a probe object in {storage.describe()}{'/' + prefix if prefix else ''}")
    except PgdrError as e:
        return "repository_write", False, str(e)


def write_probe(cluster: ClusterConfig, storage: Storage) -> CheckItem:
    """``pgdr probe-write``: can this process write where ``wal-push`` writes? (``check`` runs it as the
    server's OS user, through archive_command's own pgdr.)"""
    name, ok, detail = _repository_check(storage, f"{cluster.name}/wal/")
    return CheckItem("probe_write", ok, True, detail)


SEG_SIZE = 16 * 1024 * 1024


def _settings(conn: ConnInfo) -> dict:
    with connect(conn) as c:
        rows = c.execute("select name, setting, unit from pg_settings where name in ('archive_mode', "
                         "'archive_command', 'wal_segment_size', 'data_directory')").fetchall()
        archiver = c.execute("select archived_count, failed_count, last_archived_wal, last_archived_time, "
                             "last_failed_wal, last_failed_time from pg_stat_archiver").fetchone()
    out = {name: setting for name, setting, _ in rows}
    units = {name: unit for name, _, unit in rows}
    if "wal_segment_size" in out:  # PostgreSQL 11+ reports bytes, older in 8 kB blocks
        size = int(out["wal_segment_size"])
        out["wal_segment_size"] = size * 8192 if units.get("wal_segment_size") == "8kB" else size
    out["archiver"] = archiver
    return out


def _archiving_checks(cluster: ClusterConfig, conn: ConnInfo, storage: Storage) -> list[tuple]:
    push = cluster.wal.mode == "push"
    try:
        s = _settings(conn)
    except PgdrError as e:
        return [("archiving_settings", False, str(e))]
    out = []
    seg = s.get("wal_segment_size")
    out.append(("wal_segment_size", seg == SEG_SIZE,
                f"wal_segment_size = {seg // (1024 * 1024)} MiB" if seg == SEG_SIZE else
                f"wal_segment_size = {seg} bytes: pgdr archives and restores 16 MiB segments only (the server "
                "was initialised with initdb --wal-segsize); WAL capture, backups and restores of this cluster "
                "would be wrong, so pgdr refuses it"))
    out.append(_archiver_check(s, push))
    if push:
        out.append(_push_probe(cluster, s))
    else:
        out.append(_slot_check(cluster, conn, storage))
    return out


def _archiver_check(s: dict, push: bool) -> tuple:
    mode = s.get("archive_mode", "off")
    archived, failed, last_wal, last_time, failed_wal, failed_time = s["archiver"]
    if mode == "off":
        if push:
            return ("archiver", False, "push mode needs archive_mode = on (and a restart); it is off, so nothing "
                    "is archived (include/setup-server.sh --push sets it)")
        return "archiver", True, "archive_mode = off (WAL is captured by streaming)"
    failing = failed_time is not None and (last_time is None or failed_time > last_time)
    if failing:
        return ("archiver", False, f"pg_stat_archiver: archive_command is failing: {failed} failures, "
                f"the last on {failed_wal} at {failed_time.isoformat()}, "
                + (f"newer than the last success ({last_wal} at {last_time.isoformat()})" if last_time else
                   "and no segment was ever archived")
                + "; WAL piles up in pg_wal until it succeeds. The server log says why (as the server's OS user, "
                "can it run pgdr and write the repository?)")
    return ("archiver", True, f"pg_stat_archiver: {archived} segments archived"
            + (f", the last {last_wal} at {last_time.isoformat()}" if last_time else "")
            + (f"; {failed} earlier failures, none since the last success" if failed else "; no failures"))


def _server_os_user(data_directory: str | None) -> str | None:
    """The OS user the server runs as, when its data directory is on this host."""
    if not data_directory:
        return None
    try:
        return pwd.getpwuid(Path(data_directory).stat().st_uid).pw_name
    except (OSError, KeyError):
        return None


def _push_probe(cluster: ClusterConfig, s: dict) -> tuple:
    """Run archive_command's own pgdr, as the server's OS user, to write a probe where wal-push writes."""
    command = s.get("archive_command") or ""
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = []
    if "wal-push" not in tokens:
        return ("push_probe", False, f"push mode, but archive_command ({command!r}) does not run pgdr wal-push "
                "(include/setup-server.sh --push sets it)")
    at = tokens.index("wal-push")
    prefix, rest = tokens[:at], tokens[at + 1:]
    target = rest[rest.index("--cluster") + 1] if "--cluster" in rest[:-1] else None
    if target and target != cluster.name:
        return "push_probe", False, f"archive_command archives into cluster {target!r}, not {cluster.name!r}"
    user = _server_os_user(s.get("data_directory"))
    if user is None:
        return ("push_probe", False, "not run: cannot tell which OS user runs the server (its data directory is "
                "not on this host, or this role may not read data_directory); run pgdr check on the database host, "
                "as root or that user, to prove archive_command can write the repository", False)
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != user:
        return ("push_probe", False, f"not run: the server runs as {user}; run pgdr check as root or {user} to "
                "prove archive_command can write the repository", False)
    cmd = as_user([*prefix, "--json", "probe-write", "--cluster", cluster.name], user)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    except (OSError, subprocess.SubprocessError) as e:
        return "push_probe", False, f"as {user}, {' '.join(prefix)} could not run: {e}"
    if proc.returncode == 0:
        return ("push_probe", True, f"as {user} (the server's OS user), archive_command's pgdr wrote, read back "
                "and deleted a probe object where wal-push writes")
    why, kind = "", None
    try:
        doc = json.loads(proc.stdout)
        why, kind = doc.get("detail") or doc.get("message") or "", doc.get("error")
    except (ValueError, AttributeError):
        pass
    why = why or (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    if "pgdr-fast: cannot" in proc.stderr:  # the compiled front (plugins/pgdr/fast.c) found no pgdr to hand to
        hint = (f"archive_command's pgdr-fast cannot run the pgdr beside it as {user} (install both in one "
                "directory that user can execute)")
    elif proc.returncode in (126, 127):
        hint = f"{user} cannot run pgdr (install it where that user can execute it)"
    elif kind in ("config", "usage"):
        hint = f"{user} cannot use pgdr's configuration (is the file readable by {user}?)"
    elif kind == "key_unavailable":
        hint = f"{user}'s environment lacks the keyring"
    else:
        hint = f"the repository is not writable by {user}"
    return ("push_probe", False, f"as {user} (the server's OS user), `{' '.join(prefix)} probe-write` failed "
            f"(exit {proc.returncode}): {why} — {hint}, so archive_command fails on every segment")


def _slot_check(cluster: ClusterConfig, conn: ConnInfo, storage: Storage) -> tuple:
    """The slot against the archive. A gap is reported but not critical: it does not stop a backup, and a
    new full backup is its remedy (the WAL DAG alerts on it)."""
    from pgdr.lsn import format_lsn, parse_lsn
    from pgdr.walstream import slot_info, slot_name
    from pgdr.wal import WalArchive

    try:
        slot = slot_info(conn, slot_name(cluster.name))
        newest = WalArchive(storage, cluster.name).newest_lsn()
    except PgdrError as e:
        return "replication_slot", False, str(e), False
    if not slot.exists:
        if newest is None:
            return ("replication_slot", True, f"slot {slot.name} does not exist yet; the first WAL run creates it")
        return ("replication_slot", False, f"slot {slot.name} is missing, but the archive holds WAL up to "
                f"{format_lsn(newest)}: WAL written since then may be gone from the server; take a full backup "
                "and let the WAL run create the slot again", False)
    if slot.wal_status == "lost":
        return ("replication_slot", False, f"slot {slot.name} was invalidated (wal_status lost): WAL after "
                f"{format_lsn(newest) if newest is not None else 'the archive'} is gone; take a full backup and "
                f"recreate the slot (select pg_drop_replication_slot('{slot.name}'))", False)
    if newest is not None and slot.restart_lsn and parse_lsn(slot.restart_lsn) > newest:
        return ("replication_slot", False, f"slot {slot.name} starts at {slot.restart_lsn}, past the newest "
                f"archived WAL {format_lsn(newest)}: the WAL between is neither on the server nor in the archive; take a "
                "full backup", False)
    return ("replication_slot", True, f"slot {slot.name}: {slot.wal_status or 'unused'}, restart_lsn "
            f"{slot.restart_lsn or '-'}, archive up to {format_lsn(newest) if newest is not None else '(empty)'}")


def _encryption_check(storage: Storage) -> tuple[str, bool, str]:
    try:
        key = storage.keyring.current()
    except PgdrError as e:
        return "encryption_key", False, str(e)
    ids = ", ".join(k.key_id for k in storage.keyring.keys)
    return ("encryption_key", True, f"new backups and WAL are encrypted with master key {key.key_id!r} "
            f"(keyring from {storage.keyring.source}: {ids})")


def _object_lock_check(storage: Storage) -> tuple[str, bool, str]:
    lock = storage.object_lock
    try:
        enabled = storage.lock_enabled()
    except PgdrError as e:
        return "object_lock", False, str(e)
    if not enabled:
        return ("object_lock", False, f"the config asks for {lock.mode} Object Lock, but the bucket has no Object "
                "Lock configuration: create the bucket with Object Lock enabled (see README, Immutability)")
    return "object_lock", True, f"bucket has Object Lock; pgdr retains what it writes {lock.days} days ({lock.mode})"


def _identity_check(storage: Storage, cluster: ClusterConfig, system_identifier: str) -> tuple[str, bool, str]:
    repo = Repository(storage, cluster.name)
    try:
        known = json.loads(storage.get_bytes(repo.cluster_key))
    except ObjectNotFound:
        return "repository_identity", True, "repository has no backups of this cluster yet"
    except PgdrError as e:
        return "repository_identity", False, str(e)
    except ValueError as e:
        return "repository_identity", False, f"{repo.cluster_key} is unreadable: {e}"
    same = known.get("system_identifier") == system_identifier
    return ("repository_identity", same,
            f"repository belongs to system identifier {known.get('system_identifier')}"
            + ("" if same else f", but the server is {system_identifier}"))
