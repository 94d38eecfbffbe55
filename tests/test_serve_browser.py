"""The web page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium): it shows live
progress while a job runs, generates images into the gallery, and a click on a result puts its settings back.
The screenshot is kept: under pytest's tmp dir, and copied to ``$TRITONSD_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from _serve_server import Server

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # headless Chromium against a server started for the module

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _first(paths) -> str | None:
    return next((p for p in paths if Path(p).is_file()), shutil.which(Path(paths[0]).name))


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ModuleNotFoundError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    chromium, driver_path = _first(CHROMIUM), _first(CHROMEDRIVER)
    if chromium is None or driver_path is None:
        pytest.fail("Chromium and chromedriver are needed: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(["--checkpoint", "demo:sd1"], tmp_path_factory.mktemp("serve-page") / "server.log")
    yield s
    s.stop()


def _set(driver, field_id: str, value) -> None:
    element = driver.find_element("id", field_id)
    element.clear()
    element.send_keys(str(value))


def test_page_generates_into_the_gallery(browser, server, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 120, poll_frequency=0.1)
    browser.get(server.url + "/")
    wait.until(lambda d: len(Select(d.find_element("id", "sampler_name")).options) >= 5)

    # live progress on a slow job, then the Interrupt button
    _set(browser, "prompt", "a slow one")
    for field_id, value in (("width", 64), ("height", 64), ("steps", 1000), ("seed", 5), ("batch_size", 1)):
        _set(browser, field_id, value)
    Select(browser.find_element("id", "sampler_name")).select_by_visible_text("Euler")
    browser.find_element("id", "generate").click()
    wait.until(lambda d: "/1000" in d.find_element("id", "progress-text").text)
    assert float(browser.find_element("id", "progress").get_attribute("value")) > 0
    browser.find_element("id", "interrupt").click()
    wait.until(lambda d: len(d.find_elements("css selector", "#gallery .result img")) == 1)
    wait.until(lambda d: d.find_element("id", "generate").is_enabled())

    # a batch of two small images
    _set(browser, "prompt", "a red circle above a blue square")
    _set(browser, "steps", 3)
    _set(browser, "seed", 99)
    _set(browser, "batch_size", 2)
    browser.find_element("id", "generate").click()
    wait.until(lambda d: len(d.find_elements("css selector", "#gallery .result img")) == 3)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth === 64)"))
    assert browser.find_element("id", "error").text == ""
    texts = [e.text for e in browser.find_elements("css selector", "#gallery .result pre")]
    assert "Seed: 99" in texts[1] and "Seed: 100" in texts[0]  # newest first
    assert all("Steps: 3" in t and "Size: 64x64" in t for t in texts[:2])

    # a click on a result reuses its settings
    _set(browser, "seed", -1)
    _set(browser, "steps", 20)
    browser.find_elements("css selector", "#gallery .result img")[0].click()
    assert browser.find_element("id", "seed").get_attribute("value") == "100"
    assert browser.find_element("id", "steps").get_attribute("value") == "3"
    assert browser.find_element("id", "prompt").get_attribute("value") == "a red circle above a blue square"

    shot = tmp_path / "serve-page.png"
    assert browser.save_screenshot(str(shot))
    artifacts = os.environ.get("TRITONSD_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    print(f"screenshot: {shot}")
