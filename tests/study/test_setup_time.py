"""``setup_seconds`` (a trial's start to its first optimizer step) and ``base_load``: recorded by
every trial that trains, and shown by `lora-tune run`, `study show`, and the HTML report's summary
and cost panel (mean setup and training seconds per trial)."""
from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from lora_tune.cli.main import cli
from lora_tune.report.data import cost_data, summary_data
from lora_tune.report.draw import draw_cost, draw_summary
from lora_tune.study.schema.spec import resolve_objective
from lora_tune.study.trial import record
from lora_tune.study.trial.objective import Objective
from tests.study.conftest import BASE, make_spec
from tests.study.toy_task import ToyTask

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"rank": 4, "alpha_ratio": 2.0, "targets": "attention-qv", "quant_bits": 0, "learning_rate": 1e-2}
BUILD, STEP = 0.3, 0.05  # seconds the slow task sleeps building its model, and in each loss call


class SlowTask(ToyTask):
    """The toy task with a base model that takes BUILD seconds and steps that take STEP each."""

    def build_model(self):
        time.sleep(BUILD)
        return super().build_model()

    def loss(self, model, batch):
        time.sleep(STEP)
        return super().loss(model, batch)


def _wall(trial: optuna.trial.FrozenTrial) -> float:
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def test_setup_runs_from_the_trial_start_to_the_first_optimizer_step():
    task = SlowTask()
    study = optuna.create_study(direction="maximize")
    for _ in range(2):
        study.enqueue_trial(PARAMS)
    study.optimize(Objective(resolve_objective(make_spec(), task), task), n_trials=2)
    for trial, load in zip(study.trials, ("built", "resident")):
        assert trial.state == TrialState.COMPLETE
        attrs = trial.user_attrs
        assert attrs[record.BASE_LOAD] == record.BaseLoad(load).value
        setup, steps = attrs[record.SETUP_SECONDS], attrs[record.TRAIN_STEPS]
        if load == "built":
            assert setup >= BUILD  # the base model's build is setup
        else:
            assert setup < BUILD  # the second trial leases the resident base: no build
        assert setup <= _wall(trial) - steps * STEP  # every step (3 of them) came after it
        assert attrs[record.TRAIN_SECONDS] >= steps * STEP


def test_a_trial_pruned_before_training_records_its_base_but_no_setup():
    toy_task = ToyTask()
    objective = Objective(resolve_objective(make_spec(constraints={"max_trainable_params": 10}), toy_task), toy_task)
    trial = optuna.trial.FixedTrial(PARAMS)
    with pytest.raises(optuna.TrialPruned):
        objective(trial)
    assert trial.user_attrs[record.BASE_LOAD] == "built" and record.SETUP_SECONDS not in trial.user_attrs


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_run_show_and_the_report_print_the_mean_setup_and_training_seconds(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_TUNE_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    path, url = tmp_path / "s.yaml", f"sqlite:///{tmp_path / 's.db'}"
    path.write_text(yaml.safe_dump(dict(BASE, study=dict(BASE["study"], name="setup", n_trials=3, baseline=True),
                                        search_space=dict(BASE["search_space"], quant_bits=None))))
    run = _invoke("run", str(path), "--storage", url)
    show = _invoke("study", "show", "setup", "--storage", url)

    study = optuna.load_study(study_name="setup", storage=url)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert 0 < t.user_attrs[record.SETUP_SECONDS] <= _wall(t)
    assert [t.user_attrs[record.BASE_LOAD] for t in trials] == ["built", "resident", "resident"]
    account = record.account(trials)
    line = account.time_line()
    assert account.timed == 3 and account.mean_setup_seconds == pytest.approx(
        sum(t.user_attrs[record.SETUP_SECONDS] for t in trials) / 3)
    assert line == (f"setup {account.mean_setup_seconds:.2f} s, training {account.mean_train_seconds:.2f} s "
                    "per trial (mean of 3 trials)")
    assert f"time: {line}" in run and f"time: {line}" in show  # the run summary and `study show`
    assert "setup s" in show and "train s" in show  # each trial's, in the trials table

    summary = summary_data(study)
    assert summary["time"] == {"trials": 3, "setup_mean": account.mean_setup_seconds,
                               "train_mean": account.mean_train_seconds, "line": line}
    assert line in draw_summary(summary, "Summary")
    cost = cost_data(study)
    assert cost["time"] == summary["time"]
    assert line in draw_cost(cost, "Metric vs. cost").layout.title.text
    by_setup = cost_data(study, x=record.SETUP_SECONDS)  # setup as the cost axis
    assert sorted(p["x"] for p in by_setup["points"]) == sorted(t.user_attrs[record.SETUP_SECONDS] for t in trials)
