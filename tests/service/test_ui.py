"""The web UI (/ui/) and the offline API docs (/docs) in a real headless Chromium, against a real
server on the session's Ray head that runs the fake job (tests/service/fake_job.py).

The browser resolves no host but 127.0.0.1, so a page that needed the internet would break here.
CI installs Debian's chromium and chromium-driver (.ci/run); where they are missing these tests
fail and say how to install them, unless TOPK_SKIP_BROWSER=1 (for a developer's machine).
The job page's screenshot is written to docs/ui-job-page.png on every run (the README shows it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from urllib.parse import urlsplit

import pytest
from service_harness import FAKE_JOB, REPO, ServerProcess, client_for, tiny_spec

from service.store import Store

SCREENSHOT = REPO / "docs" / "ui-job-page.png"
POLL_S = 3  # app.js: POLL_MS


class Browser:
    """Headless Chromium through chromium-driver, keeping every URL the browser requested (with
    its request headers) from Chrome's performance log."""

    def __init__(self, driver):
        self.driver = driver
        self.requests: list[tuple[str, dict]] = []

    def drain(self) -> list[tuple[str, dict]]:
        """The requests sent since the last drain (also kept in `self.requests`)."""
        new = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                request = message["params"]["request"]
                new.append((request["url"], request.get("headers", {})))
        self.requests.extend(new)
        return new

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition, timeout: float = 30.0, message: str = ""):
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )
        from selenium.webdriver.support.ui import WebDriverWait

        waiter = WebDriverWait(
            self.driver,
            timeout,
            poll_frequency=0.2,
            ignored_exceptions=(StaleElementReferenceException, NoSuchElementException),
        )
        return waiter.until(lambda _: condition(), message)

    def open_as(self, server: ServerProcess, fragment: str, token: str) -> None:
        """Open /ui/#<fragment> in a fresh tab session and log in with `token`."""
        self.driver.get(f"{server.url}/ui/")
        self.driver.execute_script("sessionStorage.clear()")
        self.driver.get(f"{server.url}/ui/#{fragment}")
        self.driver.refresh()
        field = self.wait(lambda: self.find("#login:not([hidden]) #token")[0], 10, "login form")
        field.send_keys(token)
        self.find("#login-form button[type=submit]")[0].click()
        self.wait(lambda: self.find("#login[hidden]"), 10, "log-in to be accepted")

    def status(self) -> str | None:
        found = self.find("#status")
        return found[0].get_attribute("data-status") if found else None


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("TOPK_SKIP_BROWSER") == "1":
        pytest.skip("TOPK_SKIP_BROWSER=1: browser tests skipped")
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.fail(
            "the UI tests need Chromium and its driver: apt-get install -y chromium "
            "chromium-driver (.ci/run does), or set TOPK_SKIP_BROWSER=1 to skip them"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the UI tests need selenium: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--window-size=1280,1320",
        # No network beyond this machine: every other host name fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield Browser(driver)
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def ui_server(request, tmp_path_factory):
    """(server, store, alice's token, bob's token): one server for the module on the session's
    Ray head, running the fake job."""
    # Asked for here, not as a parameter: the session's Ray head would be started before the
    # browser fixture has said whether these tests run at all.
    ray_head = request.getfixturevalue("ray_head")
    data_dir = tmp_path_factory.mktemp("ui")
    env = {
        **ray_head.auth_env,
        "TOPK_DATA_DIR": str(data_dir),
        "TOPK_RAY_ADDRESS": ray_head.dashboard_url,
        "TOPK_JOB_PYTHON": f"{sys.executable} {FAKE_JOB}",
        "TOPK_RECONCILE_INTERVAL_S": "0.5",
        "TOPK_RETRY_BACKOFF_S": "0.5",
    }
    store = Store.from_url(f"sqlite:///{data_dir / 'topk.db'}")
    store.migrate()
    server = ServerProcess(env, data_dir / "server.log").start()
    try:
        yield server, store, store.create_token("alice"), store.create_token("bob")
    finally:
        server.stop()
        store.close()


def points(browser: Browser, chart: str, series: str) -> list[tuple[int, float]]:
    return [
        (int(p.get_attribute("data-epoch")), float(p.get_attribute("data-value")))
        for p in browser.find(f'[data-chart="{chart}"] circle[data-series="{series}"]')
    ]


def test_job_page_follows_a_job_to_success(browser, ui_server):
    server, _, alice, _ = ui_server
    with client_for(server, alice) as http:
        job = http.post("/v1/jobs", json=tiny_spec("sleep5")).json()
        browser.open_as(server, f"/jobs/{job['id']}", alice)
        # Opened while the job runs: the page follows it by itself.
        first = browser.wait(browser.status, 10, "the job's status")
        assert first in ("queued", "launching", "running"), first
        browser.wait(lambda: browser.status() == "succeeded", 120, "the page to show success")
        record = http.get(f"/v1/jobs/{job['id']}").json()
        epochs = http.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]
    assert record["status"] == "succeeded" and len(epochs) == 5

    # one point per epoch on every curve, at the API's values
    assert points(browser, "loss", "train_loss") == [(e["epoch"], e["train_loss"]) for e in epochs]
    for key in ("val_top1", "val_top5", "val_macro_top5"):
        assert points(browser, "accuracy", key) == [(e["epoch"], e[key]) for e in epochs]
    # the status history and the Ray dashboard link
    events = [li.get_attribute("data-status") for li in browser.find("#events li")]
    assert events == [e["to_status"] for e in record["events"]]
    assert events == ["queued", "launching", "running", "succeeded"]
    link = browser.find("a#dashboard")[0]
    assert link.get_attribute("href") == record["dashboard_url"]
    assert link.get_attribute("rel") == "noopener noreferrer"
    assert browser.find("#live")[0].get_attribute("data-live") == "false"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.driver.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size < 400_000

    # The job has ended: the page stops polling.
    browser.drain()
    time.sleep(2 * POLL_S + 1)
    assert [url for url, _ in browser.drain() if job["id"] in url] == []

    # The list shows it with its loss and best metric.
    browser.driver.get(f"{server.url}/ui/#/")
    row = f'#jobs tr[data-id="{job["id"]}"]'
    browser.wait(lambda: browser.find(row), 15, "the job in the list")
    assert browser.find(f"{row} .status")[0].text == "succeeded"
    assert browser.find(f'{row} [data-field="loss"]')[0].text == "0.200"  # 1 / epoch 5
    assert browser.find(f'{row} [data-field="best"]')[0].text == "val_top5 1.000 (epoch 5)"


