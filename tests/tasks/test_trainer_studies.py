"""The shipped trainer study: it validates, and runs through the CLI with TRL's SFTTrainer in
trial processes (``train.isolation: process``)."""
from __future__ import annotations

from pathlib import Path

import optuna
import yaml
from click.testing import CliRunner

from lora_tune.cli.main import cli
from lora_tune.study.run.runner import prepare_spec
from lora_tune.study.schema.spec import load_spec_file

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "studies" / "trainer-sft-tiny.yaml"


def test_trainer_study_validates_against_its_task(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec, task, baseline = prepare_spec(load_spec_file(STUDY))
    assert task.name == "trainer" and spec.metrics == ["eval_loss"] and task.injector == "lora-tune"
    assert baseline["targets"] == "attention-qv"


def test_trainer_study_runs_in_trial_processes(tmp_path, monkeypatch):
    data = yaml.safe_load(STUDY.read_text())
    storage = f"sqlite:///{tmp_path / 'trainer.db'}"
    data["study"].update(n_trials=2, storage=storage)
    data["train"].update(isolation="process", max_steps=6)
    task = data["task"]
    task["factory"] = str(STUDY.parent / task["factory"])  # task paths: relative to the study file's folder
    task["tokenizer"] = str(STUDY.parent / task["tokenizer"])
    task["args"].update(train_file=str(ROOT / task["args"]["train_file"]),
                        eval_file=str(ROOT / task["args"]["eval_file"]), eval_steps=3)
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.delenv("LORA_TUNE_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name=data["study"]["name"], storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2, \
        [t.user_attrs.get("fail_reason") for t in trials]
    assert all(t.user_attrs["isolation"] == "process" and t.user_attrs["train_steps"] == 6 for t in trials)
    assert all(list(t.intermediate_values) == [0, 1] for t in trials)
