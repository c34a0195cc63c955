"""One exception tree for everything pgdr raises on purpose.

Each class carries the CLI exit code it maps to: 2 for usage and
configuration mistakes, 1 for an operation that failed or was refused.
"""

from __future__ import annotations


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
