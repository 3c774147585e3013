"""The HTML report as a person sees it: headless Chromium, no JS errors, every panel drawn."""
from __future__ import annotations

import optuna
import pytest
from selenium.webdriver.common.by import By

from tests.browser.conftest import full_page_screenshot, severe_messages
from tests.report.lora_study_factory import make_lora_study
from lora_tune.report import load_definition, write_report

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = [pytest.mark.browser, pytest.mark.slow]

# For every panel section: its name, and for plots the number of traces in the figure data,
# the number of traces actually rendered (SVG trace groups, heatmap images, parcoords), height.
PANEL_STATE_JS = """
return Array.from(document.querySelectorAll('section.panel')).map(function (s) {
  var p = s.querySelector('.js-plotly-plot');
  if (!p) {
    var body = s.querySelector('.panel-body');
    return {panel: s.dataset.panel, html: true, text: body ? body.innerText.length : 0,
            rows: s.querySelectorAll('tbody tr, table.summary tr').length};
  }
  var rendered = p.querySelectorAll('g.trace, .heatmaplayer .hm, .parcoords').length;
  var notes = Array.from(p.querySelectorAll('.annotation-text')).map(function (a) { return a.textContent; });
  return {panel: s.dataset.panel, html: false, traces: p.data.length, rendered: rendered,
          height: p.getBoundingClientRect().height, notes: notes};
});
"""


def _open(browser, path):
    browser.get(path.as_uri())
    browser.find_element(By.CSS_SELECTOR, "section.panel")
    return browser.execute_script(PANEL_STATE_JS)


@pytest.mark.parametrize("multi", [False, True], ids=["single-objective", "multi-objective"])
def test_report_renders_every_panel_without_js_errors(browser, tmp_path, multi):
    study = make_lora_study(multi=multi)
    path = write_report(study, tmp_path / "report.html")
    panels = _open(browser, path)
    definition = load_definition("multi-objective" if multi else "single-objective")
    assert [p["panel"] for p in panels] == [s.panel for s in definition.panels]
    for p in panels:
        if p["html"]:
            assert p["rows"] >= 8, p
        else:
            assert p["traces"] >= 1 and p["rendered"] >= 1 and p["height"] > 200, p
            assert p["notes"] == [], p
    table = [p for p in panels if p["panel"] == "table"][0]
    assert table["rows"] == len(study.trials)
    assert severe_messages(browser) == []
    shot = tmp_path / "report.png"
    full_page_screenshot(browser, shot)
    assert shot.stat().st_size > 50_000


def test_trials_table_sorts_on_click(browser, tmp_path):
    study = make_lora_study()
    path = write_report(study, tmp_path / "report.html")
    _open(browser, path)
    headers = browser.find_elements(By.CSS_SELECTOR, "table.trials thead th")
    names = [h.text for h in headers]
    rank_col = names.index("param_rank")
    number_col = names.index("number")

    def column(i):
        return [r.find_elements(By.TAG_NAME, "td")[i].text
                for r in browser.find_elements(By.CSS_SELECTOR, "table.trials tbody tr")]

    headers[number_col].click()
    assert [int(v) for v in column(number_col)] == sorted(t.number for t in study.trials)
    headers[number_col].click()
    assert [int(v) for v in column(number_col)] == sorted((t.number for t in study.trials), reverse=True)
    headers[rank_col].click()  # numeric, not text order: 2 < 4 < 16
    ranks = [int(v) for v in column(rank_col)]
    assert ranks == sorted(ranks) and ranks[0] == 2 and ranks[-1] == 32
    assert severe_messages(browser) == []


def test_report_of_a_study_without_complete_trials(browser, tmp_path):
    study = optuna.create_study(study_name="nothing-yet")
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    path = write_report(study, tmp_path / "report.html")
    panels = _open(browser, path)
    assert browser.find_element(By.ID, "no-complete").is_displayed()
    plots = [p for p in panels if not p["html"]]
    assert plots and all(p["notes"] and p["height"] > 200 for p in plots if p["panel"] != "timeline")
    assert severe_messages(browser) == []
    full_page_screenshot(browser, tmp_path / "empty.png")
