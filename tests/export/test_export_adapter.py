"""Adapters of best-so-far trials as Optuna artifacts, exported and rebuilt (lora-tune + PEFT)."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner

import lora_tune
from lora_tune.cli.main import cli
from lora_tune.export import load_config
from lora_tune.study.trial.artifacts import is_best_so_far, trials_with_adapters
from tests.export.tiny_lora_study import build_base, data, evaluate, run_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    url = f"sqlite:///{folder / 'tiny.db'}"
    return run_study(url), url, folder


def test_is_best_so_far():
    study = optuna.create_study(direction="maximize")
    assert is_best_so_far(study, 0.1)  # nothing complete yet
    study.add_trial(optuna.trial.create_trial(value=0.5))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    assert is_best_so_far(study, 0.6) and not is_best_so_far(study, 0.5) and not is_best_so_far(study, 0.4)
    assert is_best_so_far(study, 0.4, exclude_number=0)
    low = optuna.create_study(direction="minimize")
    low.add_trial(optuna.trial.create_trial(value=0.5))
    assert is_best_so_far(low, 0.4) and not is_best_so_far(low, 0.6)
    multi = optuna.create_study(directions=["maximize", "minimize"])
    multi.add_trial(optuna.trial.create_trial(values=[0.8, 100]))
    assert is_best_so_far(multi, [0.7, 50])  # a trade-off: not dominated
    assert not is_best_so_far(multi, [0.7, 150])  # dominated
    with pytest.raises(ValueError, match="2 objective value"):
        is_best_so_far(multi, 0.5)


@pytest.mark.slow
def test_only_best_so_far_trials_save_adapters(tiny):
    study, url, folder = tiny
    values = [t.value for t in study.trials]
    expected = [i for i, v in enumerate(values) if all(v < w for w in values[:i])]
    assert 1 < len(expected) < len(values)  # some trials saved, some did not
    assert trials_with_adapters(study) == expected
    assert study.user_attrs["artifact_dir"] == str(folder / "lora_tune_artifacts")
    assert len(list((folder / "lora_tune_artifacts").iterdir())) == len(expected)


@pytest.mark.slow
def test_export_round_trip_rebuilds_the_trial(tiny, tmp_path):
    study, url, _ = tiny
    best = study.best_trial
    out, adapter = tmp_path / "best.yaml", tmp_path / "adapter"
    result = CliRunner().invoke(cli, ["export", "tiny", "--storage", url, "-o", str(out), "--adapter", str(adapter)])
    assert result.exit_code == 0, result.stderr
    content = yaml.safe_load(out.read_text())
    assert content["trial"]["number"] == best.number
    assert content["adapter"]["formats"] == ["lora-tune", "peft"]
    assert json.loads((adapter / "manifest.json").read_text())["skipped"] == {}

    # lora-tune: config from best.yaml + weights from the adapter -> the trial's metric
    model = build_base()
    report = lora_tune.inject(model, load_config(out))
    assert report.trainable_after == best.user_attrs["trainable_params"]
    assert [n for n, _ in report.targets] == best.user_attrs["target_modules"]
    lora_tune.load_adapter(model, adapter / "lora-tune")
    assert evaluate(model) == pytest.approx(best.value, rel=1e-6, abs=1e-7)
    assert evaluate(model) < evaluate(build_base())  # the adapter really changed the model

    # PEFT: the PEFT directory loaded by peft itself gives the same outputs
    peft = pytest.importorskip("peft")
    peft_model = peft.PeftModel.from_pretrained(build_base(), str(adapter / "peft"))
    x, _ = data()
    model.eval()
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_adapter_export_refusals(tiny, tmp_path):
    study, url, _ = tiny
    runner = CliRunner()
    without = next(t.number for t in study.trials if t.number not in trials_with_adapters(study))
    result = runner.invoke(cli, ["export", "tiny", "--storage", url, "--trial", str(without),
                                 "-o", str(tmp_path / "b.yaml"), "--adapter", str(tmp_path / "a")])
    assert result.exit_code == 2
    listed = ", ".join(f"#{n}" for n in trials_with_adapters(study))
    assert f"a trial with a saved adapter: {listed}" in result.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = runner.invoke(cli, ["export", "tiny", "--storage", url, "-o", str(tmp_path / "c.yaml"),
                                 "--adapter", str(busy)])
    assert result.exit_code == 2 and f"--adapter: got '{busy}'" in result.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "b.yaml").exists() and not (tmp_path / "c.yaml").exists()


@pytest.mark.slow
def test_artifact_store_follows_the_environment(tiny, tmp_path, monkeypatch):
    study, url, folder = tiny
    monkeypatch.setenv("LORA_TUNE_ARTIFACTS", str(tmp_path / "elsewhere"))
    result = CliRunner().invoke(cli, ["export", "tiny", "--storage", url, "-o", str(tmp_path / "b.yaml"),
                                      "--adapter", str(tmp_path / "a")])
    assert result.exit_code == 2 and "the artifact directory of this study" in result.stderr
    result = CliRunner().invoke(cli, ["export", "tiny", "--storage", url, "-o", str(tmp_path / "b.yaml"),
                                      "--adapter", str(tmp_path / "a"),
                                      "--artifact-dir", str(folder / "lora_tune_artifacts")])
    assert result.exit_code == 0, result.stderr
    assert Path(tmp_path / "a" / "peft" / "adapter_config.json").is_file()
