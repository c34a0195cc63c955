"""Point-in-time recovery: which backup, is the target reachable, the recovery
settings, and waiting until the restored server has reached the target.

Targets are PostgreSQL's own: time, LSN, transaction id, named restore point,
``immediate`` (the end of the backup, consistent) and ``latest`` (all archived
WAL). An unreachable target is refused before anything is written, with the
reachable range in the message.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pgdr.errors import PgdrError, RecoveryShort, RestoreRefused, UsageError
from pgdr.fast import pgdr_command
from pgdr.lsn import format_lsn, parse_lsn
from pgdr.manifest import BackupManifest
from pgdr.results import JsonResult, iso, parse_iso
from pgdr.wal import SEG_SIZE, WalArchive, parse_segment, segment_name, segment_of

KINDS = ("time", "lsn", "xid", "name", "immediate", "latest")
ACTIONS = ("promote", "pause", "shutdown")


def parse_time(text: str) -> datetime:
    """ISO 8601 with a zone (2026-11-25T14:03:00+00:00, …Z); a time without a zone is refused."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--target-time {text!r} is not an ISO 8601 time (like 2026-11-25T14:03:00+00:00)") from None
    if when.tzinfo is None:
        raise UsageError(f"--target-time {text!r} has no time zone; add one (+00:00, Z, -05:00)")
    return when


@dataclass
class RecoveryTarget(JsonResult):
    kind: str  # one of KINDS
    value: str | None = None
    action: str = "promote"
    timeline: str | None = None  # 'latest', 'current' or a number; PostgreSQL's default (latest) when None
    exclusive: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UsageError(f"recovery target kind must be one of {', '.join(KINDS)}")
        if self.action not in ACTIONS:
            raise UsageError(f"--target-action must be one of {', '.join(ACTIONS)}")
        needs_value = self.kind in ("time", "lsn", "xid", "name")
        if needs_value and not self.value:
            raise UsageError(f"a {self.kind} target needs a value")
        if self.kind == "time":
            self.value = parse_time(self.value).isoformat()
        elif self.kind == "lsn":
            try:
                parse_lsn(self.value)
            except ValueError as e:
                raise UsageError(f"--target-lsn: {e}") from None
        elif self.kind == "xid" and not re.fullmatch(r"\d+", self.value or ""):
            raise UsageError(f"--target-xid {self.value!r} is not a transaction id (digits)")
        if self.timeline is not None and self.timeline not in ("latest", "current") \
                and not re.fullmatch(r"\d+", self.timeline):
            raise UsageError("--target-timeline must be 'latest', 'current' or a timeline number")

    @property
    def when(self) -> datetime | None:
        return parse_time(self.value) if self.kind == "time" else None

    def settings(self) -> dict[str, str]:
        s: dict[str, str] = {}
        if self.kind in ("time", "lsn", "xid", "name"):
            s[f"recovery_target_{self.kind}"] = self.value
            if self.exclusive:
                s["recovery_target_inclusive"] = "off"
        elif self.kind == "immediate":
            s["recovery_target"] = "immediate"
        if self.kind != "latest":
            s["recovery_target_action"] = self.action
        if self.timeline:
            s["recovery_target_timeline"] = self.timeline
        return s


@dataclass
class RecoveryPlan(JsonResult):
    backup: str
    backup_stop_lsn: str
    backup_stop_time: str
    timeline: int
    wal_from: str
    wal_to: str | None  # None: whatever is archived
    archived_lsn: str | None
    reachable: str
    target: dict | None = None
    expected_lsn: str | None = None  # latest: the newest archived LSN on the followed timeline (measured after)
    archived_by: str | None = None  # upper bound of every commit time in the archived WAL on that timeline


def _reachable(backups: list[BackupManifest], archived: int | None) -> str:
    if not backups:
        return "nothing (no backups)"
    newest = backups[-1].stop_lsn
    if archived is None or archived <= parse_lsn(newest):  # no WAL archived after the newest backup
        end = f"{newest} (end of the newest backup {backups[-1].label}; no WAL archived after it)"
    else:
        end = f"{format_lsn(archived)} (newest archived WAL)"
    return (f"from {backups[0].stop_time} (LSN {backups[0].stop_lsn}, end of the oldest backup "
            f"{backups[0].label}) to LSN {end}")


