"""The learning-rate probe (lora_tune.study.run.lr_probe, issue 20 items 2 and 3): its rule, where its
rate falls on the toy task, what it places in a study (the learning_rate range, the warm-start prior,
the baseline's rate), where it runs, and that it is off unless asked for."""
from __future__ import annotations

import math

import pytest
from optuna.trial import TrialState

from lora_tune import LoraConfig, inject
from lora_tune.study.run.lr_probe import ensure_probe, placed_spec, probe_plan, run_probe
from lora_tune.study.run.runner import create_study, optimize
from lora_tune.study.run.warm_start import PRIOR, config_scale, probe_prior
from lora_tune.study.schema.spec import spec_from_stored
from lora_tune.study.trial import record
from lora_tune.study.trial.objective import Objective
from lora_tune.train import TrainConfig, fit
from lora_tune.train.lr_range import pick_rate, smooth, sweep_rates
from tests.study.conftest import make_spec
from tests.study.toy_task import ToyTask

# the toy task trained 3 epochs of batches of 16 (36 optimizer steps)
TRAIN = {"epochs": 3, "batch_size": 16, "evals_per_epoch": 1}
SPACE = {"rank": {"choices": [2, 4, 8]}, "alpha": {"ratio": [1, 2]},
         "targets": {"choices": ["attention-qv", "all-linear"]},
         "learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}}
TARGETS = ["attention-qv", "attention", "all-linear"]  # the middle one: attention; the prior's two presets


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'probe.db'}"


def _accuracy(task, lora, rate):
    model = task.build_model()
    inject(model, LoraConfig(**lora, modules_to_save=list(task.modules_to_save)))
    result = fit(model, task, TrainConfig(**TRAIN, device="cpu", learning_rate=rate))
    return result.final_metrics["accuracy"], result.diverged


def test_the_rule_reads_the_rate_where_the_smoothed_loss_stops_falling():
    rates = sweep_rates(1e-4, 1.0, 9)
    assert rates[0] == 1e-4 and math.isclose(rates[-1], 1.0) and math.isclose(rates[1] / rates[0], 10 ** 0.5)
    losses = [2.0, 1.9, 1.6, 1.2, 0.8, 0.5, 0.6, 1.5, 4.0]
    edge, rate, falls, smoothed = pick_rate(rates, losses)
    assert smoothed == smooth(losses)
    best = smoothed.index(min(smoothed))  # the average lags the raw minimum (step 5) by a step
    assert best == 6 and edge == rates[best - 1]  # the update before the lowest loss
    assert rate == edge / 10 and falls
    assert not pick_rate(rates[:3], [1.0, 1.2, 1.5])[2]  # a loss that never falls says so


def test_the_probes_rate_learns_on_the_toy_task_between_rates_that_learn_nothing_and_diverge():
    """Measured on the toy task (middle adapter: rank 4, alpha 4, attention q/v): trained at the
    probe's rate it learns; at a hundredth of it, it stays at the majority class; at a few times
    the edge the loss rises and training stops as diverged."""
    task = ToyTask()
    spec = make_spec(study={"lr_probe": True}, train=TRAIN, search_space=SPACE)
    plan = probe_plan(spec)
    assert plan.lora == {"rank": 4, "alpha": 4.0, "targets": "attention-qv"} and plan.scale == 1.0
    assert len(plan.rates) == 30 and plan.data_share == 0.25
    measured = run_probe(task, plan)
    test = measured["test"]
    assert measured["full_steps"] == 36 and 0 < test.steps <= 30 and test.falls
    assert 0.05 <= test.edge <= 0.5 and test.rate == pytest.approx(test.edge / 10)
    learned, diverged = _accuracy(task, plan.lora, test.rate)
    assert learned >= 0.9 and diverged is None
    assert _accuracy(task, plan.lora, test.rate / 100)[0] < 0.45  # the majority class: 0.396
    assert _accuracy(task, plan.lora, test.edge * 3)[1] is not None  # diverged
    # init's range, [rate / 4, rate x 4], learns throughout (its low end more slowly in 36 steps)
    assert _accuracy(task, plan.lora, test.rate / 4)[0] >= 0.7
    assert _accuracy(task, plan.lora, test.rate * 4)[0] >= 0.9