def test_job_page_shows_a_rank_1_collapse_warning(browser, ui_server):
    server, _, alice, _ = ui_server
    with client_for(server, alice) as http:
        healthy = http.post("/v1/jobs", json=tiny_spec("sleep1")).json()
        job = http.post("/v1/jobs", json=tiny_spec("sleep2-collapse")).json()
        browser.open_as(server, f"/jobs/{job['id']}", alice)
        browser.wait(lambda: browser.status() == "succeeded", 120, "the page to show success")
        warnings = http.get(f"/v1/jobs/{job['id']}").json()["warnings"]
        assert len(warnings) == 1 and "up to 95% of the validation images" in warnings[0]
        shown = browser.find('[data-warning="collapse"]')
        assert [element.text for element in shown] == warnings
        browser.open_as(server, f"/jobs/{healthy['id']}", alice)
        browser.wait(
            lambda: (
                healthy["id"] in "".join(h.text for h in browser.find("h1"))
                and browser.status() == "succeeded"
            ),
            120,
            "the healthy job's page",
        )
        assert browser.find('[data-warning="collapse"]') == []


def test_another_owners_job_is_not_found_as_in_the_api(browser, ui_server):
    server, _, alice, bob = ui_server
    with client_for(server, alice) as as_alice, client_for(server, bob) as as_bob:
        job = as_alice.post("/v1/jobs", json=tiny_spec("sleep1")).json()
        from_api = as_bob.get(f"/v1/jobs/{job['id']}")
    assert from_api.status_code == 404
    browser.open_as(server, f"/jobs/{job['id']}", bob)
    message = browser.wait(lambda: browser.find("#not-found-message")[0], 15, "not found").text
    assert message == from_api.json()["message"]
    assert browser.find(".not-found")[0].get_attribute("data-error") == from_api.json()["error"]
    assert browser.find("#status") == [] and browser.status() is None

    # Tokens travel in the Authorization header only, never in a URL.
    requests = browser.requests + browser.drain()
    api_calls = [(url, headers) for url, headers in requests if "/v1/" in url]
    assert api_calls, "the performance log recorded no API call"
    for url, headers in api_calls:
        assert headers.get("Authorization") in (f"Bearer {alice}", f"Bearer {bob}"), url
    for token in (alice, bob):
        assert token not in browser.driver.current_url
        assert not [url for url, _ in requests if token in url]


