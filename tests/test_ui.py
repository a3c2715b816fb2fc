"""The dashboard at /ui in a real headless Chromium (selenium), against the real router
(`python -m kvctl router`) in front of real sim engines."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from kvctl.config import Instance
from kvctl.router.history import SPAN_SECONDS, STEP_SECONDS, History
from kvctl.router.lifecycle import Lifecycle
from kvctl.router.metrics import Metrics
from kvctl.router.traffic import TrafficMonitor

from helpers import Router, Tree, free_port, sim_instance, sim_state, sim_yaml, wait_for, write_config

pytestmark = pytest.mark.timeout(180)

MODELS = ("org/a", "org/b", "c")


def _chromium() -> tuple[str, str] | None:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    found = _chromium()
    if found is None:
        pytest.skip("no Chromium and chromedriver on this machine (Debian: apt-get install chromium chromium-driver; .ci/run does)")
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(arg)
    options.binary_location = found[0]
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(found[1]))
    try:
        yield driver
    finally:
        driver.quit()


def three_models(start: Callable[..., Router], **sections: object) -> Router:
    return start(
        [
            sim_instance("org/a", name="a", memory_gb=16),
            sim_instance("org/b", name="b", dialect="sglang", memory_gb=8),
            sim_instance("c", name="c", memory_gb=8),
        ],
        sleep_manager={"memory_budget_gb": 40},
        **sections,
    )


def card(driver: WebDriver, model: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f'.card[data-model="{model}"]')


def text(driver: WebDriver, model: str, part: str) -> str:
    return card(driver, model).find_element(By.CSS_SELECTOR, part).text


def instance(rt: Router, model: str) -> Instance:
    return next(i for i in rt.config.instances if i.model == model)


def set_viewport(driver: WebDriver, width: int, height: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})


def fits_width(driver: WebDriver) -> bool:
    return bool(driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"))


def test_dashboard_shows_every_model_follows_traffic_and_sleeps_on_click(router: Callable[..., Router], browser: WebDriver) -> None:
    rt = three_models(router)
    browser.get(rt.url + "/ui")
    for model in MODELS:
        wait_for(lambda m=model: text(browser, m, ".state") == "awake", 20, what=f"{model} shown awake")
        assert text(browser, model, ".model-name") == model
    wait_for(lambda: "16 / 40 GB" in text(browser, "org/a", ".meter.mem"), 10, what="memory held against the budget")
    assert fits_width(browser)
    browser.execute_script("window.kvctlMarker = 1")  # gone if the page reloads

    chart_max = "return Number(document.querySelector('#chart-rps path[data-model=\"org/a\"]').dataset.max)"
    wait_for(lambda: browser.execute_script(chart_max) is not None, 20, what="the req/s chart drawn")
    assert browser.execute_script(chart_max) == 0
    assert text(browser, "org/a", ".f-rate") == "0.00"
    client = openai.OpenAI(base_url=rt.url + "/v1", api_key="unused", max_retries=0)
    for _ in range(6):
        client.completions.create(model="org/a", prompt="hello", max_tokens=4)
    wait_for(lambda: text(browser, "org/a", ".f-rate") not in ("0.00", "–"), 10, what="req/s figure moves")
    wait_for(lambda: browser.execute_script(chart_max) > 0, 3 * STEP_SECONDS + 10, what="req/s chart shows the traffic")
    assert text(browser, "org/a", ".f-last").endswith("ago")
    assert text(browser, "c", ".f-rate") == "0.00"

    card(browser, "org/a").find_element(By.CSS_SELECTOR, ".btn-sleep").click()
    wait_for(lambda: sim_state(instance(rt, "org/a"))["sleeping"], 20, what="the sim asleep")
    wait_for(lambda: text(browser, "org/a", ".state") == "asleep", 10, what="card shows asleep")
    wait_for(lambda: "manual" in text(browser, "org/a", ".replicas"), 10, what="the cause shown")
    assert "asleep for" in text(browser, "org/a", ".timer") and "manual" in text(browser, "org/a", ".timer")
    wait_for(lambda: "draining → asleep" in browser.find_element(By.ID, "events").text, 10, what="the change in the event list")
    first = browser.find_element(By.CSS_SELECTOR, "#events .event")
    assert first.find_element(By.CSS_SELECTOR, ".ev-inst").text == "a" and "manual" in first.text
    assert "0 / 40 GB" in text(browser, "org/a", ".meter.mem")
    assert text(browser, "org/b", ".state") == "awake"
    assert browser.execute_script("return window.kvctlMarker") == 1

    card(browser, "org/a").find_element(By.CSS_SELECTOR, ".btn-wake").click()
    wait_for(lambda: text(browser, "org/a", ".state") == "awake", 20, what="card shows awake again")
    assert not sim_state(instance(rt, "org/a"))["sleeping"]
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    set_viewport(browser, 390, 844)  # a phone: one column, nothing wider than the screen
    wait_for(lambda: fits_width(browser), 5, what="page fits 390 px")
    widths = {card(browser, m).size["width"] for m in MODELS}
    assert len(widths) == 1 and 300 < widths.pop() <= 390


def test_dashboard_asks_for_the_key_and_the_admin_token_and_shows_the_refusal(router: Callable[..., Router], browser: WebDriver) -> None:
    rt = three_models(router, router={"api_keys": ["key-1"], "admin_token": "admin-1"})
    assert httpx.get(rt.url + "/ui", timeout=10).status_code == 200  # the page itself needs no key ...
    assert httpx.get(rt.url + "/traffic/history", timeout=10).status_code == 401  # ... its data does
    browser.get(rt.url + "/ui")
    key_input = wait_for(lambda: (el := browser.find_element(By.ID, "key-input")).is_displayed() and el, 20, what="the key asked for")
    assert not browser.find_elements(By.CSS_SELECTOR, ".card")
    key_input.send_keys("key-1")
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    wait_for(lambda: text(browser, "org/b", ".state") == "awake", 20, what="cards after the key")
    assert browser.execute_script("return sessionStorage.getItem('kvctl.key')") == "key-1"
    assert browser.execute_script("return localStorage.length") == 0

    card(browser, "org/b").find_element(By.CSS_SELECTOR, ".btn-sleep").click()
    wait_for(lambda: "admin token" in text(browser, "org/b", ".msg.error"), 10, what="the router's refusal shown")
    refusal = httpx.post(rt.url + "/models/org%2Fb/sleep", headers={"Authorization": "Bearer key-1"}, timeout=10).json()["error"]["message"]
    assert text(browser, "org/b", ".msg") == refusal
    admin_input = browser.find_element(By.ID, "admin-input")
    assert admin_input.is_displayed()
    assert not sim_state(instance(rt, "org/b"))["sleeping"]

    admin_input.send_keys("admin-1")
    browser.find_element(By.CSS_SELECTOR, "#admin-form button[type=submit]").click()  # the refused action runs again
    wait_for(lambda: sim_state(instance(rt, "org/b"))["sleeping"], 20, what="the sim asleep")
    wait_for(lambda: text(browser, "org/b", ".state") == "asleep", 10, what="card shows asleep")
    assert "manual" in text(browser, "org/b", ".replicas")
    assert not browser.find_element(By.ID, "auth").is_displayed()


def test_page_files_redirect_and_history_route(router: Callable[..., Router]) -> None:
    rt = router([sim_instance("org/a", name="a", memory_gb=4)], sleep_manager={"memory_budget_gb": 10})
    root = httpx.get(rt.url + "/", timeout=10)
    assert root.status_code == 307 and root.headers["location"] == "/ui"
    page = httpx.get(rt.url + "/ui", timeout=10)
    assert page.headers["content-type"].startswith("text/html") and "script-src 'self'" in page.headers["content-security-policy"]
    assert 'src="ui/app.js"' in page.text and "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere
    assert httpx.get(rt.url + "/ui/app.js", timeout=10).headers["content-type"].startswith("text/javascript")
    missing = httpx.get(rt.url + "/ui/secrets.txt", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(rt.url + "/traffic/history?since=abc", timeout=10).json()["error"]["param"] == "since"

    history = wait_for(lambda: (body := httpx.get(rt.url + "/traffic/history", timeout=10).json())["time"] and body, 3 * STEP_SECONDS)
    assert history["step_seconds"] == STEP_SECONDS and history["span_seconds"] == SPAN_SECONDS >= 900
    assert history["memory_budget_gb"] == 10
    assert history["models"]["org/a"]["memory_gb"][-1] == 4
    newer = httpx.get(rt.url + f"/traffic/history?since={history['time'][-1]}", timeout=10).json()
    assert all(t > history["time"][-1] for t in newer["time"])
    assert len(newer["models"]["org/a"]["request_rate"]) == len(newer["time"])


def test_history_keeps_a_fixed_number_of_samples(tmp_path: Path) -> None:
    config = write_config(tmp_path, [sim_instance("m", memory_gb=2)])
    lifecycle = Lifecycle(config, Metrics())
    traffic = TrafficMonitor(config.models(), 60, lifecycle.in_flight, lifecycle.queued)
    history = History(traffic, lifecycle)
    traffic.record("m", True, 0.2, 0.05)
    history.sample()
    first = history.as_json()
    assert first["models"]["m"]["request_rate"][0] > 0 and first["models"]["m"]["ttft_p50"] == [0.05]
    for _ in range(1000):
        history.sample()
    body = history.as_json()
    assert len(body["time"]) == len(body["models"]["m"]["request_rate"]) == SPAN_SECONDS / STEP_SECONDS + 1
    assert body["models"]["m"]["request_rate"][-1] == 0  # counted once, not again by later samples


def test_dashboard_stops_and_starts_an_engine_of_a_real_tree(kvtree: Tree, browser: WebDriver) -> None:
    kvtree.write(sim_yaml("s", free_port(), model="org/s"))
    assert kvtree.kvctl("up").returncode == 0
    browser.get(kvtree.router_url + "/ui")
    wait_for(lambda: text(browser, "org/s", ".state") == "awake", 20, what="shown awake")
    card(browser, "org/s").find_element(By.CSS_SELECTOR, ".btn-stop").click()
    wait_for(lambda: text(browser, "org/s", ".state") == "stopped", 60, what="shown stopped")
    assert "s" not in kvtree.pids()  # supervisord stopped the engine's process
    start = card(browser, "org/s").find_element(By.CSS_SELECTOR, ".btn-wake")
    wait_for(lambda: start.text == "Start" and start.is_enabled(), 10, what="the Start button")
    start.click()
    wait_for(lambda: text(browser, "org/s", ".state") == "awake", 60, what="shown awake again")
    assert "s" in kvtree.pids()
