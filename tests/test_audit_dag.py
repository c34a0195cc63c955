"""The audit log and the catalog cache across the CLI and Airflow: a backup by the CLI, then the verify DAG run
by Airflow (dag.test()); pgdr's listener records the task with Airflow's actor and refreshes the catalog the API
reads, without any change to the operators."""

from __future__ import annotations

import getpass
import json

from helpers import pgdr
from test_dags import airflow_db, connections, dag_and_cli_configs, load_dag_module  # noqa: F401


def test_verify_dag_run_is_audited_and_refreshes_the_catalog(airflow_db, monkeypatch, pg18, workdir):  # noqa: F811
    from pgdr.audit import read_operations
    from pgdr.config import RepositoryConfig
    from pgdr.storage import open_storage

    connections(monkeypatch, pg18)
    repo = f"file://{workdir}/auditdag-repo"
    config, cli = dag_and_cli_configs(workdir, "auditdag", pg18, repo)
    code, backup, err = pgdr("--json", "backup", "--cluster", "app", config=cli)
    assert code == 0, err
    storage = open_storage(RepositoryConfig(url=repo))
    before = json.loads(storage.get_bytes("app/catalog.json"))  # the CLI refreshed it after its backup
    assert [b["label"] for b in before["backups"]] == [backup["label"]]
    assert before["backups"][0]["verification"] is None

    dag = load_dag_module(monkeypatch, config, "pgdr_verify").pgdr_app_verify
    for t in dag.tasks:
        t.retries = 0
    run = dag.test(run_conf={"scope": "latest"})
    assert run.state == "success"

    records = read_operations(storage, "app")  # newest first
    assert [(r["source"], r["action"], r["outcome"]) for r in records] == [("dag", "verify", "ok"),
                                                                           ("cli", "backup", "ok")]
    dag_record, cli_record = records
    assert cli_record["actor"] == getpass.getuser() and cli_record["actor_type"] == "os"
    # the run's triggering user (dag.test() names itself), as Airflow records it on the run
    assert run.triggering_user_name and dag_record["actor"] == run.triggering_user_name
    assert dag_record["actor_type"] == "airflow"
    assert dag_record["parameters"]["dag_id"] == "pgdr_app_verify"
    assert dag_record["parameters"]["conf"] == {"scope": "latest"} and dag_record["result"]["ok"] is True
    after = json.loads(storage.get_bytes("app/catalog.json"))
    assert after["catalog_refreshed_at"] > before["catalog_refreshed_at"]
    assert after["backups"][0]["verification"]["ok"] is True
