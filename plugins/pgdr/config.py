"""The pgdr configuration file: clusters, their repositories and alert routing.

One YAML file: ``--config``, else ``$PGDR_CONFIG``, else ``/etc/pgdr/pgdr.yaml``, else
``include/pgdr.yaml`` of the checkout pgdr runs from.
Secrets never live here: passwords come from ``PGPASSWORD``/``.pgpass`` or an
Airflow connection, cloud keys from an Airflow connection or the standard AWS
credential chain. A file that tries to hold one is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from pgdr import fast
from pgdr.errors import ConfigError

CLUSTER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
COMPRESSIONS = {"zstd": (1, 22, 3), "lz4": (0, 16, 1), "gzip": (1, 9, 6), "none": (0, 0, 0)}
SSE_MODES = {"AES256", "aws:kms"}
SECRET_KEYS = re.compile(r"(password|passwd|secret|token|private_key|access_key|credential)", re.I)
DSN_PASSWORD = re.compile(r"(^|\s)password\s*=|://[^/@\s]*:[^/@\s]*@", re.I)
CRON_PRESETS = {"@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly"}
DEFAULT_RESTORE_ROOTS = ("/var/lib/pgdr/restore",)  # restores (and replaces) only go below these


def config_path(explicit: str | os.PathLike | None = None) -> Path:
    """The file to read, first found of: ``--config``, ``$PGDR_CONFIG``, ``/etc/pgdr/pgdr.yaml``, and
    ``include/pgdr.yaml`` of the checkout pgdr runs from. An explicit choice is never second-guessed: when
    it names a missing file, that is the error. (pgdr.fast.config_file decides: the fast answers of
    archive_command and restore_command name the same file without importing this module.)"""
    return Path(fast.config_file(os.fspath(explicit) if explicit else None))


@dataclass(frozen=True)
class EncryptionConfig:
    """Client-side AES-256-GCM; the keyring comes from ``key_env`` or, under Airflow, ``conn_id``."""

    key_env: str = "PGDR_KEYRING"
    conn_id: str | None = None
    accept_unencrypted: bool = False  # read backups/WAL from before encryption was on (else: refused as tampering)


@dataclass(frozen=True)
class ObjectLockConfig:
    """S3 Object Lock retention pgdr puts on every backup, WAL and report object it writes."""

    mode: str = "GOVERNANCE"  # or COMPLIANCE
    days: int = 37  # at least the retention window plus a backup interval: an object's planned expiry


@dataclass(frozen=True)
class RepositoryConfig:
    url: str
    endpoint_url: str | None = None
    region: str | None = None
    aws_conn_id: str | None = None
    sse: str | None = None
    kms_key_id: str | None = None
    part_size_mb: int = 16  # S3 multipart part size: transfer_concurrency of them in flight (memory-bounded)
    transfer_concurrency: int = 4  # S3: multipart parts / ranged GETs in flight per transfer (memory-bounded)
    encryption: EncryptionConfig | None = None
    object_lock: ObjectLockConfig | None = None

    @property
    def kind(self) -> str:
        return self.url.split("://", 1)[0]


@dataclass(frozen=True)
class AlertConfig:
    slack_conn_id: str | None = None
    pagerduty_conn_id: str | None = None
    severity: str = "critical"


@dataclass(frozen=True)
class WalConfig:
    mode: str = "stream"  # stream: pgdr's replication client on the Airflow worker; push: archive_command
    spool_dir: str = "/var/tmp/pgdr-spool"  # ignored: nothing is spooled on local disk (accepted for old configs)
    window_minutes: int = 10
    partial_interval_seconds: int = 5
    rpo_seconds: int = 60
    slot_retained_alert_mb: int = 4096

    def spool(self, cluster: str) -> str:
        return f"{self.spool_dir.rstrip('/')}/{cluster}"


@dataclass(frozen=True)
class DrillCheck:
    """A user check run on the drill's restored copy: the first column of the first row must equal ``expected``."""

    name: str
    database: str
    sql: str
    expected: str


@dataclass(frozen=True)
class DrillCanary:
    """A row written on the source just before the drill's mark, which the restored copy must hold."""

    database: str = "postgres"
    table: str = "pgdr_drill_canary"