def plan_recovery(backups: list[BackupManifest], archive: WalArchive, target: RecoveryTarget | None,
                  label: str | None) -> tuple[BackupManifest, RecoveryPlan]:
    """Pick the backup for ``target`` and prove the WAL it needs is all there."""
    if not backups:
        raise RestoreRefused(f"cluster '{archive.cluster}' has no completed backup")
    archived = archive.newest_lsn()
    reachable = _reachable(backups, archived)
    chosen = None
    if label and label != "latest":
        chosen = next((b for b in backups if b.label == label), None)
        if chosen is None:
            from pgdr.errors import BackupNotFound

            raise BackupNotFound(f"no completed backup {label} for cluster '{archive.cluster}'")
    if target is None or target.kind == "immediate":
        chosen = chosen or backups[-1]
    elif target.kind == "time":
        when = target.when
        fits = [b for b in backups if parse_iso(b.stop_time) <= when]
        if not fits:
            raise RestoreRefused(f"target time {target.value} is before the end of the oldest backup; "
                                 f"reachable: {reachable}")
        if chosen and parse_iso(chosen.stop_time) > when:
            raise RestoreRefused(f"backup {chosen.label} ended at {chosen.stop_time}, after the target time "
                                 f"{target.value}")
        chosen = chosen or fits[-1]
        if when > datetime.now(timezone.utc):
            raise RestoreRefused(f"target time {target.value} is in the future; reachable: {reachable}")
    elif target.kind == "lsn":
        want = parse_lsn(target.value)
        fits = [b for b in backups if parse_lsn(b.stop_lsn) <= want]
        if not fits:
            raise RestoreRefused(f"target LSN {target.value} is before the end of the oldest backup; "
                                 f"reachable: {reachable}")
        if chosen and parse_lsn(chosen.stop_lsn) > want:
            raise RestoreRefused(f"backup {chosen.label} ends at LSN {chosen.stop_lsn}, after the target")
        chosen = chosen or fits[-1]
        if archived is None or want > archived:
            raise RestoreRefused(f"target LSN {target.value} is after the newest archived WAL; "
                                 f"reachable: {reachable}")
    else:  # xid, name, latest: the WAL position is unknown up front; replay from the chosen or newest backup
        chosen = chosen or backups[-1]

    stop = parse_lsn(chosen.stop_lsn)
    to_tli = chosen.timeline
    if target is not None and target.kind != "immediate":
        wanted = target.timeline or "latest"
        to_tli = archive.newest_timeline() if wanted == "latest" else \
            chosen.timeline if wanted == "current" else int(wanted)
        to_tli = max(to_tli, chosen.timeline)
        if to_tli != chosen.timeline:
            try:
                archive.timeline_history(to_tli)
                if chosen.timeline not in dict(archive.timeline_history(to_tli)):
                    to_tli = chosen.timeline  # a sibling timeline: PostgreSQL will stay on the backup's
            except PgdrError as e:
                raise RestoreRefused(f"target timeline {to_tli}: {e}") from None
        archived = archive.newest_lsn(to_tli) if to_tli != chosen.timeline else archived
    expected = _expected_end(archive, to_tli, chosen)
    bound = None
    if target is not None and target.kind == "time":
        bound = _newest_commit_bound(archive, to_tli, chosen)
        if bound is not None and target.when > bound:
            raise RestoreRefused(
                f"target time {target.value} is after the newest archived WAL: everything archived on "
                f"timeline {to_tli} (up to LSN {format_lsn(expected)}) was archived by {iso(bound)}, so no "
                f"transaction after that can be replayed; reachable: from {backups[0].stop_time} (end of the "
                f"oldest backup {backups[0].label}) to {iso(bound)} at the latest; nothing was written")
    end = parse_lsn(target.value) if target and target.kind == "lsn" else archived
    wal_to = None
    if target is not None and target.kind != "immediate" and end is not None and end > stop:
        missing = archive.missing_on_path(chosen.timeline, to_tli, stop, end)
        if missing:
            raise RestoreRefused(
                f"the WAL archive has a gap after backup {chosen.label}: {missing[0]}"
                f"{' … ' + missing[-1] if len(missing) > 1 else ''} missing ({len(missing)} segments); "
                f"reachable from this backup: up to LSN {format_lsn(segment_of(parse_lsn(chosen.stop_lsn)) * SEG_SIZE)}"
                f" at most; repair the archive or pick a target before the gap")
        wal_to = format_lsn(end)
    return chosen, RecoveryPlan(
        backup=chosen.label, backup_stop_lsn=chosen.stop_lsn, backup_stop_time=chosen.stop_time,
        timeline=to_tli, wal_from=chosen.stop_lsn, wal_to=wal_to,
        archived_lsn=format_lsn(archived) if archived is not None else None, reachable=reachable,
        target=target.to_dict() if target else None, expected_lsn=format_lsn(expected),
        archived_by=iso(bound) if bound else None)


