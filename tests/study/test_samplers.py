"""The sampler factory's grid sampler: Optuna's GridSampler choosing points in trial-number order."""
from __future__ import annotations

import threading
import time

import optuna
import pytest

from lora_tune.study.run.samplers import OrderedGridSampler, make_sampler, plain_study_sampler

SPACE = {"x": [0.0, 1.0, 2.0], "y": [3, 4]}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_sampler_type_grid_is_the_ordered_grid_sampler():
    built = make_sampler("grid", 3, {"search_space": SPACE})
    plain = plain_study_sampler({"sampler": {"type": "grid", "search_space": SPACE, "seed": 3}})
    for sampler in (built, plain):
        assert type(sampler) is OrderedGridSampler and isinstance(sampler, optuna.samplers.GridSampler)
    study = optuna.create_study(sampler=built)
    study.optimize(lambda t: t.suggest_float("x", 0, 2) + t.suggest_int("y", 3, 4), n_trials=6)
    assert sorted((t.params["x"], t.params["y"]) for t in study.trials) == [
        (x, y) for x in SPACE["x"] for y in SPACE["y"]]
    assert built.is_exhausted(study)


def _unpicked_trial(study: optuna.Study) -> int:
    """A RUNNING trial that has not chosen its grid point yet (its worker is inside ``ask``)."""
    return study._storage.create_new_trial(study._study_id)


def test_a_trial_chooses_its_point_only_after_every_lower_trial_has():
    study = optuna.create_study(sampler=OrderedGridSampler(SPACE, seed=0, wait_limit=30))
    lower = _unpicked_trial(study)
    asked = []
    thread = threading.Thread(target=lambda: asked.append(study.ask()))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and not asked  # trial 1 waits for trial 0
    study._storage.set_trial_system_attr(lower, "grid_id", 0)  # trial 0 picks
    thread.join(10)
    assert asked and asked[0].number == 1
    assert study._storage.get_trial(asked[0]._trial_id).system_attrs["grid_id"] == 1


def test_a_lower_trial_that_never_chooses_is_waited_for_at_most_wait_limit(caplog):
    study = optuna.create_study(sampler=OrderedGridSampler(SPACE, seed=0, wait_limit=0.3))
    _unpicked_trial(study)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="lora_tune.workers"):
        trial = study.ask()
    assert 0.3 <= time.monotonic() - start < 5
    assert "trial 1: an earlier trial has not chosen its grid point" in caplog.text
    assert study._storage.get_trial(trial._trial_id).system_attrs["grid_id"] == 1


@pytest.mark.parametrize("given", ["fixed_params", "grid_id"])
def test_a_trial_with_its_point_given_does_not_wait(given):
    study = optuna.create_study(sampler=OrderedGridSampler(SPACE, seed=0, wait_limit=30))
    _unpicked_trial(study)
    if given == "fixed_params":
        study.enqueue_trial({"x": 1.0, "y": 3})
    else:  # a retry of a failed trial carries its grid point
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING,
                                                  system_attrs={"grid_id": 2, "search_space": SPACE}))
    start = time.monotonic()
    study.ask()
    assert time.monotonic() - start < 1
