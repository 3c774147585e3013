"""The objective, unit-tested with optuna.trial.FixedTrial and small real studies."""
from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from lora_tune.study.trial.objective import Objective, TrialFailed
from lora_tune.study.schema.spec import resolve_objective
from tests.study.conftest import make_spec
from tests.study.toy_task import ToyTask

PARAMS = {"rank": 4, "alpha_ratio": 2.0, "targets": "attention-qv", "quant_bits": 0, "learning_rate": 1e-2}
DOCUMENTED_ATTRS = {"lora_config", "target_preset", "target_modules", "trainable_params", "adapter_bytes",
                    "peak_memory_bytes", "train_seconds", "throughput", "train_steps", "planned_steps",
                    "worker", "is_baseline", "metric_values", "setup_seconds", "base_load"}


def _objective(task, **sections) -> Objective:
    return Objective(resolve_objective(make_spec(**sections), task), task)


def _one_trial(task, pruner) -> optuna.trial.FrozenTrial:
    """One trial of PARAMS, 2 epochs x 3 evaluations, under ``pruner``."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    study.enqueue_trial(PARAMS)
    study.optimize(_objective(task, train={"epochs": 2, "evals_per_epoch": 3}), n_trials=1)
    return study.trials[0]


def test_fixed_trial_trains_and_records_the_documented_attributes(toy_task):
    trial = FixedTrial(PARAMS)
    value = _objective(toy_task)(trial)
    attrs = trial.user_attrs
    assert set(attrs) >= DOCUMENTED_ATTRS
    assert 0.0 <= value <= 1.0 and value == attrs["metric_values"]["accuracy"]
    assert attrs["lora_config"]["rank"] == 4 and attrs["lora_config"]["alpha"] == 8.0
    assert attrs["lora_config"]["modules_to_save"] == ["head"]
    assert attrs["target_preset"] == "attention-qv"
    assert attrs["target_modules"] == ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj", "blocks.1.v_proj"]
    # 4 adapted 16x16 layers at rank 4 (2*16*4 each) + the fully trained head (16*3 + 3)
    assert attrs["trainable_params"] == 4 * 2 * 16 * 4 + 16 * 3 + 3
    assert attrs["adapter_bytes"] == 4 * 2 * 16 * 4 * 4
    assert attrs["train_steps"] == attrs["planned_steps"] == 3  # 192 examples / batch 64, 1 epoch
    assert attrs["is_baseline"] is False and attrs["throughput"] > 0


def test_explicit_target_list_and_quantization(toy_task):
    trial = FixedTrial({**PARAMS, "targets": "fc1|fc2", "quant_bits": 8})
    _objective(toy_task)(trial)
    assert trial.user_attrs["target_preset"] is None
    assert trial.user_attrs["lora_config"]["targets"] == ["fc1", "fc2"]
    assert trial.user_attrs["lora_config"]["quant_bits"] == 8
    assert trial.user_attrs["target_modules"] == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]


def test_search_space_training_keys_reach_the_train_loop(toy_task):
    space = dict(make_spec().search_space, batch_size={"choices": [32, 96]}, epochs=2)
    trial = FixedTrial({**PARAMS, "batch_size": 32})
    _objective(toy_task, search_space=space)(trial)
    assert trial.user_attrs["planned_steps"] == 2 * 6  # 192 / 32 per epoch, 2 epochs


def test_nan_loss_fails_the_trial_with_its_reason():
    task = ToyTask(nan_after=1)
    trial = FixedTrial(PARAMS)
    with pytest.raises(TrialFailed, match="non-finite loss"):
        _objective(task, train={"diverged_after": None})(trial)
    assert trial.user_attrs["fail_reason"].startswith("non-finite loss: non-finite loss nan at step 2")
    assert "traceback" not in trial.user_attrs


def test_nan_loss_prunes_the_trial_as_diverged_by_default():
    trial = FixedTrial(PARAMS)
    with pytest.raises(optuna.TrialPruned, match="diverged: training loss nan at step 2"):
        _objective(ToyTask(nan_after=1))(trial)
    assert trial.user_attrs["diverged"] == "training loss nan at step 2"


@pytest.mark.parametrize("where, error", [("build_model", "RuntimeError"), ("evaluate", "ValueError")])
def test_exception_in_user_code_fails_the_trial_with_traceback(where, error):
    trial = FixedTrial(PARAMS)
    with pytest.raises(TrialFailed):
        _objective(ToyTask(fail_in=where))(trial)
    assert trial.user_attrs["fail_reason"] == f"{error}: toy task: {where} exploded"
    assert f"in {where}" in trial.user_attrs["traceback"]


def test_bad_target_preset_fails_the_trial_not_the_study(toy_task):
    space = dict(make_spec().search_space, targets={"choices": ["attention-qv", "no-such-preset"]})
    trial = FixedTrial({**PARAMS, "targets": "no-such-preset"})
    with pytest.raises(TrialFailed):
        _objective(toy_task, search_space=space)(trial)
    assert "no-such-preset" in trial.user_attrs["fail_reason"]


def test_constraint_marks_trial_infeasible_and_skips_training(toy_task):
    trial = FixedTrial(PARAMS)
    with pytest.raises(optuna.TrialPruned, match="infeasible"):
        _objective(toy_task, constraints={"max_trainable_params": 100})(trial)
    assert trial.constraints == {"max_trainable_params": 4 * 2 * 16 * 4 + 51 - 100}
    assert "train_steps" not in trial.user_attrs


def test_feasible_trial_records_a_non_positive_constraint(toy_task):
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(PARAMS)
    study.optimize(_objective(toy_task, constraints={"max_trainable_params": 10_000}), n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE
    assert trial.constraints["max_trainable_params"] == 563 - 10_000


def test_multi_objective_returns_metric_and_trainable_params(toy_task):
    objective = _objective(toy_task, study={"metric": ["accuracy", "trainable_params"]})
    assert objective.prune is False
    trial = FixedTrial(PARAMS)
    values = objective(trial)
    assert values == [trial.user_attrs["metric_values"]["accuracy"], 563.0]


def test_pruner_stops_training_and_reports_every_evaluation(toy_task):
    # a real pruner: any accuracy below 1.01 is pruned once step 1 is reached
    trial = _one_trial(toy_task, optuna.pruners.ThresholdPruner(lower=1.01, n_warmup_steps=1))
    assert trial.state == TrialState.PRUNED
    assert sorted(trial.intermediate_values) == [0, 1]  # evaluation 0 (warm-up) and 1, then stopped
    assert trial.user_attrs["train_steps"] == 2 and trial.user_attrs["planned_steps"] == 6


def test_a_prune_at_the_last_evaluation_completes_the_trial(toy_task):
    """All steps are trained by then: pruning would save nothing and throw the result away."""
    # prunes from the last evaluation (step index 5) on only
    trial = _one_trial(toy_task, optuna.pruners.ThresholdPruner(lower=1.01, n_warmup_steps=5))
    assert trial.state == TrialState.COMPLETE and "last evaluation 5" in trial.user_attrs["prune_ignored"]
    assert trial.user_attrs["train_steps"] == trial.user_attrs["planned_steps"] == 6
    assert math.isclose(trial.intermediate_values[5], trial.value)


def test_unpruned_trial_reports_each_evaluation(toy_task):
    trial = _one_trial(toy_task, optuna.pruners.MedianPruner())
    assert trial.state == TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == [0, 1, 2, 3, 4, 5]
    assert math.isclose(trial.intermediate_values[5], trial.value)


def test_trials_with_equal_parameters_give_equal_results_whatever_ran_before(toy_task):
    import torch

    objective = _objective(toy_task, train={"epochs": 1})
    first = FixedTrial(PARAMS)
    a = objective(first)
    torch.rand(1000)  # disturb the global random state between trials
    second = FixedTrial(PARAMS)
    assert objective(second) == a
    # eval_loss is continuous: it differs when the LoRA factors start from another random draw
    assert second.user_attrs["metric_values"] == first.user_attrs["metric_values"]


def test_interrupt_records_its_reason_and_propagates(monkeypatch):
    task = ToyTask()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(task, "evaluate", interrupted)
    trial = FixedTrial(PARAMS)
    with pytest.raises(KeyboardInterrupt):
        _objective(task)(trial)
    assert trial.user_attrs["fail_reason"].startswith("interrupted (signal 15)")