def test_a_study_places_its_range_prior_and_baseline_from_the_probe_and_resumes(url):
    task = ToyTask()
    space = {"rank": {"choices": [8, 16]}, "alpha": {"ratio": [1, 2]},
             "targets": {"choices": TARGETS},
             "learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}}
    spec = make_spec(study={"lr_probe": {"steps": 20, "data_share": 0.5, "range": [0.25, 4]},
                            "warm_start": "defaults", "n_trials": 3}, train=TRAIN, search_space=space)
    study = create_study(spec, url, task=task)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [record.kind_of(t) for t in waiting] == [record.Kind.BASELINE]  # the prior waits for the probe
    seen = []
    optimize(study, spec_from_stored(study.user_attrs["spec"]), n_trials=1, task=task, on_probe=seen.append)
    probe = study.user_attrs[record.LR_PROBE]
    assert seen == [probe] and probe["steps"] <= 20 and probe["planned_steps"] == 20
    assert probe["config"] == {"rank": 8, "alpha": 8.0, "targets": "attention"} and probe["scale"] == 1.0
    assert len(probe["losses"]) == len(probe["rates"]) == probe["steps"] and probe["seconds"] > 0
    assert probe["compute"] == pytest.approx(probe["steps"] / 36) and probe["full_trial_steps"] == 36
    rate, edge = probe["rate"], probe["edge"]
    low, high = probe["range"]
    assert probe["file_range"] == [1e-4, 3e-3]
    assert low == pytest.approx(rate / 4, rel=1e-2) and high == pytest.approx(rate * 4, rel=1e-2)
    stored = study.user_attrs["spec"]["search_space"]["learning_rate"]
    assert (stored["low"], stored["high"], stored["log"]) == (low, high, True)
    trials = study.get_trials()
    baseline = record.find_baseline(trials)
    assert baseline.params["learning_rate"] == min(max(1e-3, low), high)  # train.learning_rate clamped in
    # the prior: rank 16 / alpha 32 all-linear at 1 x and rank 8 / alpha 16 attention at 2 x the probe's
    # rate, each divided by its scale over the probe's (2 / 1); rank 32 is not in the space
    enqueued = [t.user_attrs[record.ENQUEUED_PARAMS] for t in trials
                if t.user_attrs.get(record.WARM_START) == "defaults (lr probe)"]
    prior = {(p["rank"], p["targets"]): p["learning_rate"] for p in enqueued}
    assert prior == pytest.approx({(16, "all-linear"): rate / 2, (8, "attention"): rate})
    assert all(low <= v <= high for v in prior.values()) and max(prior.values()) * 2 <= edge
    # a resumed study reads its file with the range the probe placed; the probe is not run again
    again = create_study(spec, url, resume=True, task=task)
    assert again.user_attrs["spec"]["search_space"]["learning_rate"]["low"] == low
    assert len(again.get_trials()) == len(trials)
    optimize(again, spec_from_stored(again.user_attrs["spec"]), task=task, on_probe=seen.append)
    assert seen == [probe] and again.user_attrs[record.LR_PROBE] == probe
    sampled = [t for t in again.get_trials() if record.kind_of(t) == record.Kind.BUDGET
               and record.WARM_START not in t.user_attrs]
    assert all(low <= t.params["learning_rate"] <= high for t in sampled)


def test_without_a_range_the_files_range_stays_and_prior_configs_past_the_edge_are_dropped(url):
    task = ToyTask()
    space = {"rank": {"choices": [8, 16]}, "alpha": {"ratio": [1, 2]}, "targets": {"choices": TARGETS},
             "learning_rate": {"type": "float", "low": 0.5, "high": 0.9, "log": True}}  # above the toy's edge
    spec = make_spec(study={"lr_probe": True, "warm_start": "defaults", "baseline": False}, train=TRAIN,
                     search_space=space)
    study = create_study(spec, url, task=task)
    ensure_probe(study, Objective(spec_from_stored(study.user_attrs["spec"]), task))
    probe = study.user_attrs[record.LR_PROBE]
    assert "range" not in probe and probe["edge"] < 0.5
    assert study.user_attrs["spec"]["search_space"]["learning_rate"]["low"] == 0.5
    assert study.get_trials() == []  # every prior config, clamped to 0.5, would pass the edge


def test_the_prior_in_what_transfers():
    """With a probe, each config's rate is its multiple of the probe's rate over its scale relative
    to the probe's: twice the scale, half the rate; rsLoRA's scale is alpha / sqrt(rank)."""
    configs = probe_prior(1e-3, 1.0)
    assert [c["learning_rate"] for c in configs] == pytest.approx([f * 1e-3 / 2 for _, f in PRIOR])
    assert config_scale({"rank": 16, "alpha": 32.0}) == 2.0 and config_scale({"rank": 16, "alpha": 32.0,
                                                                               "rslora": True}) == 8.0
    assert probe_prior(1e-3, 2.0)[0]["learning_rate"] == pytest.approx(1e-3)


@pytest.mark.parametrize("setting", [None, False])
def test_off_unless_the_file_asks_the_prior_keeps_its_rates_by_model_kind(url, setting):
    task = ToyTask()
    space = {**SPACE, "rank": {"choices": [8, 16]}, "targets": {"choices": TARGETS}}
    study_section = {"warm_start": "defaults", "n_trials": 2, **({} if setting is None else {"lr_probe": setting})}
    spec = make_spec(study=study_section, train=TRAIN, search_space=space)
    assert spec.study.lr_probe is None
    study = create_study(spec, url, task=task)
    prior = [t for t in study.get_trials() if t.user_attrs.get(record.WARM_START) == "defaults"]
    assert sorted(t.user_attrs[record.ENQUEUED_PARAMS]["learning_rate"] for t in prior) == pytest.approx(sorted(
        min(max(2e-4 * f, 1e-4), 3e-3) for c, f in PRIOR if c["rank"] in (8, 16)))  # the decoder's 2e-4
    optimize(study, spec_from_stored(study.user_attrs["spec"]), task=task)
    assert record.LR_PROBE not in study.user_attrs
    assert record.study_account(study).probe == 0.0


def test_the_placed_spec_is_the_spec_when_nothing_was_placed():
    spec = make_spec(search_space=SPACE)
    assert placed_spec(spec, None) is spec and placed_spec(spec, {"rate": 1e-3, "edge": 1e-2}) is spec
    placed = placed_spec(spec, {"rate": 1e-3, "range": [2.5e-4, 4e-3]})
    assert placed.search_space["learning_rate"] == {**SPACE["learning_rate"], "low": 2.5e-4, "high": 4e-3}


def test_in_process_isolation_the_probe_runs_in_the_trial_process(url, monkeypatch):
    """The driver never builds the task: the probe runs in the trial process (call_in_child)."""
    import lora_tune.tasks

    spec = make_spec(study={"lr_probe": {"steps": 10, "range": [0.25, 4]}, "n_trials": 1, "baseline": False},
                     train={**TRAIN, "isolation": "process"}, search_space=SPACE)
    study = create_study(spec, url, task=ToyTask())

    def no_model_here(*args, **kwargs):
        raise AssertionError("the driver built the task")

    monkeypatch.setattr(lora_tune.tasks, "build_task", no_model_here)
    optimize(study, spec_from_stored(study.user_attrs["spec"]))
    probe = study.user_attrs[record.LR_PROBE]
    assert "error" not in probe and probe["steps"] == 10 and probe["range"][0] > 1e-4
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.user_attrs[record.ISOLATION] == "process"
    assert probe["range"][0] <= trial.params["learning_rate"] <= probe["range"][1]


def test_a_probe_that_fails_is_recorded_and_the_study_goes_on(url):
    spec = make_spec(study={"lr_probe": True, "n_trials": 1, "baseline": False, "warm_start": "defaults"},
                     task={"type": "python", "factory": "tests.study.toy_task:make_task", "args": {"nan_after": 0}},
                     train=TRAIN, search_space=SPACE)
    task = ToyTask(nan_after=0)
    study = create_study(spec, url, task=task)
    optimize(study, spec, task=task)
    probe = study.user_attrs[record.LR_PROBE]
    assert "error" in probe and "finite" in probe["error"]
    assert study.user_attrs["spec"]["search_space"]["learning_rate"]["low"] == 1e-4
    assert [t.user_attrs.get(record.WARM_START) for t in study.get_trials()] == [None]
    assert record.study_account(study).probe == 0.0
