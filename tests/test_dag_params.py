"""Every pgdr DAG can be triggered from the UI with its default Params.

Two real checks, through Airflow's own API app (in-process, against the test
metadata DB): the params as the UI receives them (`GET /api/v2/dags/{id}/details`)
pass the trigger form's "required field is empty" rule, and the trigger
endpoint accepts a run with an empty `conf`.
"""

from __future__ import annotations

import pytest

from helpers import ROOT, write_config


def ui_blocks_trigger(param: dict) -> bool:
    """The trigger form's rule (Airflow 3 UI, FlexibleForm/isParamRequired): a field whose schema has a
    type that does not admit null is required, and an empty value ("", null) disables the Trigger button."""
    schema_type = (param.get("schema") or {}).get("type")
    required = bool(schema_type) and not (isinstance(schema_type, list) and "null" in schema_type)
    return required and param.get("value") in (None, "")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    import os

    from airflow.utils import db

    tmp = tmp_path_factory.mktemp("params")
    config = write_config(tmp / "pgdr.yaml", {
        "app": {"conn_id": "pgdr_app", "repository": "file:///srv/pgdr"},
        "billing": {"conn_id": "pgdr_billing", "repository": {"url": "s3://b/p", "aws_conn_id": "s3"},
                    "timezone": "Europe/Berlin"},
    })
    old = {k: os.environ.get(k) for k in ("PGDR_CONFIG", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS")}
    os.environ["PGDR_CONFIG"] = str(config)
    os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "True"
    try:
        from airflow.configuration import conf

        old_all_admins = conf.get("core", "simple_auth_manager_all_admins", fallback="False")
        conf.set("core", "simple_auth_manager_all_admins", "True")
        db.resetdb()
        from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
        from airflow.models.dagbundle import DagBundleModel
        from airflow.utils.session import create_session

        bag = DagBag(dag_folder=str(ROOT / "dags"))
        assert bag.import_errors == {}
        with create_session() as session:
            session.merge(DagBundleModel(name="dags-folder"))
        sync_bag_to_db(bag, "dags-folder", None)
        from fastapi.testclient import TestClient

        from airflow.api_fastapi.app import create_app

        with TestClient(create_app("core")) as client:
            yield client, sorted(d for d in bag.dag_ids if d.startswith("pgdr_"))
    finally:
        conf.set("core", "simple_auth_manager_all_admins", old_all_admins)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_every_dag_triggers_with_its_default_params(api):
    client, dag_ids = api
    assert {"pgdr_app_backup", "pgdr_app_restore", "pgdr_app_wal", "pgdr_app_verify",
            "pgdr_app_retention", "pgdr_billing_restore"} <= set(dag_ids)
    blocked, refused = {}, {}
    for dag_id in dag_ids:
        details = client.get(f"/api/v2/dags/{dag_id}/details")
        assert details.status_code == 200, details.text
        params = details.json()["params"] or {}
        empty_required = [name for name, p in params.items() if ui_blocks_trigger(p)]
        if empty_required:
            blocked[dag_id] = empty_required
        client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        run = client.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": {}})
        if run.status_code != 200:
            refused[dag_id] = (run.status_code, run.text[:300])
    assert blocked == {}, "the UI's Trigger button is disabled by these empty required fields"
    assert refused == {}


def test_trigger_endpoint_rejects_bad_params(api):
    """The same endpoint enforces the schema: the form's validation is real, not decoration."""
    client, _ = api
    run = client.post("/api/v2/dags/pgdr_app_restore/dagRuns",
                      json={"logical_date": None, "conf": {"backup": "not-a-label"}})
    assert run.status_code == 400, run.text
    assert "backup" in run.text


def test_label_patterns_of_forms_and_api_come_from_the_core_rule():
    """One rule for a backup label: the restore form, the drill form and the API's bodies accept exactly what
    pgdr.labels accepts (the drill: real backups only, no safety copies)."""
    import re

    from pgdr.labels import LABEL
    from pgdr_airflow.api import RestoreBody, VerifyBody
    from pgdr_airflow.params import backup_choice

    samples = ["20261125-020000F", "20261125-020000S", "20261125-020000F_20261126-020000I", "20261125-020000I",
               "20261125-020000F_20261126-020000F", "2026112-020000F", "latest", "20261125-020000F\n", "x"]
    restore = re.compile(backup_choice("FS"))
    drill = re.compile(backup_choice("F"))
    for s in samples:
        core = bool(LABEL.fullmatch(s))
        assert bool(restore.fullmatch(s)) == (core or s == "latest"), s
        assert bool(drill.fullmatch(s)) == ((core and "S" not in s) or s == "latest"), s
    assert RestoreBody.model_fields["backup"].metadata[0].pattern == backup_choice("FS")
    assert VerifyBody.model_fields["scope"].metadata[0].pattern == backup_choice("FS", ("new", "all", "latest"))
