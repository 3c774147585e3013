"""Trials in a child process (``train.isolation: process``): results, pruning, deaths, OOM, memory."""
from __future__ import annotations

import os

import optuna
import pytest
from optuna.trial import TrialState

from lora_tune.study.trial.objective import Objective, TrialFailed
from lora_tune.study.trial.trial_process import close_trial_processes
from lora_tune.study.schema.spec import resolve_objective
from tests.study.conftest import make_spec
from tests.study.toy_task import ToyTask

PARAMS = {"rank": 4, "alpha_ratio": 2.0, "targets": "attention-qv", "quant_bits": 0, "learning_rate": 1e-2}
TOY = "tests.study.toy_task:make_task"


def _spec(args: dict | None = None, **sections):
    task = {"type": "python", "factory": TOY, "args": args or {}}
    train = {"isolation": "process", **sections.pop("train", {})}
    return resolve_objective(make_spec(task=task, train=train, **sections), ToyTask())


def _study(spec, n_trials: int, **params) -> optuna.Study:
    pruner = params.pop("pruner", optuna.pruners.NopPruner())
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(n_trials):
        study.enqueue_trial({**PARAMS, **params})
    study.optimize(Objective(spec), n_trials=n_trials, catch=(TrialFailed,))
    return study


def test_a_child_trial_records_the_same_result_as_an_in_process_trial():
    child = _study(_spec(), 1).trials[0]
    here = _study(_spec(train={"isolation": "none"}), 1).trials[0]
    assert child.state == here.state == TrialState.COMPLETE
    assert child.user_attrs["isolation"] == "process" and here.user_attrs["isolation"] == "none"
    assert child.value == pytest.approx(here.value, abs=1e-6)
    assert child.user_attrs["metric_values"] == pytest.approx(here.user_attrs["metric_values"], abs=1e-6)
    for key in ("target_modules", "trainable_params", "train_steps", "planned_steps", "lora_config"):
        assert child.user_attrs[key] == here.user_attrs[key], key


def test_a_child_trial_records_its_setup_on_the_drivers_clock():
    """setup_seconds: the trial's start to the child's first optimizer step, which comes after the
    child started, built its task and model and reported them (the driver's ``build`` time)."""
    close_trial_processes()  # a fresh trial process: this trial builds the task and its base
    times = {}
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(PARAMS)
    study.optimize(Objective(_spec(), on_times=lambda number, t: times.setdefault(number, t)), n_trials=1)
    trial = study.trials[0]
    setup = trial.user_attrs["setup_seconds"]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["base_load"] == "built"
    assert 0 < times[0].build <= setup == times[0].setup
    assert setup <= (trial.datetime_complete - trial.datetime_start).total_seconds()


def test_a_sigkilled_child_fails_its_trial_with_the_reason_and_the_next_trial_runs():
    spec = _spec({"die_at_loss_call": 2})
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(PARAMS)
    study.optimize(Objective(spec), n_trials=1, catch=(TrialFailed,))
    died = study.trials[0]
    assert died.state == TrialState.FAIL
    assert "killed by SIGKILL" in died.user_attrs["fail_reason"]
    healthy = Objective(_spec())  # the same study goes on with a task that does not die
    study.enqueue_trial(PARAMS)
    study.optimize(healthy, n_trials=1, catch=(TrialFailed,))
    assert study.trials[1].state == TrialState.COMPLETE


def test_out_of_memory_in_a_child_fails_with_the_batch_size():
    trial = _study(_spec({"oom_above_batch": 16}), 1).trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"].startswith("out of memory at batch size 64, peak ")
    assert "GiB" in trial.user_attrs["fail_reason"]


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_halve_batch_retries_once_with_the_same_effective_batch(isolation):
    spec = _spec({"oom_above_batch": 32}, train={"isolation": isolation, "oom": "halve_batch"})
    trial = _study(spec, 1).trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert "retried with batch size 32 x 2 accumulation steps" in trial.user_attrs["oom_retry"]
    assert trial.user_attrs["planned_steps"] == 3  # 192 examples, effective batch 64, 1 epoch


def test_halve_batch_gives_up_after_one_retry():
    spec = _spec({"oom_above_batch": 8}, train={"oom": "halve_batch"})
    trial = _study(spec, 1).trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"].startswith("out of memory at batch size 32")


def test_the_pruning_decision_reaches_the_child_and_stops_it_early():
    class PruneAfterFirstReport(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return len(trial.intermediate_values) >= 1

    spec = _spec(train={"evals_per_epoch": 3, "batch_size": 16})
    trial = _study(spec, 1, pruner=PruneAfterFirstReport()).trials[0]
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["train_steps"] < trial.user_attrs["planned_steps"] == 12
    assert list(trial.intermediate_values) == [0]


def test_an_error_in_the_child_fails_the_trial_with_its_message_and_traceback():
    trial = _study(_spec({"fail_in": "evaluate"}), 1).trials[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "ValueError: toy task: evaluate exploded"
    assert "toy_task.py" in trial.user_attrs["traceback"]


def test_auto_isolation_is_in_process_on_cpu():
    spec = _spec(train={"isolation": "auto"})
    assert Objective(spec).isolation() == "none"


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_twenty_consecutive_trials_do_not_grow_the_driver_memory(isolation):
    spec = _spec(train={"isolation": isolation})
    study = optuna.create_study(direction="maximize")
    objective = Objective(spec)
    for _ in range(22):
        study.enqueue_trial(PARAMS)
    study.optimize(objective, n_trials=2)  # warm-up: imports, pipes, storage caches
    before = _rss()
    study.optimize(objective, n_trials=20)
    grown = _rss() - before
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert grown < 8 * 2**20, f"driver RSS grew by {grown / 2**20:.1f} MiB over 20 trials"
