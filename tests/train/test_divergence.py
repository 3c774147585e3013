"""Divergence-aware stopping (lora_tune.train.divergence): a training that clearly failed stops at
the first evaluation after ``diverged_after`` of its steps; a slow learner does not."""
from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState

from lora_tune import LoraConfig, inject
from lora_tune.errors import NonFiniteLossError
from lora_tune.study.trial.objective import Objective, TrialFailed
from lora_tune.train import TrainConfig, fit
from tests.study.conftest import make_spec
from tests.study.toy_task import ToyTask
from lora_tune.study.schema.spec import resolve_objective

LORA = LoraConfig(rank=4, alpha=8, targets="attention-qv", modules_to_save=["head"])


def _train(task, **train):
    model = task.build_model()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inject(model, LORA)
    config = TrainConfig(**{"epochs": 4, "batch_size": 16, "evals_per_epoch": 2, "device": "cpu", **train})
    return fit(model, task, config)


def test_a_learning_rate_that_diverges_stops_at_the_first_evaluation_after_the_warm_up_share():
    task = ToyTask()
    task.majority_accuracy = float(torch.bincount(task.y_test).max()) / len(task.y_test)
    result = _train(task, learning_rate=30.0, grad_clip=None)
    assert result.diverged is not None and result.stopped_early
    assert 0.25 * result.planned_steps <= result.steps < result.planned_steps
    assert result.steps == result.history[-1]["step"]


def test_a_slow_but_steady_learner_is_not_stopped():
    task = ToyTask()
    task.majority_accuracy = float(torch.bincount(task.y_test).max()) / len(task.y_test)
    result = _train(task, learning_rate=3e-3)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]  # it learns, slowly
    assert result.diverged is None and result.steps == result.planned_steps


def test_a_non_finite_loss_is_a_divergence_or_with_the_check_off_an_error():
    diverged = _train(ToyTask(nan_after=5))
    assert diverged.diverged is not None and "nan" in diverged.diverged
    assert diverged.steps == int(diverged.diverged.rsplit(" ", 1)[1]) - 1  # the bad step was not applied
    with pytest.raises(NonFiniteLossError):
        _train(ToyTask(nan_after=5), diverged_after=None)


def test_with_the_check_off_a_diverging_training_runs_all_its_steps():
    result = _train(ToyTask(), learning_rate=30.0, grad_clip=None, diverged_after=None)
    assert result.diverged is None and result.steps == result.planned_steps


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_a_diverged_trial_is_pruned_with_its_reason(isolation):
    space = {"rank": {"choices": [4]}, "alpha": {"ratio": [2.0]}, "targets": {"choices": ["attention-qv"]},
             "learning_rate": {"type": "float", "low": 30.0, "high": 40.0}}
    spec = resolve_objective(make_spec(task={"type": "python", "factory": "tests.study.toy_task:make_task"},
                                       search_space=space, train={"isolation": isolation, "grad_clip": None}),
                             ToyTask())
    study = optuna.create_study(direction="maximize")
    study.optimize(Objective(spec), n_trials=1, catch=(TrialFailed,))
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    assert "above 1 x its start" in trial.user_attrs["diverged"]
    assert trial.user_attrs["train_steps"] < trial.user_attrs["planned_steps"]


@pytest.mark.parametrize("key, value, allowed", [("diverged_after", 0, "> 0"), ("diverged_after", 1.5, "≤ 1"),
                                                 ("diverged_loss_ratio", 0, "> 0"),
                                                 ("diverged_chance_margin", 1, "< 1")])
def test_thresholds_out_of_range_name_the_key(key, value, allowed):
    from lora_tune.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"{key}.*{allowed}"):
        TrainConfig(**{key: value})


def test_a_training_that_learns_nothing_is_stopped_at_the_majority_class_only_after_half_its_steps():
    task = ToyTask()
    task.majority_accuracy = 1.0  # every evaluation is "at the majority class"
    result = _train(task, learning_rate=1e-9)  # the loss cannot fall
    assert result.diverged is not None and "majority class" in result.diverged
    assert 0.5 * result.planned_steps <= result.steps < result.planned_steps
    learning = _train(ToyTask(), learning_rate=3e-3)  # no majority given: only a rising loss counts
    assert learning.diverged is None


def test_a_training_that_learned_only_the_label_prior_has_learned_nothing():
    """On skewed labels (TREC, CR, MPQA: the prior's loss is 0.90-0.95 of a uniform start) a model
    that predicts the label frequencies has lowered its loss by more than 5 % without reading its
    input: at the majority class, it is stopped unless its loss also fell below the prior's."""
    from lora_tune.train.divergence import DivergenceCheck

    def verdict(prior, recent):
        check = DivergenceCheck(0.25, 1.0, 0.02, planned=100, majority=0.68, prior_loss=prior)
        for _ in range(check.start_steps):
            check.step(0.693)  # a uniform start on two classes
        return check.verdict(50, recent, {"accuracy": 0.68})

    assert verdict(None, 0.63) is None  # without the prior, 9 % below the start looks like learning
    reason = verdict(0.624, 0.63)  # MPQA's prior: 0.63 is the prior's loss, nothing more
    assert reason is not None and "label prior's 0.624" in reason
    assert verdict(0.624, 0.55) is None  # below 0.95 x the prior: it reads its input
    assert verdict(0.9, 0.63) is None  # a prior above the start changes nothing: the start is the floor
