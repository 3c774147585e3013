"""Real headless Chromium (Debian `chromium` + `chromium-driver`) for tests marked `browser`."""
from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("LORA_TUNE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LORA_TUNE_CHROMEDRIVER", "/usr/bin/chromedriver")


def _missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)) and not shutil.which(path):
            return f"{path} not found: install the Debian package {package!r} to run browser tests"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install 'lora-tune[dev]'"
    return None


@pytest.fixture(scope="module")
def chrome(tmp_path_factory):
    """A headless Chromium WebDriver collecting the browser console log (one per test module)."""
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


def severe_messages(driver) -> list[str]:
    """Console entries at level SEVERE (uncaught JavaScript errors, failed scripts)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def full_page_screenshot(driver, path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(int(height) + 120, 9000))
    driver.save_screenshot(str(path))


@pytest.fixture
def browser(chrome):
    """The module's Chromium with a clean console log and window size for this test."""
    chrome.get_log("browser")  # drop entries of earlier tests
    chrome.set_window_size(1400, 1000)
    return chrome
