"""optuna-dashboard started by `lora-tune dashboard`, looked at in headless Chromium."""
from __future__ import annotations

import optuna
import pytest
from selenium.webdriver.common.by import By

from tests.browser.conftest import full_page_screenshot, severe_messages
from tests.report.dashboard_server import get_json, running_dashboard
from tests.report.lora_study_factory import make_lora_study
from tests.waiting import wait_for

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = [pytest.mark.browser, pytest.mark.slow]


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
        wait_for(lambda: "dash-browser" in browser.find_element(By.TAG_NAME, "body").text, 30, "the study page", 0.3)
        browser.get(f"{base}/dashboard/studies/{study_id}")
        # the study page draws Optuna's charts and, beside them, the LoRA figures saved in the study
        titles_js = "return Array.from(document.querySelectorAll('.gtitle')).map(e => e.textContent)"
        lora_titles = {"Best metric by rank × alpha", "Metric by target preset", "Metric vs. trainable parameters",
                       "Metric vs. peak memory", "Parallel coordinates", "Trials per worker"}
        titles = wait_for(lambda: (lambda t: t if lora_titles <= set(t) else None)(
            browser.execute_script(titles_js)), 30, "the LoRA figures on the study page", 0.3)
        assert any(t.startswith("Learning curves") for t in titles)
        assert "dash-browser" in browser.find_element(By.TAG_NAME, "body").text
        full_page_screenshot(browser, tmp_path / "dashboard-study.png")
        errors = [m for m in severe_messages(browser) if "favicon" not in m]
        assert errors == []
    assert (tmp_path / "dashboard-study.png").stat().st_size > 20_000