@dataclass(frozen=True)
class BackupTypePolicy:
    """Which backup a scheduled run takes (``pgdr backup --type auto``): a full when the newest full is
    ``full_every_days`` old or the chain already holds ``max_chain`` incrementals, else an incremental
    (PostgreSQL 17+ with summarize_wal = on; anything else falls back to a full, saying why)."""

    full_every_days: int = 7
    max_chain: int = 6


@dataclass(frozen=True)
class DrillConfig:
    """The disaster-recovery drill: restore into a scratch cluster, validate, measure RTO and RPO."""

    schedule: str = "0 0 1 1,4,7,10 *"  # quarterly: 1 January, April, July, October at 00:00 (cluster's timezone)
    scratch_dir: str = "/var/tmp/pgdr-drill"
    keep_minutes: int = 0  # keep the scratch server up this long after validation, for a person to look
    checks: tuple = ()  # DrillCheck
    canary: DrillCanary | None = None
    on_new_backup: bool = False  # a lighter drill (restore, start, query) of every new backup
    queue: str | None = None  # Celery/Kubernetes queue of the workers with the disk for the scratch cluster
    heapallindexed: bool = False
    jobs: int = 2  # parallel pg_amcheck jobs and pg_dump readers
    timeout_minutes: int = 240


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    repository: RepositoryConfig
    conn_id: str | None = None
    dsn: str | None = None
    compression: str = "zstd"
    compression_level: int = 3
    schedule: str = "0 2 * * *"
    timezone: str = "America/New_York"
    pg_bin_dir: str | None = None
    checkpoint: str = "fast"
    run_as: str = "postgres"
    backup_wal: str = "embed"  # embed: WAL inside the backup; archive: taken from the WAL archive
    backup_method: str = "pg_basebackup"  # or local: full backups read from the data directory (localcopy.py)
    restore_roots: tuple = DEFAULT_RESTORE_ROOTS  # restores (and replaces) write only below these
    retention_window_days: int = 30  # any point in this many days stays restorable
    retention_min_full: int = 2  # never fewer full backups than this
    alerts: AlertConfig = field(default_factory=AlertConfig)
    wal: WalConfig = field(default_factory=WalConfig)
    rto_seconds: int = 3600  # the drill fails past this restore-to-validated time
    rpo_seconds: int | None = None  # the drill fails past this WAL-archiving delay; None: wal.rpo_seconds
    drill: DrillConfig = field(default_factory=DrillConfig)
    backup_type_policy: BackupTypePolicy | None = None  # None: every scheduled backup is a full

    @property
    def rpo_target(self) -> int:
        return self.rpo_seconds if self.rpo_seconds is not None else self.wal.rpo_seconds
    max_backup_age_hours: float = 26  # /health/backup: the newest backup must be younger (a daily schedule + slack)
    max_drill_age_days: int = 100  # /health/backup: the last drill must be younger (quarterly drills + slack)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Config:
    path: str
    clusters: dict[str, ClusterConfig]

    def cluster(self, name: str) -> ClusterConfig:
        try:
            return self.clusters[name]
        except KeyError:
            known = ", ".join(sorted(self.clusters)) or "none"
            raise ConfigError(self.path, f"no cluster named {name!r} (configured: {known})", key="clusters") from None


