"""`lora-tune report` and `lora-tune study export-trials` on a real SQLite storage."""
from __future__ import annotations

import optuna
import pandas as pd
import pytest
from click.testing import CliRunner

from tests.report.lora_study_factory import make_lora_study
from lora_tune.cli.main import cli

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'studies.db'}"
    make_lora_study(url, name="digits-a")  # trials carry system attrs (nsga2:generation, ...)
    optuna.create_study(study_name="digits-b", storage=url)
    return url


def run(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_report_writes_html(storage, tmp_path):
    out = tmp_path / "report.html"
    code, stdout, stderr = run("report", "digits-a", "--storage", storage, "-o", str(out))
    assert code == 0, stderr
    html = out.read_text()
    assert "wrote" in stdout and "digits-a" in html and html.count('<section class="panel') == 13


def test_unknown_study_exits_2_and_lists_the_studies(storage, tmp_path):
    code, stdout, stderr = run("report", "digits-c", "--storage", storage, "-o", str(tmp_path / "r.html"))
    assert code == 2
    assert "study 'digits-c' not found" in stderr and "digits-a, digits-b" in stderr
    assert not (tmp_path / "r.html").exists()
    code, _, stderr = run("export", "nope", "--storage", storage, "-o", str(tmp_path / "b.yaml"))
    assert code == 2 and "digits-a, digits-b" in stderr
    code, _, stderr = run("study", "export-trials", "nope", "--storage", storage, "-o", str(tmp_path / "t.csv"))
    assert code == 2 and "digits-a, digits-b" in stderr


def test_storage_from_environment(storage, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TUNE_STORAGE", storage)
    code, _, stderr = run("report", "digits-a", "-o", str(tmp_path / "r.html"))
    assert code == 0, stderr


def test_study_without_complete_trial_still_reports(storage, tmp_path):
    code, stdout, stderr = run("report", "digits-b", "--storage", storage, "-o", str(tmp_path / "r.html"))
    assert code == 0
    assert "no complete trial yet (0 trial(s))" in stderr
    assert 'id="no-complete"' in (tmp_path / "r.html").read_text()
    code, _, stderr = run("export", "digits-b", "--storage", storage, "-o", str(tmp_path / "b.yaml"))
    assert code == 2 and "at least one complete trial" in stderr
    assert not (tmp_path / "b.yaml").exists()


def test_unwritable_output_exits_2_naming_it(storage, tmp_path):
    bad = tmp_path / "missing-dir" / "r.html"
    for args in (("report", "digits-a"), ("export", "digits-a"), ("study", "export-trials", "digits-a")):
        out = bad.with_suffix(".csv") if args[0] == "study" else bad
        code, _, stderr = run(*args, "--storage", storage, "-o", str(out))
        assert code == 2, args
        assert str(out) in stderr
    assert not bad.parent.exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_trials_table(storage, tmp_path, suffix):
    out = tmp_path / f"trials{suffix}"
    code, stdout, stderr = run("study", "export-trials", "digits-a", "--storage", storage, "-o", str(out))
    assert code == 0, stderr
    df = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    study = optuna.load_study(study_name="digits-a", storage=storage)
    assert len(df) == len(study.trials) == 24
    assert list(df["number"]) == [t.number for t in study.trials]
    assert list(df["state"]) == [t.state.name for t in study.trials]
    assert df.loc[df["number"] == 10, "param_rank"].item() == study.trials[10].params["rank"]
    assert {"trainable_params", "worker", "train_steps", "planned_steps", "accuracy"} <= set(df.columns)
    text = df.to_csv()
    assert "nsga2" not in text and "token-" not in text and "claim" not in text
    assert study.trials[3].system_attrs["nsga2:generation"] == 0  # they were there to leave out


def test_export_trials_rejects_other_formats(storage, tmp_path):
    code, _, stderr = run("study", "export-trials", "digits-a", "--storage", storage, "-o", str(tmp_path / "t.xlsx"))
    assert code == 2 and ".csv or .parquet" in stderr


@pytest.mark.slow
def test_report_can_save_the_lora_figures_into_the_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'fig.db'}"
    make_lora_study(url, name="figs")
    code, _, stderr = run("report", "figs", "--storage", url, "-o", str(tmp_path / "r.html"), "--save-to-study")
    assert code == 0, stderr
    study = optuna.load_study(study_name="figs", storage=url)
    keys = study._storage.get_study_system_attrs(study._study_id)
    saved = {k.split(":")[3] for k in keys if k.startswith("dashboard:plot_data:lora-tune:")}
    assert saved == {"03-rank_alpha", "04-presets", "05-layers", "06-cost", "07-cost", "08-cost", "09-curves",
                     "10-parallel", "11-timeline"}


@pytest.mark.parametrize("storage", ["sqlite:///{d}/typo.db", "journal:{d}/typo.log"])
def test_missing_storage_file_is_bad_input_and_not_created(tmp_path, storage):
    url = storage.format(d=tmp_path)
    for args in (("report", "s", "-o", str(tmp_path / "r.html")), ("dashboard",)):
        code, _, stderr = run(*args, "--storage", url)
        assert code == 2 and "--storage" in stderr and "typo" in stderr and "does not exist" in stderr
    assert list(tmp_path.iterdir()) == []