def _expected_end(archive: WalArchive, tli: int, chosen: BackupManifest) -> int:
    """Where replaying all archived WAL on ``tli`` must get to: its newest archived LSN (a partial's safe LSN
    included); on a new timeline with nothing archived yet, its switch point; never before the backup's end."""
    end = archive.newest_lsn(tli)
    if end is None and tli != chosen.timeline:
        history = archive.timeline_history(tli)
        if history:
            parent, switch = history[-1]
            parent_end = archive.newest_lsn(parent)
            end = min(switch, parent_end) if parent_end is not None else switch
    return max(end or 0, parse_lsn(chosen.stop_lsn))


def _newest_commit_bound(archive: WalArchive, tli: int, chosen: BackupManifest) -> datetime | None:
    """No transaction in the archived WAL on ``tli`` committed after this time (None: not recorded)."""
    newest = archive.archived_by(tli)
    if newest is None:
        if archive.newest_lsn(tli) is not None:
            return None  # WAL archived before pgdr recorded archive times: unknown, PostgreSQL will tell
        return parse_iso(chosen.stop_time)  # nothing archived: the backup's own WAL ends at its stop time
    return max(newest[1], parse_iso(chosen.stop_time))


def measure_recovery(plan: RecoveryPlan, target: RecoveryTarget, outcome: "RecoveryOutcome") -> None:
    """Compare what recovery reached with what the plan promised; RecoveryShort when it fell short.

    latest: recovery must have replayed into the last archived segment (or partial) of the followed
    timeline. time, xid, name: PostgreSQL must have said it stopped at the target ("recovery stopping
    before/after …"). lsn: that, or a replay position at or past the target. immediate: consistency."""
    reached = parse_lsn(outcome.reached_lsn) if outcome.reached_lsn else None
    expected = parse_lsn(plan.expected_lsn) if plan.expected_lsn else None
    if target.kind == "latest":
        if expected is None:
            return
        want_seg = segment_of(expected - 1)
        if reached is not None and segment_of(max(reached - 1, 0)) >= want_seg:
            return
        stop_seg = segment_of(max(reached - 1, 0)) if reached is not None else None
        raise RecoveryShort(
            f"recovery ended at LSN {outcome.reached_lsn or 'unknown'}"
            + (f" in segment {segment_name(plan.timeline, stop_seg)}" if stop_seg is not None else "")
            + f", short of the newest archived WAL at LSN {plan.expected_lsn} (segment "
            f"{segment_name(plan.timeline, want_seg)}): the segments after where it stopped were not restored",
            reached_lsn=outcome.reached_lsn, expected_lsn=plan.expected_lsn,
            segment=segment_name(plan.timeline, stop_seg + 1) if stop_seg is not None else None)
    if outcome.stopped_at:
        return
    if target.kind == "lsn" and reached is not None and reached >= parse_lsn(target.value):
        return
    if target.kind == "immediate" and reached is not None and reached >= parse_lsn(plan.backup_stop_lsn):
        return
    what = f"{target.kind} {target.value}" if target.value else target.kind
    raise RecoveryShort(
        f"recovery ended at LSN {outcome.reached_lsn or 'unknown'} without PostgreSQL reporting that it stopped "
        f"at the target ({what})",
        reached_lsn=outcome.reached_lsn,
        expected_lsn=target.value if target.kind == "lsn" else plan.expected_lsn)


def restore_command_argv(config_path: str | None, cluster: str) -> list[str]:
    """``pgdr wal-fetch`` as the restored server runs it, without %f %p: pgdr/__main__.py run with ``python
    -S`` (site-packages only once the prefetch spool could not answer; see pgdr.__main__)."""
    parts = pgdr_command("-S")
    if config_path:
        parts += ["--config", str(Path(config_path).absolute())]
    return parts + ["-q", "wal-fetch", "--cluster", cluster]


def restore_command(config_path: str | None, cluster: str) -> str:
    return " ".join(shlex.quote(p) for p in restore_command_argv(config_path, cluster)) + " %f %p"


def write_recovery_settings(pgdata: Path, target: RecoveryTarget, command: str, owner_ids=None) -> None:
    """Append the recovery settings to postgresql.auto.conf and create recovery.signal."""
    def q(v: str) -> str:
        return "'" + v.replace("'", "''") + "'"

    lines = ["", "# written by pgdr restore", f"restore_command = {q(command)}"]
    lines += [f"{k} = {q(v)}" for k, v in target.settings().items()]
    auto = pgdata / "postgresql.auto.conf"
    with open(auto, "a") as f:
        f.write("\n".join(lines) + "\n")
    signal = pgdata / "recovery.signal"
    signal.write_text("")
    if owner_ids:
        import os

        for p in (auto, signal):
            os.chown(p, *owner_ids)


