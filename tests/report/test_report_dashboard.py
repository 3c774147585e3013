"""optuna-dashboard: LoRA figures saved into the study, and `lora-tune dashboard` serving them."""
from __future__ import annotations

import json
import urllib.request

import optuna
import pytest
from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

from tests.report.dashboard_server import get_json, running_dashboard
from tests.report.lora_study_factory import make_lora_study
from lora_tune.study.trial.artifacts import default_artifact_dir, open_artifact_store
from lora_tune.report.dashboard import figure_id, save_figures
from lora_tune.report.definitions import load_definition
from lora_tune.report.panels import PANELS

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_save_figures_stores_the_lora_panels_once():
    study = make_lora_study()
    ids = save_figures(study)
    definition = load_definition("single-objective")
    expected = [figure_id(i, s.panel, s.title) for i, s in enumerate(definition.panels)
                if PANELS[s.panel].lora_specific]
    assert ids == expected and len(ids) == 9
    assert "lora-tune:05-layers:metric-by-layer-range" in ids
    assert "lora-tune:06-cost:metric-vs-trainable-parameters" in ids
    figures = get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))
    assert sorted(figures) == sorted(ids)
    heatmap = json.loads(figures[ids[0]])
    assert heatmap["data"][0]["type"] == "heatmap" and heatmap["data"][0]["z"]
    n_attrs = len(study._storage.get_study_system_attrs(study._study_id))
    assert save_figures(study) == ids  # saving again overwrites, it does not add copies
    assert len(study._storage.get_study_system_attrs(study._study_id)) == n_attrs
    assert len(get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))) == len(ids)


@pytest.mark.slow
def test_dashboard_cli_serves_studies_trials_figures_and_artifacts(tmp_path):
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    study = make_lora_study(url, name="dash-study")
    running = study.ask()  # artifacts can only be attached to a running trial
    payload = tmp_path / "notes.txt"
    payload.write_text("adapter goes here")
    store = open_artifact_store(default_artifact_dir(url))
    artifact_id = optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(payload),
                                                   study_or_trial=running)
    study.tell(running, 1.5)
    best = study.best_trial
    assert best.number == running.number
    assert default_artifact_dir(url) == tmp_path / "lora_tune_artifacts"

    with running_dashboard(url) as base:
        assert get_json(base + "/api/meta")["artifact_is_available"] is True
        studies = get_json(base + "/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["dash-study"]
        detail = get_json(f"{base}/api/studies/{studies[0]['study_id']}")
        assert [t["number"] for t in detail["trials"]] == [t.number for t in study.trials]
        assert [t["number"] for t in detail["best_trials"]] == [best.number]
        ids = [g["id"] for g in detail["plotly_graph_objects"]]
        assert len(ids) == 9 and all(i.startswith("lora-tune:") for i in ids)
        served = [t for t in detail["trials"] if t["number"] == best.number][0]
        assert [a["artifact_id"] for a in served["artifacts"]] == [artifact_id]
        trial_id = served["trial_id"]
        with urllib.request.urlopen(f"{base}/artifacts/{studies[0]['study_id']}/{trial_id}/{artifact_id}") as r:
            assert r.read() == b"adapter goes here"


def test_dashboard_rejects_a_bad_port(tmp_path):
    from click.testing import CliRunner

    from lora_tune.cli.main import cli

    url = f"sqlite:///{tmp_path / 'x.db'}"
    optuna.create_study(study_name="empty", storage=url)
    result = CliRunner().invoke(cli, ["dashboard", "--storage", url,
                                      "--port", "70000", "--no-save-figures"])
    assert result.exit_code == 2 and "--port: got 70000" in result.stderr