def test_text_from_the_api_stays_text(browser, ui_server):
    server, store, *_ = ui_server
    owner = "<img src=x onerror=\"document.title='pwned'\"><b>mallory</b>"
    token = store.create_token(owner)
    with client_for(server, token) as http:
        job = http.post("/v1/jobs", json=tiny_spec("sleep1")).json()
    browser.open_as(server, f"/jobs/{job['id']}", token)
    browser.wait(browser.status, 15, "the job page")
    owner_cell = [dd for dd in browser.find("dl.facts dd") if "mallory" in dd.text]
    assert [dd.text for dd in owner_cell] == [owner]
    assert browser.find("#view img, #view b") == []
    assert browser.driver.title != "pwned"


def test_sweep_page_shows_the_trial_table_and_curves(browser, ui_server):
    server, _, alice, _ = ui_server
    sweep = {"train": tiny_spec("sleep2"), "search": {"optim.lr": {"grid": [0.1, 0.01]}},
             "scheduler": {"name": "fifo"}}  # fmt: skip
    with client_for(server, alice) as http:
        created = http.post("/v1/sweeps", json=sweep).json()
        browser.open_as(server, f"/sweeps/{created['id']}", alice)
        browser.wait(lambda: browser.status() == "succeeded", 120, "the sweep page to show success")
        record = http.get(f"/v1/sweeps/{created['id']}").json()

    rows = browser.find("#trials tbody tr")
    assert [row.get_attribute("data-trial") for row in rows] == ["t0", "t1"]
    assert [row.find_element("css selector", "td:nth-child(3)").text for row in rows] == [
        "0.1",
        "0.01",
    ]
    assert [row.get_attribute("data-trial") for row in browser.find("#trials tr.best")] == ["t1"]
    best = browser.find("#best-params")[0].text
    assert "optim.lr" in best and "0.01" in best and record["best_params"] == {"optim.lr": 0.01}
    # each trial's curve, one point per epoch (the trial's own metrics.jsonl through the API)
    for trial in ("t0", "t1"):
        assert [epoch for epoch, _ in points(browser, "trial-metric", trial)] == [1, 2]
        assert len(points(browser, "trial-loss", trial)) == 2


def test_a_running_sweeps_page_draws_its_trials_as_they_train(browser, ui_server):
    server, _, alice, _ = ui_server
    sweep = {"train": tiny_spec("livesleep6"), "search": {"optim.lr": {"grid": [0.1, 0.01]}},
             "scheduler": {"name": "fifo"}}  # fmt: skip
    with client_for(server, alice) as http:
        created = http.post("/v1/sweeps", json=sweep).json()
        browser.open_as(server, f"/sweeps/{created['id']}", alice)
        # while the sweep runs: the live table, and the running trial's curve growing
        browser.wait(
            lambda: browser.status() == "running"
            and len(points(browser, "trial-metric", "t0")) >= 2,
            120, "a running sweep's trial curve with two points",
        )  # fmt: skip
        assert http.get(f"/v1/sweeps/{created['id']}").json()["status"] == "running"
        assert [row.get_attribute("data-trial") for row in browser.find("#trials tbody tr")] == [
            "t0",
            "t1",
        ]
        browser.wait(lambda: browser.status() == "succeeded", 120, "the sweep to succeed")
    for trial in ("t0", "t1"):  # re-read after the live view: every epoch, no stale cache
        assert [epoch for epoch, _ in points(browser, "trial-metric", trial)] == list(range(1, 7))


def test_docs_render_from_the_package_with_no_network(browser, ui_server):
    server, *_ = ui_server
    browser.drain()
    browser.driver.get(f"{server.url}/docs")
    post_jobs = '.opblock-post .opblock-summary-path[data-path="/v1/jobs"]'
    browser.wait(lambda: browser.find(post_jobs), 30, "Swagger UI to render POST /v1/jobs")
    assert browser.find("#operations-jobs-submit_job_v1_jobs_post")
    assets = browser.driver.execute_script(
        "return [...document.querySelectorAll('script[src], link[href]')]"
        ".map(node => node.src || node.href)"
    )
    assert len(assets) >= 3  # the bundle, its stylesheet, the icon
    origin = urlsplit(server.url).netloc
    assert [url for url in assets if urlsplit(url).netloc != origin] == []
    requested = [url for url, _ in browser.drain()]
    assert f"{server.url}/openapi.json" in requested
    assert [url for url in requested if urlsplit(url).netloc not in (origin, "")] == []


def test_no_page_broke_its_content_security_policy(browser, ui_server):
    browser.driver.get(f"{ui_server[0].url}/ui/")
    problems = [
        entry["message"]
        for entry in browser.driver.get_log("browser")
        if "Content Security Policy" in entry["message"] or "Uncaught" in entry["message"]
    ]
    assert problems == []
