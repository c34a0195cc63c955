"""pgdr: PostgreSQL disaster recovery.

The core package. It knows PostgreSQL, the repository format, manifests and
restore, and never imports Airflow: the ``pgdr`` CLI must work on a host where
Airflow is down or was never installed.
"""

__version__ = "0.1.0"

from pgdr.errors import PgdrError, ConfigError, UsageError  # noqa: E402

__all__ = ["__version__", "PgdrError", "ConfigError", "UsageError"]
