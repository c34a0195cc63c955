"""docker-compose.yaml cannot be started here (no Docker engine): check it by reading it."""

from __future__ import annotations

import json
import re

import yaml

from helpers import ROOT
from pgdr.config import load_config


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def airflow_env():
    env = compose()["services"]["airflow"]["environment"]
    return {k: str(v) for k, v in env.items()}


def test_every_mounted_path_exists():
    for name, svc in compose()["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts {src}, which is not in the repository"


def test_airflow_gets_dags_plugins_include_and_the_config():
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose()["services"]["airflow"]["volumes"]}
    assert mounts["/opt/airflow/dags"] == "./dags" and mounts["/opt/airflow/plugins"] == "./plugins"
    assert mounts["/opt/airflow/include"] == "./include"
    cfg_path = airflow_env()["PGDR_CONFIG"]
    host_path = ROOT / cfg_path.replace("/opt/airflow/", "")
    assert host_path.exists()
    load_config(host_path)  # the shipped config is valid


def test_every_connection_the_config_names_is_preset():
    env = airflow_env()
    config = load_config(ROOT / "include" / "pgdr.yaml")
    needed = set()
    for c in config.clusters.values():
        needed |= {c.conn_id, c.repository.aws_conn_id, c.alerts.slack_conn_id, c.alerts.pagerduty_conn_id}
    needed.discard(None)
    assert needed, "the shipped config should use Airflow connections"
    for conn_id in needed:
        raw = env.get(f"AIRFLOW_CONN_{conn_id.upper()}")
        assert raw, f"connection {conn_id} is not pre-set in docker-compose.yaml"
        json.loads(raw)


def test_config_points_at_compose_services_and_credentials_match():
    services = compose()["services"]
    config = load_config(ROOT / "include" / "pgdr.yaml").cluster("app")
    conn = json.loads(airflow_env()["AIRFLOW_CONN_PGDR_APP"])
    assert conn["host"] in services and conn["login"] == "pgdr"
    assert conn["password"] == services["source-db"]["environment"]["PGDR_PASSWORD"]
    endpoint_host = re.match(r"https?://([^:/]+)", config.repository.endpoint_url).group(1)
    assert endpoint_host in services
    s3 = json.loads(airflow_env()["AIRFLOW_CONN_PGDR_S3"])
    assert (s3["login"], s3["password"]) == (services["minio"]["environment"]["MINIO_ROOT_USER"],
                                             services["minio"]["environment"]["MINIO_ROOT_PASSWORD"])
    bucket = config.repository.url[len("s3://"):].split("/")[0]
    setup = " ".join(services["minio-setup"]["command"])
    assert bucket in setup
    if config.repository.object_lock:  # pgdr locks objects: the bucket must be created able to hold locks
        assert f"mc mb --with-lock local/{bucket}" in setup and "--noncurrent-expire-days" in setup
    assert "wal_level=replica" in services["source-db"]["command"]


def test_images_are_pinned_and_airflow_is_3():
    for name, svc in compose()["services"].items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name} image {image} is not pinned"
    assert compose()["services"]["airflow"]["image"].startswith("apache/airflow:3.")
    reqs = airflow_env()["_PIP_ADDITIONAL_REQUIREMENTS"]
    pinned = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().split()
                  if "==" in line and not line.startswith("#"))
    for req in reqs.split():
        name, version = req.split("==")
        assert pinned.get(name) == version, f"{req} disagrees with requirements.txt"


def test_sentry_is_wired_through_airflows_sentry_section():
    env = airflow_env()
    assert env["AIRFLOW__SENTRY__SENTRY_ON"] == "${SENTRY_ON:-False}"  # off unless asked for
    assert env["AIRFLOW__SENTRY__SENTRY_DSN"] == "${SENTRY_DSN:-}"
    reqs = env["_PIP_ADDITIONAL_REQUIREMENTS"].split()
    for name in ("sentry-sdk", "prometheus-client", "plotly"):  # what pgdr's plugin needs in the image
        assert any(r.startswith(name + "==") for r in reqs), name
    text = (ROOT / "docker-compose.yaml").read_text()
    assert "SENTRY_DSN=https://" in text and "pgdr.error_kind" in text  # documented where it is set
