"""The HTML report and the report definitions it is built from."""
from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest

from tests.report.lora_study_factory import make_lora_study
from lora_tune.errors import ConfigError
from lora_tune.report import build_report, definitions, load_definition, write_report
from lora_tune.report.panels import PANELS

optuna.logging.set_verbosity(optuna.logging.WARNING)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synthetic():
    return make_lora_study()


@pytest.fixture(scope="module")
def report_html(synthetic):
    return build_report(synthetic)


def test_report_is_self_contained(report_html):
    srcs = re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']?([^\"' >]+)", report_html)
    assert srcs == []  # nothing loaded from a CDN or anywhere else
    assert "https://cdn" not in "".join(re.findall(r"<script[^>]*>", report_html))
    import plotly

    assert f"plotly.js v{plotly.offline.get_plotlyjs_version()}" in report_html[:20000] or \
        plotly.offline.get_plotlyjs()[:200] in report_html
    assert report_html.count("Plotly.newPlot") >= 9


def test_report_sections_follow_the_definition(report_html, synthetic):
    definition = load_definition("single-objective")
    panels = re.findall(r'<section class="panel[^"]*" id="panel-(\d+)-(\w+)"', report_html)
    assert [(int(i), p) for i, p in panels] == [(i, s.panel) for i, s in enumerate(definition.panels)]
    best = max((t for t in synthetic.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert f"<td>#{best.number}</td>" in report_html
    assert 'class="dataframe trials sortable"' in report_html and "table.sortable" in report_html
    assert 'id="no-complete"' not in report_html


def test_package_definitions_are_the_repo_files():
    """lora_tune/dashboards/ (package data for installed copies) links to dashboards/."""
    repo = REPO / "dashboards"
    package = REPO / "lora_tune" / "dashboards"
    names = sorted(p.name for p in repo.glob("*.yaml"))
    assert names == ["multi-objective.yaml", "single-objective.yaml"]
    assert sorted(p.name for p in package.glob("*.yaml")) == names
    for name in names:
        assert (package / name).resolve() == (repo / name).resolve()


@pytest.mark.parametrize("kind", definitions.KINDS)
def test_shipped_definitions_load(kind):
    d = load_definition(kind)
    assert d.kind == kind and d.panels[0].panel == "summary" and d.panels[-1].panel == "table"
    assert Path(d.source).resolve() == (REPO / "dashboards" / f"{kind}.yaml").resolve()


def test_the_report_reads_the_definition_folder(tmp_path, monkeypatch, synthetic):
    (tmp_path / "single-objective.yaml").write_text(
        "kind: single-objective\ntitle: Only two\npanels:\n  - timeline\n  - {panel: cost, x: adapter_bytes}\n")
    monkeypatch.setenv("LORA_TUNE_DASHBOARDS", str(tmp_path))
    html = build_report(synthetic)
    assert re.findall(r'id="panel-\d+-(\w+)"', html) == ["timeline", "cost"]
    assert "<h1>Only two</h1>" in html and "adapter size (MiB)" in html


def test_package_data_is_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(definitions, "_PACKAGE_ROOT", REPO / "lora_tune")
    monkeypatch.setattr(definitions, "search_dirs", lambda: [tmp_path / "missing", REPO / "lora_tune" / "dashboards"])
    assert Path(definitions.find_definition("multi-objective")).parent == REPO / "lora_tune" / "dashboards"


@pytest.mark.parametrize("raw, field", [
    ({"kind": "single-objective", "panels": ["summary", "pie"]}, "panels[1].panel"),
    ({"kind": "single-objective", "panels": [{"panel": "cost", "colour": "red"}]}, "panels[0].colour"),
    ({"kind": "both", "panels": ["summary"]}, "kind"),
    ({"kind": "single-objective", "panels": []}, "panels"),
    ({"kind": "single-objective", "panels": ["summary"], "theme": "dark"}, "theme"),
])
def test_bad_definitions_name_the_field(raw, field):
    with pytest.raises(ConfigError) as err:
        definitions.parse_definition(raw, "x.yaml")
    assert f"x.yaml: {field}: got" in str(err.value)


def test_panel_options_come_from_data_functions():
    assert PANELS["cost"].options == ["x", "objective"]
    assert PANELS["timeline"].options == []


def test_report_without_complete_trials_renders_what_exists(tmp_path):
    study = optuna.create_study(study_name="empty-ish")
    study.ask()
    trial = study.ask()
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    path = write_report(study, tmp_path / "r.html")
    html = path.read_text()
    assert 'id="no-complete"' in html and "no complete trial yet (2 trial(s) in total)" in html
    assert "no complete trials yet" in html  # the empty panels say so


def test_unwritable_output_is_a_config_error_and_writes_nothing(tmp_path, synthetic):
    with pytest.raises(ConfigError, match="output: got '.*nope/r.html'"):
        write_report(synthetic, tmp_path / "nope" / "r.html")
    with pytest.raises(ConfigError, match="a file path"):
        write_report(synthetic, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="a-file/r.html"):  # fails even for root
        write_report(synthetic, blocker / "r.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no temp file left behind
