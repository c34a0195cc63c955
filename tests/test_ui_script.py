"""`make ui` (scripts/ui.py) keeps its throwaway cluster from one run to the next, so the repository that
stays in .demo/ui is still that cluster's: the next run's backups land in it beside the earlier ones. Real
PostgreSQL 18, the real CLI; Airflow itself is not started here."""

from __future__ import annotations

import importlib.util

from helpers import ROOT, pgdr


def _ui_script():
    spec = importlib.util.spec_from_file_location("pgdr_make_ui", ROOT / "scripts" / "ui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_next_run_backs_up_the_same_cluster_into_the_same_repository(workdir):
    from conftest import _bins

    ui_script, ui = _ui_script(), workdir / "make-ui"
    ui.mkdir()
    labels = []
    for run, label in enumerate(["20261201-020000F", "20261202-020000F"]):
        source = ui_script.demo_cluster(ui, _bins(18))
        try:
            ui_script.start_demo_cluster(ui, source)
            if run:  # the sample data and the row the first run added are all there
                assert source.psql("select count(*) from audit") == "5001"
            else:
                source.psql("insert into audit (event) values ('added by the first run')")
            config = ui_script.write_config(ui, source.dsn)
            code, out, err = pgdr("--json", "backup", "--cluster", "demo", "--label", label, config=config)
            assert code == 0, (out, err[-2000:])
            labels.append(label)
        finally:
            ui_script.stop_demo_cluster(source)
    code, listing, _ = pgdr("--json", "list", "--cluster", "demo", config=config)
    assert code == 0 and [b["label"] for b in listing["backups"]] == labels
    assert not list(ui.glob("repo-*"))  # nothing was moved aside: the repository is the cluster's own
    source.destroy()


def test_a_repository_whose_cluster_is_gone_is_moved_aside_not_lost(workdir):
    import shutil

    from conftest import _bins

    ui_script, ui = _ui_script(), workdir / "make-ui-gone"
    ui.mkdir()
    source = ui_script.demo_cluster(ui, _bins(18))
    try:
        ui_script.start_demo_cluster(ui, source)
        config = ui_script.write_config(ui, source.dsn)
        assert pgdr("--json", "backup", "--cluster", "demo", config=config)[0] == 0
    finally:
        source.destroy()
    shutil.rmtree(ui / "pg", ignore_errors=True)  # the cluster is gone (make clean of it, a reboot of /tmp)

    source = ui_script.demo_cluster(ui, _bins(18))
    try:
        ui_script.start_demo_cluster(ui, source)
        config = ui_script.write_config(ui, source.dsn)
        code, out, err = pgdr("--json", "backup", "--cluster", "demo", config=config)
        assert code == 0, (out, err[-2000:])  # a new cluster, a new repository
        [aside] = ui.glob("repo-*")
        assert list((aside / "demo" / "backup").iterdir())  # the earlier backups are kept there
    finally:
        source.destroy()