@dataclass
class RecoveryOutcome(JsonResult):
    state: str  # promoted | paused | shut down
    reached_lsn: str | None = None
    reached_time: str | None = None
    stopped_at: str | None = None  # PostgreSQL's own words: "before commit of transaction 745, time …"
    timeline: int | None = None
    log: list = field(default_factory=list)


REDO_DONE = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+)")
LAST_XACT = re.compile(r"last completed transaction was at log time (.+)$")
STOPPING = re.compile(r"recovery stopping (.+)$")
NEW_TLI = re.compile(r"selected new timeline ID: (\d+)")


def wait_for_recovery(log_file: Path, action: str, is_running, timeout: float = 3600) -> RecoveryOutcome:
    """Follow the restored server's log until recovery has ended as ``action`` says."""
    deadline = time.monotonic() + timeout
    outcome = RecoveryOutcome(state="")
    while time.monotonic() < deadline:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        for line in text.splitlines():
            if m := REDO_DONE.search(line):
                outcome.reached_lsn = m.group(1)
            if m := LAST_XACT.search(line):
                outcome.reached_time = m.group(1).strip()
            if m := STOPPING.search(line):
                outcome.stopped_at = m.group(1).strip()
            if m := NEW_TLI.search(line):
                outcome.timeline = int(m.group(1))
        fatal = [ln for ln in text.splitlines() if "FATAL:" in ln or "PANIC:" in ln]
        if action == "promote" and "database system is ready to accept connections" in text \
                and ("archive recovery complete" in text or outcome.timeline):
            outcome.state = "promoted"
            return outcome
        if action == "pause" and ("pausing at the end of recovery" in text or "recovery has paused" in text):
            outcome.state = "paused"
            return outcome
        if not is_running():
            if action == "shutdown" and "shutdown at recovery target" in text:
                outcome.state = "shut down"
                return outcome
            _raise_short(text, fatal, outcome)
            raise PgdrError("recovery failed: " + ("; ".join(fatal[-3:]) or text[-1500:].strip()))
        time.sleep(0.3)
    raise PgdrError(f"recovery did not reach its target within {timeout:.0f} s; see {log_file}")


FETCH_FAILED = re.compile(r'could not restore file "([^"/]+)" from archive')
NOT_REACHED = "recovery ended before configured recovery target was reached"


def _raise_short(text: str, fatal: list[str], outcome: RecoveryOutcome) -> None:
    """The server stopped during recovery: name the WAL segment it could not fetch (wal-fetch exit 200
    makes PostgreSQL abort recovery there), or say that the archived WAL ended before the target."""
    failed = [m.group(1) for m in FETCH_FAILED.finditer(text)]
    pgdr_errors = [ln.split(" ERROR ", 1)[-1].strip() for ln in text.splitlines() if "pgdr ERROR" in ln]
    if failed:
        segment = failed[-1]
        why = f" ({pgdr_errors[-1]})" if pgdr_errors else ""
        if not re.fullmatch(r"[0-9A-F]{24}", segment):  # a timeline history file
            raise RecoveryShort(f"recovery stopped: {segment} could not be fetched from the archive{why}",
                                reached_lsn=outcome.reached_lsn, segment=segment)
        tli, segno = parse_segment(segment)
        at_most = format_lsn(segno * SEG_SIZE)
        raise RecoveryShort(
            f"recovery stopped: WAL segment {segment} could not be fetched from the archive{why}"
            f"; replay reached at most LSN {at_most}, the start of that segment",
            reached_lsn=outcome.reached_lsn or at_most, segment=segment)
    if any(NOT_REACHED in ln for ln in fatal):
        raise RecoveryShort(
            f"recovery ended at LSN {outcome.reached_lsn or 'unknown'} before the target was reached: the archived "
            "WAL holds no transaction at or after the target", reached_lsn=outcome.reached_lsn)


def query_replay_position(psql: str, user: str | None, port: int, socket_dir: str | None) -> tuple | None:
    """(replay LSN, last replayed transaction time) from a running restored server, best effort."""
    from pgdr.pgbin import as_user

    cmd = [psql, "-X", "-A", "-t", "-p", str(port), "-d", "postgres", "-c",
           "select coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text || '|' || "
           "coalesce(pg_last_xact_replay_timestamp()::text, '')"]
    if socket_dir:
        cmd[1:1] = ["-h", str(socket_dir)]
    if user:
        cmd[1:1] = ["-U", user]
    proc = subprocess.run(as_user(cmd, user), capture_output=True, text=True)
    if proc.returncode != 0 or "|" not in proc.stdout:
        return None
    lsn, _, ts = proc.stdout.strip().partition("|")
    return lsn, ts or None
