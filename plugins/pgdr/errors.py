"""One exception tree for everything pgdr raises on purpose.

Each class carries the CLI exit code it maps to: 2 for usage and
configuration mistakes, 1 for an operation that failed or was refused.
"""

from __future__ import annotations

# ``pgdr wal-fetch`` (restore_command) exit statuses. PostgreSQL reads any status from 1 to 125 as "not in
# the archive" (recovery may end there) and a status above 125, or death by a signal, as a fatal error that
# aborts recovery. Only a file the archive does not hold may end recovery.
WAL_NOT_ARCHIVED = 1
WAL_FETCH_FAILED = 200


class PgdrError(Exception):
    """Base class of every error pgdr raises on purpose."""

    exit_code = 1
    kind = "error"

    def to_dict(self) -> dict:
        return {"error": self.kind, "message": str(self)}


class UsageError(PgdrError):
    """The command line asked for something that cannot mean anything."""

    exit_code = 2
    kind = "usage"


class ConfigError(UsageError):
    """The configuration file is missing, unreadable or wrong.

    The message always names the file and, where one is to blame, the key.
    """

    kind = "config"

    def __init__(self, path, message: str, key: str | None = None):
        self.path = str(path)
        self.key = key
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + message)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "file": self.path, "key": self.key}


class PostgresError(PgdrError):
    """PostgreSQL could not be reached, or refused what we asked."""

    kind = "postgres"


class RepositoryError(PgdrError):
    """The repository could not be read or written."""

    kind = "repository"


class BackupNotFound(PgdrError):
    kind = "backup_not_found"


class IntegrityError(PgdrError):
    """Stored data does not match what the manifest promised."""

    kind = "integrity"


class LockedError(PgdrError):
    """Another pgdr process holds the cluster's lock."""

    kind = "locked"


class RestoreRefused(PgdrError):
    """The restore target is not safe to write to; nothing was touched."""

    kind = "restore_refused"


class ObjectNotFound(RepositoryError):
    kind = "object_not_found"


class RecoveryShort(PgdrError):
    """Recovery ended (or was stopped) short of what the restore plan promised: a WAL segment could not
    be fetched, or the server stopped before the archived end or the target. The restore is a failure; the
    target directory has been emptied (a new one removed) and no server is left running."""

    kind = "recovery_short"

    def __init__(self, message: str, *, reached_lsn: str | None = None, expected_lsn: str | None = None,
                 segment: str | None = None):
        self.reached_lsn = reached_lsn
        self.expected_lsn = expected_lsn
        self.segment = segment
        super().__init__(message)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "reached_lsn": self.reached_lsn, "expected_lsn": self.expected_lsn,
                "segment": self.segment}