class _Reader:
    """Walks the parsed YAML, naming the file and key in every complaint."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str):
        raise ConfigError(self.path, message, key=key)

    def mapping(self, value, key: str, allowed: set[str]) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping, got {type(value).__name__}")
        for k in value:
            if not isinstance(k, str):
                self.fail(key, f"key {k!r} must be a string")
            if SECRET_KEYS.search(k):
                self.fail(f"{key}.{k}", "secrets are not allowed in the config file; "
                          "use an Airflow connection, PGPASSWORD/.pgpass or the AWS credential chain")
            if k not in allowed:
                self.fail(f"{key}.{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return value

    def string(self, m: dict, name: str, key: str, default=None, required=False):
        value = m.get(name, default)
        if value is None:
            if required:
                self.fail(f"{key}.{name}", "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{key}.{name}", "must be a non-empty string")
        return value

    def integer(self, m: dict, name: str, key: str, default: int, lo: int, hi: int) -> int:
        value = m.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(f"{key}.{name}", f"must be an integer from {lo} to {hi}, got {value!r}")
        return value


CLUSTER_KEYS = {"conn_id", "dsn", "repository", "compression", "compression_level", "schedule",
                "timezone", "pg_bin_dir", "checkpoint", "run_as", "alerts", "wal", "backup_wal", "backup_method",
                "retention_window_days", "retention_min_full", "rto_seconds", "rpo_seconds", "drill",
                "backup_type_policy"}
POLICY_KEYS = {"full_every_days", "max_chain"}
CLUSTER_KEYS |= {"max_backup_age_hours", "max_drill_age_days"}  # health limits (pgdr.status)
WAL_KEYS = {"mode", "spool_dir", "window_minutes", "partial_interval_seconds", "rpo_seconds",
            "slot_retained_alert_mb"}
REPO_KEYS = {"url", "endpoint_url", "region", "aws_conn_id", "sse", "kms_key_id", "part_size_mb", "encryption",
             "object_lock", "transfer_concurrency"}
ENCRYPTION_KEYS = {"key_env", "conn_id", "accept_unencrypted"}
LOCK_KEYS = {"mode", "days"}
CLUSTER_KEYS = CLUSTER_KEYS | {"restore_roots"}  # where restores may write: pgdr.paths
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
ALERT_KEYS = {"slack_conn_id", "pagerduty_conn_id", "severity"}
DRILL_KEYS = {"schedule", "scratch_dir", "keep_minutes", "checks", "canary", "on_new_backup", "queue",
              "heapallindexed", "jobs", "timeout_minutes"}
DRILL_CHECK_KEYS = {"name", "database", "sql", "expected"}
CANARY_KEYS = {"database", "table"}
SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")  # reaches a pg_ctl command line: no spaces or shell characters
DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$-]{0,62}$")
TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}(\.[a-z_][a-z0-9_]{0,62})?$")


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate the configuration; raise ConfigError naming file and key."""
    path = config_path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, "file not found (pgdr reads --config, else $PGDR_CONFIG, else "
                                f"{fast.SYSTEM_CONFIG}, else include/pgdr.yaml of a checkout)") from None
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, f"not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    return parse_config(raw, path)


def parse_config(raw, path: str | os.PathLike = "<config>") -> Config:
    r = _Reader(Path(path))
    top = r.mapping(raw, "(top level)", {"defaults", "alerts", "clusters"})
    defaults = r.mapping(top.get("defaults"), "defaults", CLUSTER_KEYS - {"conn_id", "dsn"})
    alerts = r.mapping(top.get("alerts"), "alerts", ALERT_KEYS)
    clusters_raw = r.mapping(top.get("clusters"), "clusters", set(top.get("clusters") or {}))
    if not clusters_raw:
        r.fail("clusters", "at least one cluster must be configured")
    clusters = {}
    for name, body in clusters_raw.items():
        key = f"clusters.{name}"
        if not CLUSTER_NAME.fullmatch(name):
            r.fail(key, "cluster names are lowercase letters, digits and '_', starting with a letter")
        body = r.mapping(body, key, CLUSTER_KEYS)
        merged = {**defaults, **body}
        merged["alerts"] = {**alerts, **(defaults.get("alerts") or {}), **(body.get("alerts") or {})}
        merged["wal"] = {**(r.mapping(defaults.get("wal"), "defaults.wal", WAL_KEYS)),
                         **(r.mapping(body.get("wal"), f"{key}.wal", WAL_KEYS))}
        merged["drill"] = {**(r.mapping(defaults.get("drill"), "defaults.drill", DRILL_KEYS)),
                           **(r.mapping(body.get("drill"), f"{key}.drill", DRILL_KEYS))}
        clusters[name] = _cluster(r, name, merged, key)
    return Config(path=str(path), clusters=clusters)


