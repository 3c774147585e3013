"""optuna-dashboard started by `lora-tune dashboard`, looked at in headless Chromium."""
from __future__ import annotations

import time

import optuna
import pytest
from selenium.webdriver.common.by import By

from tests.browser.conftest import full_page_screenshot, severe_messages
from tests.report.dashboard_server import get_json, running_dashboard
from tests.report.lora_study_factory import make_lora_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _wait_for(browser, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out waiting for the dashboard page")


def test_dashboard_study_page_in_chromium(browser, tmp_path):
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    study = make_lora_study(url, name="dash-browser")
    with running_dashboard(url) as base:
        studies = get_json(base + "/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["dash-browser"]
        study_id = studies[0]["study_id"]
        detail = get_json(f"{base}/api/studies/{study_id}")
        assert len(detail["trials"]) == len(study.trials)

        browser.get(f"{base}/dashboard")
        _wait_for(browser, lambda: "dash-browser" in browser.find_element(By.TAG_NAME, "body").text)
        browser.get(f"{base}/dashboard/studies/{study_id}")
        # the study page draws Optuna's charts and, beside them, the LoRA figures saved in the study
        titles_js = "return Array.from(document.querySelectorAll('.gtitle')).map(e => e.textContent)"
        lora_titles = {"Best metric by rank × alpha", "Metric by target preset", "Metric vs. trainable parameters",
                       "Metric vs. peak memory", "Parallel coordinates", "Trials per worker"}
        titles = _wait_for(browser, lambda: (lambda t: t if lora_titles <= set(t) else None)(
            browser.execute_script(titles_js)))
        assert any(t.startswith("Learning curves") for t in titles)
        assert "dash-browser" in browser.find_element(By.TAG_NAME, "body").text
        full_page_screenshot(browser, tmp_path / "dashboard-study.png")
        errors = [m for m in severe_messages(browser) if "favicon" not in m]
        assert errors == []
    assert (tmp_path / "dashboard-study.png").stat().st_size > 20_000
