"""pgdr.status: the health rules and metric values, as pure functions of a catalog snapshot, the config and the
time (no server needed); and the config keys they read."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pgdr.config import parse_config
from pgdr.errors import ConfigError
from pgdr.results import iso
from pgdr.status import cluster_status, metric_values

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


def _cluster(**extra):
    return parse_config({"clusters": {"app": {"repository": "file:///srv/pgdr", **extra}}}).cluster("app")


def _backup(label, stop: datetime, verified=True, seconds=90):
    return {"label": label, "status": "ok", "start_time": iso(stop - timedelta(seconds=seconds)), "stop_time": iso(stop),
            "size": 1000, "stored_size": 400,
            "verification": {"ok": verified, "verified_at": iso(stop + timedelta(minutes=5))} if verified is not None
            else None}


def _snapshot(backups=None, lag_seconds=2.0, drill_passed=True, drill_age=timedelta(days=10)):
    return {"cluster": "app", "repository": "file:///srv/pgdr", "catalog_refreshed_at": iso(NOW - timedelta(minutes=1)),
            "backups": backups if backups is not None else
            [_backup("20261124-020000F", NOW - timedelta(hours=34)), _backup("20261125-020000F", NOW - timedelta(hours=10))],
            "wal": {"archived_lsn": "0/5000000", "archive_updated_at": iso(NOW - timedelta(seconds=3)),
                    "lag": None if lag_seconds is None else {"lag_bytes": 8192, "lag_seconds": lag_seconds,
                                                             "measured_at": iso(NOW - timedelta(seconds=30))}},
            "drills": [] if drill_passed is None else
            [{"recorded_at": iso(NOW - drill_age), "passed": drill_passed, "rto_seconds": 300.0, "rpo_seconds": 4.0,
              "failures": [] if drill_passed else ["canary row missing"]}]}


def test_healthy():
    st = cluster_status(_snapshot(), _cluster(), NOW)
    assert st.healthy and st.codes == [] and st.reasons == []
    assert st.last_backup["label"] == "20261125-020000F" and st.last_backup["age_seconds"] == 36000
    assert st.last_backup["duration_seconds"] == 90
    assert st.recoverable_from == iso(NOW - timedelta(hours=34))
    assert st.recoverable_to == iso(NOW - timedelta(seconds=3))  # the WAL archive reaches past the backup


@pytest.mark.parametrize("snapshot,code", [
    (_snapshot(backups=[_backup("20261124-020000F", NOW - timedelta(hours=27))]), "backup_too_old"),
    (_snapshot(backups=[]), "no_backup"),
    (_snapshot(backups=[_backup("20261125-020000F", NOW - timedelta(hours=1), verified=None)]), "backup_not_verified"),
    (_snapshot(backups=[_backup("20261125-020000F", NOW - timedelta(hours=1), verified=False)]),
     "backup_verify_failed"),
    (_snapshot(lag_seconds=61), "wal_lag_over_rpo"),
    (_snapshot(lag_seconds=None), "wal_lag_unknown"),
    (_snapshot(drill_passed=False), "drill_failed"),
    (_snapshot(drill_age=timedelta(days=101)), "drill_too_old"),
    (_snapshot(drill_passed=None), "no_drill"),
])
def test_each_rule_fails_alone_with_its_code_and_a_reason(snapshot, code):
    st = cluster_status(snapshot, _cluster(), NOW)
    assert not st.healthy and st.codes == [code] and len(st.reasons) == 1


def test_limits_come_from_the_config():
    snap = _snapshot(backups=[_backup("20261124-020000F", NOW - timedelta(hours=27))], lag_seconds=61,
                     drill_age=timedelta(days=101))
    assert cluster_status(snap, _cluster(max_backup_age_hours=28, max_drill_age_days=120,
                                         wal={"rpo_seconds": 120}), NOW).healthy
    assert cluster_status(snap, _cluster(max_backup_age_hours=0.5), NOW).codes[0] == "backup_too_old"


def test_bad_limits_name_the_key():
    for key, value in (("max_backup_age_hours", 0), ("max_backup_age_hours", "26h"), ("max_drill_age_days", 0)):
        with pytest.raises(ConfigError) as e:
            _cluster(**{key: value})
        assert f"clusters.app.{key}" in str(e.value)


def test_unreadable_repository():
    st = cluster_status(None, _cluster(), NOW, error="connection refused")
    assert st.codes == ["repository_unreachable"] and "connection refused" in st.reasons[0]
    assert metric_values(st, NOW) == {"pgdr_repository_up": 0.0, "pgdr_healthy": 0.0}


def test_metric_values():
    st = cluster_status(_snapshot(), _cluster(), NOW)
    m = metric_values(st, NOW)
    assert m["pgdr_repository_up"] == 1 and m["pgdr_healthy"] == 1 and m["pgdr_backups"] == 2
    assert m["pgdr_last_backup_age_seconds"] == 36000
    assert m["pgdr_last_backup_timestamp_seconds"] == (NOW - timedelta(hours=10)).timestamp()
    assert m["pgdr_last_backup_size_bytes"] == 1000 and m["pgdr_last_backup_stored_bytes"] == 400
    assert m["pgdr_last_backup_duration_seconds"] == 90 and m["pgdr_last_backup_verified"] == 1
    assert m["pgdr_wal_lag_bytes"] == 8192 and m["pgdr_wal_lag_seconds"] == 2
    assert m["pgdr_last_drill_success"] == 1 and m["pgdr_last_drill_rto_seconds"] == 300
    assert m["pgdr_last_drill_age_seconds"] == 10 * 86400
    assert m["pgdr_catalog_age_seconds"] == 60
    # no drill yet: its metrics are absent rather than zero
    m = metric_values(cluster_status(_snapshot(drill_passed=None), _cluster(), NOW), NOW)
    assert not any(k.startswith("pgdr_last_drill") for k in m)