def _cluster(r: _Reader, name: str, m: dict, key: str) -> ClusterConfig:
    dsn = r.string(m, "dsn", key)
    if dsn and DSN_PASSWORD.search(dsn):
        r.fail(f"{key}.dsn", "must not contain a password; use PGPASSWORD, a .pgpass file or an Airflow connection")
    compression = r.string(m, "compression", key, "zstd")
    if compression not in COMPRESSIONS:
        r.fail(f"{key}.compression", f"must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    lo, hi, default_level = COMPRESSIONS[compression]
    level = r.integer(m, "compression_level", key, default_level, lo, hi)
    schedule = r.string(m, "schedule", key, "0 2 * * *")
    if schedule not in CRON_PRESETS and len(schedule.split()) != 5:
        r.fail(f"{key}.schedule", f"must be a 5-field cron expression or one of {', '.join(sorted(CRON_PRESETS))}")
    tz = r.string(m, "timezone", key, "America/New_York")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        r.fail(f"{key}.timezone", f"unknown time zone {tz!r}")
    checkpoint = r.string(m, "checkpoint", key, "fast")
    if checkpoint not in ("fast", "spread"):
        r.fail(f"{key}.checkpoint", "must be 'fast' or 'spread'")
    restore_roots = _restore_roots(r, m.get("restore_roots", list(DEFAULT_RESTORE_ROOTS)), f"{key}.restore_roots")
    backup_wal = r.string(m, "backup_wal", key, "embed")
    if backup_wal not in ("embed", "archive"):
        r.fail(f"{key}.backup_wal", "must be 'embed' (WAL inside each backup) or 'archive' (from the WAL archive)")
    backup_method = r.string(m, "backup_method", key, "pg_basebackup")
    if backup_method not in ("pg_basebackup", "local"):
        r.fail(f"{key}.backup_method", "must be 'pg_basebackup' (the server sends the files) or 'local' (pgdr reads "
                                       "the data directory itself, on the database host)")
    alerts_m = r.mapping(m.get("alerts"), f"{key}.alerts", ALERT_KEYS)
    severity = r.string(alerts_m, "severity", f"{key}.alerts", "critical")
    if severity not in ("critical", "error", "warning", "info"):
        r.fail(f"{key}.alerts.severity", "must be critical, error, warning or info")
    window = r.integer(m, "retention_window_days", key, 30, 1, 36500)
    return ClusterConfig(
        rto_seconds=r.integer(m, "rto_seconds", key, 3600, 1, 7 * 86400),
        rpo_seconds=r.integer(m, "rpo_seconds", key, 0, 1, 86400) if m.get("rpo_seconds") is not None else None,
        drill=_drill(r, m.get("drill") or {}, f"{key}.drill"),
        backup_type_policy=_backup_type_policy(r, m.get("backup_type_policy"), f"{key}.backup_type_policy"),
        wal=_wal(r, m.get("wal") or {}, f"{key}.wal"),
        name=name,
        repository=_repository(r, m.get("repository"), f"{key}.repository", window),
        conn_id=r.string(m, "conn_id", key),
        dsn=dsn,
        compression=compression,
        compression_level=level,
        schedule=schedule,
        timezone=tz,
        pg_bin_dir=r.string(m, "pg_bin_dir", key),
        restore_roots=restore_roots,
        checkpoint=checkpoint,
        run_as=r.string(m, "run_as", key, "postgres"),
        backup_wal=backup_wal,
        backup_method=backup_method,
        retention_window_days=window,
        retention_min_full=r.integer(m, "retention_min_full", key, 2, 1, 1000),
        max_backup_age_hours=_positive_hours(r, m, key),
        max_drill_age_days=r.integer(m, "max_drill_age_days", key, 100, 1, 3660),
        alerts=AlertConfig(
            slack_conn_id=r.string(alerts_m, "slack_conn_id", f"{key}.alerts"),
            pagerduty_conn_id=r.string(alerts_m, "pagerduty_conn_id", f"{key}.alerts"),
            severity=severity,
        ),
    )


def _positive_hours(r: _Reader, m: dict, key: str) -> float:
    value = m.get("max_backup_age_hours", 26)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 24 * 366:
        r.fail(f"{key}.max_backup_age_hours", f"must be a number of hours above 0 (like 26 or 0.5), got {value!r}")
    return value


def _wal(r: _Reader, m: dict, key: str) -> WalConfig:
    mode = r.string(m, "mode", key, "stream")
    if mode not in ("stream", "push"):
        r.fail(f"{key}.mode", "must be 'stream' (pgdr's replication client from Airflow) or 'push' (archive_command)")
    spool = r.string(m, "spool_dir", key, "/var/tmp/pgdr-spool")
    if not spool.startswith("/"):
        r.fail(f"{key}.spool_dir", "must be an absolute path")
    window = r.integer(m, "window_minutes", key, 10, 1, 60)
    if 60 % window:
        r.fail(f"{key}.window_minutes", "must divide 60 (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 or 60)")
    return WalConfig(
        mode=mode, spool_dir=spool, window_minutes=window,
        partial_interval_seconds=r.integer(m, "partial_interval_seconds", key, 5, 1, 600),
        rpo_seconds=r.integer(m, "rpo_seconds", key, 60, 1, 86400),
        slot_retained_alert_mb=r.integer(m, "slot_retained_alert_mb", key, 4096, 16, 10_000_000),
    )


def _backup_type_policy(r: _Reader, raw, key: str) -> BackupTypePolicy | None:
    if raw is None:
        return None
    m = r.mapping(raw, key, POLICY_KEYS)
    return BackupTypePolicy(full_every_days=r.integer(m, "full_every_days", key, 7, 1, 3650),
                            max_chain=r.integer(m, "max_chain", key, 6, 0, 1000))


def _drill(r: _Reader, m: dict, key: str) -> DrillConfig:
    schedule = r.string(m, "schedule", key, "0 0 1 1,4,7,10 *")
    if schedule not in CRON_PRESETS and len(schedule.split()) != 5:
        r.fail(f"{key}.schedule", f"must be a 5-field cron expression or one of {', '.join(sorted(CRON_PRESETS))}")
    scratch = r.string(m, "scratch_dir", key, "/var/tmp/pgdr-drill")
    if not SAFE_PATH.fullmatch(scratch) or scratch.rstrip("/") in ("", "/"):
        r.fail(f"{key}.scratch_dir", "must be an absolute path of letters, digits, '.', '_', '-' and '/' "
                                     "(not / itself)")
    from pgdr.errors import UsageError
    from pgdr.paths import check_path

    try:
        scratch = str(check_path(scratch, "scratch_dir"))
    except UsageError as e:
        r.fail(f"{key}.scratch_dir", str(e))
    checks = m.get("checks") or []
    if not isinstance(checks, list):
        r.fail(f"{key}.checks", "must be a list of {name, database, sql, expected}")
    parsed, names = [], set()
    for i, raw in enumerate(checks):
        ck = f"{key}.checks[{i}]"
        c = r.mapping(raw, ck, DRILL_CHECK_KEYS)
        name = r.string(c, "name", ck, required=True)
        if name in names:
            r.fail(f"{ck}.name", f"duplicate check name {name!r}")
        names.add(name)
        db = r.string(c, "database", ck, "postgres")
        if not DB_NAME.fullmatch(db):
            r.fail(f"{ck}.database", f"{db!r} is not a database name")
        if "expected" not in c or c["expected"] is None or isinstance(c["expected"], (dict, list)):
            r.fail(f"{ck}.expected", "is required: the value the query's first column must return")
        expected = c["expected"]
        expected = ("t" if expected else "f") if isinstance(expected, bool) else str(expected)
        parsed.append(DrillCheck(name=name, database=db, sql=r.string(c, "sql", ck, required=True), expected=expected))
    canary_raw = m.get("canary")
    canary = None
    if canary_raw is not None and canary_raw is not False:
        cm = r.mapping({} if canary_raw is True else canary_raw, f"{key}.canary", CANARY_KEYS)
        db = r.string(cm, "database", f"{key}.canary", "postgres")
        table = r.string(cm, "table", f"{key}.canary", "pgdr_drill_canary")
        if not DB_NAME.fullmatch(db):
            r.fail(f"{key}.canary.database", f"{db!r} is not a database name")
        if not TABLE_NAME.fullmatch(table):
            r.fail(f"{key}.canary.table", "must be a lowercase table name, optionally schema-qualified (schema.table)")
        canary = DrillCanary(database=db, table=table)
    for flag in ("on_new_backup", "heapallindexed"):
        if not isinstance(m.get(flag, False), bool):
            r.fail(f"{key}.{flag}", "must be true or false")
    return DrillConfig(
        schedule=schedule, scratch_dir=scratch.rstrip("/"),
        keep_minutes=r.integer(m, "keep_minutes", key, 0, 0, 1440),
        checks=tuple(parsed), canary=canary, on_new_backup=m.get("on_new_backup", False),
        queue=r.string(m, "queue", key), heapallindexed=m.get("heapallindexed", False),
        jobs=r.integer(m, "jobs", key, 2, 1, 64), timeout_minutes=r.integer(m, "timeout_minutes", key, 240, 1, 10080),
    )


def _encryption(r: _Reader, raw, key: str) -> EncryptionConfig | None:
    if raw is None or raw is False:
        return None
    m = r.mapping({} if raw is True else raw, key, ENCRYPTION_KEYS)
    env = r.string(m, "key_env", key, "PGDR_KEYRING")
    if not ENV_NAME.fullmatch(env):
        r.fail(f"{key}.key_env", f"must name an environment variable (like PGDR_KEYRING), got {env!r}")
    accept = m.get("accept_unencrypted", False)
    if not isinstance(accept, bool):
        r.fail(f"{key}.accept_unencrypted", "must be true or false")
    return EncryptionConfig(key_env=env, conn_id=r.string(m, "conn_id", key), accept_unencrypted=accept)


def _restore_roots(r: _Reader, raw, key: str) -> tuple:
    """Absolute directories a restore may write into (strictly below them); ``replace`` only there too."""
    from pgdr.errors import UsageError
    from pgdr.paths import check_path

    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        r.fail(key, "must be a non-empty list of absolute directories")
    roots = []
    for i, item in enumerate(raw):
        try:
            path = check_path(item, "restore root")
        except UsageError as e:
            r.fail(f"{key}[{i}]", str(e))
        if str(path) == "/":
            r.fail(f"{key}[{i}]", "'/' cannot be a restore root: name the directory restores go into")
        roots.append(str(path))
    return tuple(roots)


def _object_lock(r: _Reader, raw, key: str, url: str, window_days: int) -> ObjectLockConfig | None:
    if raw is None or raw is False:
        return None
    if not url.startswith("s3://"):
        r.fail(key, "S3 Object Lock needs an s3:// repository")
    m = r.mapping({} if raw is True else raw, key, LOCK_KEYS)
    mode = r.string(m, "mode", key, "GOVERNANCE")
    if mode not in ("GOVERNANCE", "COMPLIANCE"):
        r.fail(f"{key}.mode", f"must be GOVERNANCE or COMPLIANCE, got {mode!r}")
    days = r.integer(m, "days", key, window_days + 7, 1, 36500)
    if days < window_days:
        r.fail(f"{key}.days", f"{days} is shorter than retention_window_days ({window_days}): objects the window "
               "needs would lose their lock")
    return ObjectLockConfig(mode=mode, days=days)


def _repository(r: _Reader, raw, key: str, window_days: int = 30) -> RepositoryConfig:
    if isinstance(raw, str):
        raw = {"url": raw}
    if raw is None:
        r.fail(key, "is required (file:///path or s3://bucket/prefix)")
    m = r.mapping(raw, key, REPO_KEYS)
    url = r.string(m, "url", key, required=True)
    if url.startswith("file://"):
        if not url[len("file://"):].startswith("/"):
            r.fail(f"{key}.url", "file repositories need an absolute path: file:///path")
    elif url.startswith("s3://"):
        if not url[len("s3://"):].split("/", 1)[0]:
            r.fail(f"{key}.url", "s3 repositories need a bucket: s3://bucket/prefix")
    else:
        r.fail(f"{key}.url", f"must start with file:// or s3://, got {url!r}")
    sse = r.string(m, "sse", key)
    if sse is not None and sse not in SSE_MODES:
        r.fail(f"{key}.sse", f"must be one of {', '.join(sorted(SSE_MODES))}")
    kms = r.string(m, "kms_key_id", key)
    if kms and sse != "aws:kms":
        r.fail(f"{key}.kms_key_id", "only applies with sse: aws:kms")
    return RepositoryConfig(
        url=url.rstrip("/"),
        endpoint_url=r.string(m, "endpoint_url", key),
        region=r.string(m, "region", key),
        aws_conn_id=r.string(m, "aws_conn_id", key),
        sse=sse,
        kms_key_id=kms,
        part_size_mb=r.integer(m, "part_size_mb", key, 16, 5, 5120),
        transfer_concurrency=r.integer(m, "transfer_concurrency", key, 4, 1, 16),
        encryption=_encryption(r, m.get("encryption"), f"{key}.encryption"),
        object_lock=_object_lock(r, m.get("object_lock"), f"{key}.object_lock", url, window_days),
    )
