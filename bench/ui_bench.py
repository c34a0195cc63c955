"""pgdr benchmark: the Disaster recovery page and API at scale, in a real Airflow API server and headless Chromium.

    .venv/bin/python bench/ui_bench.py                       # 10 clusters x 100 backups, 200 audit records each
    .venv/bin/python bench/ui_bench.py --clusters 20 --backups 365

Each cluster gets a file repository holding a catalog cache (<cluster>/catalog.json) of N backups (verified,
sized, timed), a WAL lag history, a few drills, and audit records — the objects the API reads; no PostgreSQL
is needed. Prints the API's overview, health and metrics latency and the page's own load time (navigation to
cards and table drawn, charts drawn, audit log shown). Target: the page under a second at 10 x 100.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sys

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "tests"))

from airflow_server import AirflowServer  # noqa: E402
from pgdr.audit import record_operation  # noqa: E402
from pgdr.config import RepositoryConfig  # noqa: E402
from pgdr.results import iso  # noqa: E402
from pgdr.storage import open_storage  # noqa: E402


def populate(base: Path, clusters: int, backups: int, audit: int) -> Path:
    now = datetime.now(timezone.utc)
    config = {"clusters": {}}
    for c in range(clusters):
        name = f"db{c:02d}"
        repo = base / f"repo-{name}"
        storage = open_storage(RepositoryConfig(url=f"file://{repo}"))
        items = []
        for i in range(backups):
            stop = now - timedelta(days=backups - 1 - i, minutes=c)
            size = 50_000_000_000 + i * 100_000_000 + c * 1_000_000
            items.append({"label": stop.strftime("%Y%m%d-%H%M%SF"), "status": "ok", "type": "full",
                          "pg_version": "18.1", "timeline": 1, "start_lsn": f"{i:X}/28000028",
                          "stop_lsn": f"{i:X}/28000120", "start_time": iso(stop - timedelta(minutes=40 + i % 7)),
                          "stop_time": iso(stop), "size": size, "stored_size": size // 4, "detail": None,
                          "verification": {"ok": True, "verified_at": iso(stop + timedelta(hours=1)),
                                           "tool_version": "bench", "failures": []},
                          "key_id": None, "pinned_until": None})
        lag = [{"measured_at": iso(now - timedelta(minutes=10 * k)), "lag_bytes": 4096 * k, "lag_seconds": k % 30}
               for k in range(200, 0, -1)]
        drills = [{"key": f"{name}/reports/drill/{k}.json", "recorded_at": iso(now - timedelta(days=90 * k)),
                   "passed": True, "backup_label": items[-1]["label"], "rto_seconds": 1800 + k * 60,
                   "rpo_seconds": 5 + k, "rto_target_seconds": 3600, "rpo_target_seconds": 60, "failures": []}
                  for k in range(4, 0, -1)]
        snapshot = {"cluster": name, "repository": f"file://{repo}", "catalog_refreshed_at": iso(now),
                    "backups": items, "wal": {"archived_lsn": "99/0", "archive_updated_at": iso(now),
                                              "lag": {**lag[-1], "lag_bytes": 4096, "lag_seconds": 1.0},
                                              "lag_history": lag}, "drills": drills, "format": 1}
        storage.put_bytes(f"{name}/catalog.json", json.dumps(snapshot).encode())
        for k in range(audit):
            record_operation(storage, name, actor=f"user{k % 5}", actor_type="airflow", source="api",
                             action=("backup", "verify", "restore", "keep")[k % 4], parameters={"k": k},
                             outcome="ok", duration_seconds=k / 10)
        config["clusters"][name] = {"dsn": "host=127.0.0.1 dbname=postgres", "repository": f"file://{repo}"}
    path = base / "pgdr.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def timed(fn, n=5) -> float:
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        fn()
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--backups", type=int, default=100)
    p.add_argument("--audit", type=int, default=200, help="audit records per cluster")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="pgdr-ui-bench-"))
    server = None
    try:
        config = populate(base, args.clusters, args.backups, args.audit)
        server = AirflowServer(config).start()
        for path in ("/pgdr/api/v1/overview?audit_limit=0", "/pgdr/api/v1/audit?limit=200", "/pgdr/metrics",
                     "/pgdr/health/backup"):
            status, body, _ = server.request("GET", path, user="admin")
            size = len(json.dumps(body)) if not isinstance(body, str) else len(body)
            t = timed(lambda: server.request("GET", path, user="admin"))
            print(f"{path:42} {status}  {t * 1000:8.1f} ms  {size / 1000:8.1f} kB")
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        profile = tempfile.mkdtemp(prefix="pgdr-chromium-")
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={profile}", "--window-size=1440,1600"):
            options.add_argument(flag)
        options.binary_location = shutil.which("chromium")
        d = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        try:
            d.get(server.url + "/auth/login/")
            d.add_cookie({"name": "_token", "value": server.token("admin"), "path": "/"})
            for attempt in range(4):  # the first load fetches plotly.min.js; later ones have it cached
                d.get(server.url + "/pgdr/ui")
                deadline = time.monotonic() + 60
                while not d.execute_script("return document.body.dataset.auditLoaded === '1'"):
                    assert time.monotonic() < deadline, "the page did not load"
                    time.sleep(0.05)
                cards, loaded, audit = d.execute_script(
                    "const b = document.body.dataset; return [Number(b.cardsMs), Number(b.loadedMs), Number(b.auditMs)]")
                print(f"page load {attempt + 1} ({'cold' if attempt == 0 else 'warm'}): cards and table {cards:6.0f} ms,"
                      f" charts {loaded:6.0f} ms, audit log {audit:6.0f} ms  "
                      f"({args.clusters} clusters x {args.backups} backups)")
        finally:
            d.quit()
            shutil.rmtree(profile, ignore_errors=True)
    finally:
        if server:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
