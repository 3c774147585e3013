"""End to end with the real study driver: `lora-tune run`, then report, export and rebuild."""
from __future__ import annotations

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner

import lora_tune
from lora_tune.cli.main import cli
from lora_tune.export import load_config
from lora_tune.study.trial.artifacts import trials_with_adapters

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.slow

STUDY = """\
study:
  name: toy-export
  storage: {storage}
  direction: maximize
  metric: accuracy
  sampler: {{type: random, seed: 0}}
  pruner: {{type: none}}
  n_trials: 4
  baseline: true
task:
  type: python
  factory: tests.study.toy_task:make_task
search_space:
  rank: {{choices: [2, 8]}}
  alpha: {{ratio: [1, 2]}}
  targets: {{choices: [attention-qv, all-linear]}}
  learning_rate: {{type: float, low: 1.0e-2, high: 5.0e-2, log: true}}
train: {{epochs: 1, batch_size: 64, evals_per_epoch: 1, device: cpu}}
"""


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("driver")
    url = f"sqlite:///{folder / 'toy.db'}"
    path = folder / "toy.yaml"
    path.write_text(STUDY.format(storage=url))
    torch.set_num_threads(1)
    result = CliRunner().invoke(cli, ["run", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    return optuna.load_study(study_name="toy-export", storage=url), url, folder


def test_report_of_a_driver_study(toy_run, tmp_path):
    study, url, _ = toy_run
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", "toy-export", "--storage", url, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    html = out.read_text()
    assert "toy-export" in html and "gain over baseline" in html


def test_best_yaml_rebuilds_the_trials_adapted_model(toy_run, tmp_path):
    from tests.study.toy_task import ToyTask

    study, url, _ = toy_run
    best = study.best_trial
    out = tmp_path / "best.yaml"
    result = CliRunner().invoke(cli, ["export", "toy-export", "--storage", url, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    content = yaml.safe_load(out.read_text())
    assert content["train"]["learning_rate"] == best.params["learning_rate"]
    assert content["task"]["factory"] == "tests.study.toy_task:make_task"
    model = ToyTask().build_model()
    report = lora_tune.inject(model, load_config(out))
    assert [n for n, _ in report.targets] == best.user_attrs["target_modules"]
    assert report.trainable_after == best.user_attrs["trainable_params"]


def test_adapter_round_trip_reproduces_the_metric(toy_run, tmp_path):
    from tests.study.toy_task import ToyTask

    study, url, _ = toy_run
    best = study.best_trial
    assert best.number in trials_with_adapters(study), "the driver saves the adapter of best-so-far trials"
    out, adapter = tmp_path / "best.yaml", tmp_path / "adapter"
    result = CliRunner().invoke(cli, ["export", "toy-export", "--storage", url, "-o", str(out),
                                      "--adapter", str(adapter)])
    assert result.exit_code == 0, result.stderr
    task = ToyTask()
    model = task.build_model()
    lora_tune.inject(model, load_config(out))
    lora_tune.load_adapter(model, adapter / "lora-tune")
    assert task.evaluate(model, 64)["accuracy"] == pytest.approx(best.value, abs=1e-9)
    peft = pytest.importorskip("peft")
    peft_model = peft.PeftModel.from_pretrained(task.build_model(), str(adapter / "peft"))
    assert task.evaluate(peft_model, 64)["accuracy"] == pytest.approx(best.value, abs=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(task.x_test), model(task.x_test), rtol=1e-5, atol=1e-6)
