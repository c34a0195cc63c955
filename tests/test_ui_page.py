"""The Disaster recovery page in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium),
inside a running Airflow API server: logged in through Airflow's own login form, the navigation entry is there,
the card and charts show the data of real backups, a verification and a drill; light and dark mode, with a
screenshot of each saved as a test artifact (``$PGDR_TEST_ARTIFACTS``, default ``.demo/test-artifacts``)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from helpers import pgdr
from test_api import dr_environment

CLUSTER = "drui"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("PGDR_TEST_ARTIFACTS", ROOT / ".demo" / "test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1440,1600"]


@pytest.fixture(scope="module")
def env(workdir):
    with dr_environment(workdir, CLUSTER) as e:
        yield e


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "chromium and chromium-driver are missing: bash scripts/prepare-test-host.sh"
    profile = tempfile.mkdtemp(prefix="pgdr-chromium-")
    options = webdriver.ChromeOptions()
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.binary_location = chromium
    d = webdriver.Chrome(options=options, service=Service(driver))
    d.set_page_load_timeout(60)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # the element is not there yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _login(d, server):
    from selenium.webdriver.common.by import By

    d.get(server.url + "/auth/login/")
    user = _wait(lambda: d.find_element(By.NAME, "username"), what="the login form")
    user.send_keys("admin")
    d.find_element(By.NAME, "password").send_keys(server.password("admin"))
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(lambda: any(c["name"] == "_token" for c in d.get_cookies()), what="Airflow's _token cookie")


def _open_page(d, server):
    """Through the navigation entry, into the page's frame, until it has loaded its data."""
    from selenium.webdriver.common.by import By

    d.get(server.url + "/")
    link = _wait(lambda: d.find_element(By.CSS_SELECTOR, "a[href$='/plugin/disaster-recovery']"),
                 what="the Disaster recovery entry in Airflow's navigation")
    assert "Disaster" in (link.text + (link.get_attribute("title") or "") + (link.get_attribute("aria-label") or ""))
    link.click()
    frame = _wait(lambda: d.find_element(By.CSS_SELECTOR, "iframe[src$='/pgdr/ui']"), what="the page's frame")
    d.switch_to.frame(frame)
    _wait(lambda: d.execute_script("return document.body.dataset.loaded === '1'"), what="the page's data")
    _wait(lambda: d.execute_script("return document.querySelectorAll('.js-plotly-plot').length === 4"),
          what="four charts")


def test_page_shows_real_backups_verify_and_drill(env, browser):
    from selenium.webdriver.common.by import By

    d, server = browser, env.server
    _login(d, server)
    _open_page(d, server)
    card = d.find_element(By.CSS_SELECTOR, f".card[data-cluster='{CLUSTER}']")
    assert "healthy" in card.get_attribute("class").split()
    assert "passed" in card.text  # the verification and the drill
    code, listing, _ = pgdr("--json", "list", "--cluster", CLUSTER, config=env.config)
    sizes = [b["size"] for b in listing["backups"]]
    # the charts carry the real numbers: sizes per backup, the drill's RTO and RPO
    assert d.execute_script("return document.getElementById('chart-size').data[0].y") == sizes
    assert d.execute_script("return document.getElementById('chart-size').data[1].y") == \
        [b["stored_size"] for b in listing["backups"]]
    durations = d.execute_script("return document.getElementById('chart-duration').data[0].y")
    assert len(durations) == 2 and all(x > 0 for x in durations)
    assert d.execute_script("return document.getElementById('chart-drill').data[0].y") == [41.5]
    assert d.execute_script("return document.getElementById('chart-drill').data[1].y") == [2.0]
    assert len(d.execute_script("return document.getElementById('chart-wal').data[0].y")) >= 1
    rows = d.find_elements(By.CSS_SELECTOR, "#backups tbody tr")
    assert [r.get_attribute("data-label") for r in rows] == list(reversed(env.labels))
    assert "ok" in rows[0].text and "Restore (dry run)" in rows[0].text
    _wait(lambda: d.execute_script("return document.body.dataset.auditLoaded === '1'"), what="the audit log")
    audit = d.find_element(By.ID, "audit").text
    assert "backup" in audit and "verify" in audit
    # each record's parameters as JSON, cut at 160 characters, never in the middle of an HTML entity
    shown = d.execute_script(
        "return [...document.querySelectorAll('#audit tbody tr')].map((tr) => tr.cells[7].textContent)")
    params = d.execute_script("return DATA.audit.map((r) => JSON.stringify(r.parameters || {}))")
    assert len(params) >= 3
    assert shown == [p[:160] for p in params]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    d.switch_to.default_content()
    d.save_screenshot(str(ARTIFACTS / "dr-page-light.png"))

    # an action from the table: a restore dry run starts a run of the restore DAG, and lands in the audit log
    d.switch_to.frame(d.find_element(By.CSS_SELECTOR, "iframe[src$='/pgdr/ui']"))
    rows[0].find_element(By.CSS_SELECTOR, "button[data-act='restore']").click()
    toast = _wait(lambda: d.find_element(By.ID, "toast").text, what="the action's result")
    assert f"pgdr_{CLUSTER}_restore" in toast, toast
    status, out, _ = server.request("GET", f"/pgdr/api/v1/clusters/{CLUSTER}/audit?action=restore", user="viewer")
    assert out["records"][0]["actor"] == "admin" and out["records"][0]["parameters"] == \
        {"backup": env.labels[1], "dry_run": True}
    d.switch_to.default_content()


def test_page_in_dark_mode(env, browser):
    d, server = browser, env.server
    d.get(server.url + "/")
    d.execute_script("localStorage.setItem('theme', 'dark')")  # what Airflow's theme switch stores
    _open_page(d, server)
    assert d.execute_script("return document.documentElement.classList.contains('dark')")
    bg = d.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(17, 20, 24)", bg
    font = d.execute_script("return document.getElementById('chart-size').layout.font.color")
    assert font == "#e6e9ee"  # chart text readable on the dark background
    d.switch_to.default_content()
    assert d.execute_script("return document.documentElement.classList.contains('dark')")  # Airflow itself
    d.save_screenshot(str(ARTIFACTS / "dr-page-dark.png"))
