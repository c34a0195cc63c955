"""PgdrHook: turns a configured cluster plus Airflow connections into core inputs."""

from __future__ import annotations

from functools import cached_property

from airflow.sdk import BaseHook

from pgdr.config import ClusterConfig, load_config
from pgdr.postgres import ConnInfo
from pgdr.storage import Storage, open_storage

LIBPQ_EXTRAS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "application_name", "target_session_attrs")


def conn_info_from_connection(conn) -> ConnInfo:
    """A libpq DSN (no password in it) and PGPASSWORD from an Airflow Postgres connection."""
    parts = []
    if conn.host:
        parts.append(f"host={conn.host}")
    if conn.port:
        parts.append(f"port={conn.port}")
    if conn.login:
        parts.append(f"user={conn.login}")
    parts.append(f"dbname={conn.schema or 'postgres'}")
    extra = conn.extra_dejson or {}
    parts += [f"{k}={extra[k]}" for k in LIBPQ_EXTRAS if extra.get(k)]
    env = {"PGPASSWORD": conn.password} if conn.password else {}
    return ConnInfo(dsn=" ".join(parts), env=env)


class PgdrHook(BaseHook):
    """Resolves one pgdr cluster: its config, how to reach it, its repository.

    ``conn_id`` in the cluster's config names an Airflow Postgres connection
    (a replication-capable role); ``repository.aws_conn_id`` an Airflow AWS
    connection. Without them, the DSN in the config and the AWS default chain
    apply, as for the CLI.
    """

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "pgdr_default"
    conn_type = "postgres"
    hook_name = "pgdr"

    def __init__(self, cluster: str, config_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.cluster_name = cluster
        self.config_path = config_path

    @cached_property
    def cluster(self) -> ClusterConfig:
        return load_config(self.config_path).cluster(self.cluster_name)

    def conn_info(self) -> ConnInfo:
        if self.cluster.conn_id:
            return conn_info_from_connection(self.get_connection(self.cluster.conn_id))
        return ConnInfo(dsn=self.cluster.dsn or "")

    def storage(self) -> Storage:
        repo = self.cluster.repository
        credentials = None
        if repo.kind == "s3" and repo.aws_conn_id:
            credentials, endpoint = self._aws(repo.aws_conn_id)
            if endpoint and not repo.endpoint_url:
                from dataclasses import replace

                repo = replace(repo, endpoint_url=endpoint)
        return open_storage(repo, credentials, self.keyring())

    def keyring(self):
        """The master keys from the Airflow connection ``repository.encryption.conn_id`` (its password, or
        ``keyring`` in its extra), else None: the environment variable applies, as for the CLI."""
        enc = self.cluster.repository.encryption
        if not (enc and enc.conn_id):
            return None
        from pgdr.crypto import Keyring
        from pgdr.errors import ConfigError

        conn = self.get_connection(enc.conn_id)
        text = conn.password or (conn.extra_dejson or {}).get("keyring")
        if not text:
            raise ConfigError(f"Airflow connection {enc.conn_id!r}", "holds no keyring: put 'id:base64key[,…]' "
                              "in its password (or 'keyring' in its extra)")
        return Keyring.parse(text, f"Airflow connection {enc.conn_id!r}")

    def _aws(self, aws_conn_id: str) -> tuple[dict, str | None]:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        hook = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="s3")
        creds = hook.get_credentials()
        credentials = {"aws_access_key_id": creds.access_key, "aws_secret_access_key": creds.secret_key}
        if creds.token:
            credentials["aws_session_token"] = creds.token
        return credentials, hook.conn_config.endpoint_url
