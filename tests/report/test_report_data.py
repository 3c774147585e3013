"""Panel data functions: values that could be wrong, on real Optuna studies."""
from __future__ import annotations

from datetime import timedelta

import optuna
import pytest
from optuna.trial import TrialState

from tests.report.lora_study_factory import DISTRIBUTIONS, add_trial, make_lora_study, trial_record
from lora_tune.errors import ConfigError
from lora_tune.report import data

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def synthetic():
    return make_lora_study()


def test_pareto_mask_two_objectives():
    # (cost, metric): minimise cost, maximise metric
    points = [(1, 0.5), (2, 0.7), (2, 0.6), (3, 0.7), (4, 0.9), (0.5, 0.4), (1, 0.5)]
    assert data.pareto_mask(points, [False, True]) == [True, True, False, False, True, True, True]
    # both maximised: only (4, 0.9) survives
    assert data.pareto_mask(points, [True, True]) == [False, False, False, False, True, False, False]


def test_summary_counts_best_baseline_gain(synthetic):
    s = data.summary_data(synthetic)
    trials = synthetic.get_trials()
    assert s["n_trials"] == len(trials) == 24
    assert s["counts"]["COMPLETE"] == sum(t.state == TrialState.COMPLETE for t in trials)
    assert s["counts"]["PRUNED"] == 4 and s["counts"]["FAIL"] == 2
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert s["best"]["number"] == best.number and s["best"]["value"] == best.value
    assert s["best"]["params"] == best.params
    assert s["baseline"]["number"] == 0
    assert s["gain"] == pytest.approx(best.value - trials[0].value)
    assert s["gain_relative"] == pytest.approx((best.value - trials[0].value) / trials[0].value)


def test_gain_is_positive_when_a_minimised_metric_drops():
    study = optuna.create_study(direction="minimize")
    add_trial(study, 2.0, trainable=10, memory=10, baseline=True)
    add_trial(study, 1.5, trainable=10, memory=10)
    add_trial(study, 3.0, trainable=10, memory=10)
    s = data.summary_data(study)
    assert s["best"]["number"] == 1
    assert s["gain"] == pytest.approx(0.5)
    assert s["gain_relative"] == pytest.approx(0.25)


def test_pruning_savings_arithmetic():
    study = optuna.create_study(direction="maximize")
    params = {"rank": 8, "alpha_ratio": 2.0, "targets": "attention", "quant_bits": 0,
              "learning_rate": 1e-3, "dropout": 0.0}
    t0 = make_lora_study(n=1).trials[0].datetime_start
    # complete: 40 of 40 steps; pruned: 20 of 40 (0.01 s/step -> 0.2 s saved); pruned 10 of 40
    study.add_trial(trial_record(0, params, state=TrialState.COMPLETE, value=0.8, curve=[0.5] * 4,
                                 planned=40, start=t0, worker="a"))
    study.add_trial(trial_record(1, params, state=TrialState.PRUNED, value=None, curve=[0.4, 0.5],
                                 planned=40, start=t0, worker="a"))
    study.add_trial(trial_record(2, params, state=TrialState.PRUNED, value=None, curve=[0.3],
                                 planned=40, start=t0, worker="a"))
    # failed after 3 of 40 steps: its 37 unrun steps are not savings from pruning
    study.add_trial(trial_record(3, params, state=TrialState.FAIL, value=None, curve=[],
                                 planned=40, start=t0, worker="a"))
    p = data.summary_data(study)["pruning"]
    assert (p["steps_run"], p["steps_unpruned"], p["steps_saved"]) == (73, 123, 50)
    assert p["fraction_saved"] == pytest.approx(50 / 123)
    assert p["seconds_saved_estimate"] == pytest.approx(0.01 * 20 + 0.01 * 30)
    assert (p["trials_counted"], p["pruned_counted"]) == (4, 2)


def test_history_best_so_far():
    for direction, expected in (("maximize", [1, 3, 3, 4]), ("minimize", [1, 1, 0.5, 0.5])):
        study = optuna.create_study(direction=direction)
        for v in (1, 3, 0.5, 4):
            add_trial(study, v, trainable=1, memory=1)
        add_trial(study, 0, trainable=1, memory=1, state=TrialState.PRUNED)
        h = data.history_data(study)
        assert h["numbers"] == [0, 1, 2, 3]
        assert h["best_so_far"] == expected


def test_rank_alpha_cell_is_best_of_matching_trials():
    for direction, pick in (("maximize", max), ("minimize", min)):
        study = optuna.create_study(direction=direction)
        values = {(8, 2.0): [0.5, 0.9, 0.7], (16, 2.0): [0.6], (8, 1.0): [0.4, 0.45]}
        for (rank, ratio), vs in values.items():
            for v in vs:
                add_trial(study, v, trainable=1, memory=1, rank=rank, alpha_ratio=ratio)
        add_trial(study, 0, trainable=1, memory=1, rank=16, alpha_ratio=1.0, state=TrialState.PRUNED)
        d = data.rank_alpha_data(study)
        assert d["ranks"] == [8, 16] and d["alphas"] == [1.0, 2.0] and d["alpha_label"] == "alpha / rank"
        assert d["z"] == [[pick(values[(8, 1.0)]), None], [pick(values[(8, 2.0)]), 0.6]]
        assert d["counts"] == [[2, 0], [3, 1]]
        best_number = [t.number for t in study.trials if t.value == pick(values[(8, 2.0)])][0]
        assert d["trial_numbers"][1][0] == best_number


def test_presets_grouped_and_ordered(synthetic):
    d = data.presets_data(synthetic)
    complete = [t for t in synthetic.trials if t.state == TrialState.COMPLETE]
    assert sum(p["n"] for p in d["presets"]) == len(complete)
    for p in d["presets"]:
        expected = [t.value for t in complete if t.user_attrs["target_preset"] == p["preset"]]
        assert sorted(p["values"]) == sorted(expected) and p["best"] == max(expected)
    bests = [p["best"] for p in d["presets"]]
    assert bests == sorted(bests, reverse=True)


def test_cost_pareto_front_membership():
    study = optuna.create_study(direction="maximize")
    add_trial(study, 0.70, trainable=100, memory=5, bits=0)  # 0 front (cheapest)
    add_trial(study, 0.65, trainable=200, memory=1, bits=4)  # 1 dominated by 0 on params
    add_trial(study, 0.80, trainable=400, memory=9, bits=8)  # 2 front
    add_trial(study, 0.80, trainable=800, memory=2, bits=0)  # 3 dominated by 2 on params
    add_trial(study, 0.90, trainable=1600, memory=3, bits=4)  # 4 front
    add_trial(study, 0.99, trainable=1600, memory=3, bits=0, state=TrialState.PRUNED)  # not counted
    d = data.cost_data(study, x="trainable_params")
    assert [p["pareto"] for p in d["points"]] == [True, False, True, False, True]
    assert d["front_numbers"] == [0, 2, 4]
    assert d["quant_bits"] == ["none", "4", "8"]
    m = data.cost_data(study, x="peak_memory_bytes")  # memory: 5, 1, 9, 2, 3
    assert m["front_numbers"] == [1, 3, 4]
    with pytest.raises(ConfigError, match="x: got 'flops'"):
        data.cost_data(study, x="flops")


def test_curves_include_pruned_with_their_steps(synthetic):
    d = data.curves_data(synthetic)
    pruned = [c for c in d["curves"] if c["state"] == "PRUNED"]
    assert d["n_pruned"] == len(pruned) == 4
    assert all(c["steps"] == [10, 20] for c in pruned)
    assert not any(c["state"] == "FAIL" for c in d["curves"])
    assert [c for c in d["curves"] if c["is_baseline"]][0]["number"] == 0


def test_parallel_dimensions_code_categoricals_and_log_floats(synthetic):
    d = data.parallel_data(synthetic)
    dims = {dim["label"]: dim for dim in d["dimensions"]}
    assert set(dims) == {"alpha_ratio", "dropout", "log10 learning_rate", "quant_bits", "rank", "targets",
                         "accuracy"}
    targets = dims["targets"]
    complete = sorted((t for t in synthetic.trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    decoded = [targets["ticktext"][v] for v in targets["values"]]
    assert decoded == [t.params["targets"] for t in complete]
    assert dims["quant_bits"]["ticktext"] == ["0", "4", "8"]  # categorical, not a numeric axis
    lr = dims["log10 learning_rate"]["values"]
    assert lr[0] == pytest.approx(-3.0)  # baseline learning rate 1e-3
    assert dims["accuracy"]["values"] == [t.value for t in complete]


def test_parallel_marks_missing_conditional_params():
    study = optuna.create_study()
    dist = optuna.distributions.CategoricalDistribution(["nf4", "fp4"])
    bits = DISTRIBUTIONS["quant_bits"]
    study.add_trial(optuna.trial.create_trial(value=1.0, params={"quant_bits": 4, "quant_type": "nf4"},
                                              distributions={"quant_bits": bits, "quant_type": dist}))
    study.add_trial(optuna.trial.create_trial(value=2.0, params={"quant_bits": 0},
                                              distributions={"quant_bits": bits}))
    dims = {d["label"]: d for d in data.parallel_data(study)["dimensions"]}
    qt = dims["quant_type"]
    assert [qt["ticktext"][v] for v in qt["values"]] == ["nf4", "n/a"]


def test_timeline_lanes_per_worker(synthetic):
    d = data.timeline_data(synthetic)
    assert d["workers"] == ["host-a:101", "host-b:202"]
    assert len(d["bars"]) == 24
    for w in d["workers"]:
        bars = [b for b in d["bars"] if b["worker"] == w]
        for a, b in zip(bars, bars[1:]):  # one trial at a time per worker
            assert b["start"] >= a["end"]
        assert d["busy_seconds"][w] == pytest.approx(sum(b["seconds"] for b in bars))
    first = d["bars"][0]
    t = synthetic.trials[first["number"]]
    assert first["seconds"] == pytest.approx((t.datetime_complete - t.datetime_start).total_seconds())


def test_timeline_running_trial_ends_now():
    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr("worker", "w:7")
    now = study.trials[0].datetime_start + timedelta(seconds=5)
    bar = data.timeline_data(study, now=now)["bars"][0]
    assert (bar["worker"], bar["state"], bar["seconds"]) == ("w:7", "RUNNING", 5.0)


def test_importances_use_ped_anova(synthetic):
    d = data.importances_data(synthetic)
    assert d["evaluator"] == "PedAnovaImportanceEvaluator" and d["note"] is None
    assert sum(d["importances"].values()) == pytest.approx(1.0)
    # the synthetic metric is driven mostly by rank: PED-ANOVA must rank it first
    assert next(iter(d["importances"])) == "rank"
    # Optuna 5's default evaluator is the same one
    default = optuna.importance.get_param_importances(synthetic)
    assert list(default) == list(d["importances"])


def test_importances_explain_too_few_trials():
    study = optuna.create_study()
    add_trial(study, 1.0, trainable=1, memory=1)
    d = data.importances_data(study)
    assert d["importances"] == {} and "at least 2 complete trials" in d["note"]


def test_multi_objective_pareto_and_summary():
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("metrics", ["accuracy", "trainable_params"])
    for values in ([0.9, 100], [0.8, 50], [0.85, 120], [0.95, 400], [0.7, 60]):
        study.add_trial(optuna.trial.create_trial(values=values, params={"rank": 4},
                                                  distributions={"rank": DISTRIBUTIONS["rank"]}))
    d = data.pareto_data(study)
    assert d["names"] == ["accuracy", "trainable_params"]
    assert [p["pareto"] for p in d["points"]] == [True, True, False, True, False]
    assert data.summary_data(study)["pareto_numbers"] == [0, 1, 3]


def test_every_panel_handles_a_study_without_complete_trials():
    study = optuna.create_study()
    add_trial(study, 0, trainable=1, memory=1, state=TrialState.PRUNED)
    add_trial(study, 0, trainable=1, memory=1, state=TrialState.FAIL)
    s = data.summary_data(study)
    assert s["best"] is None and s["gain"] is None and s["counts"]["FAIL"] == 1
    assert data.history_data(study)["numbers"] == []
    assert data.rank_alpha_data(study)["z"] == []
    assert data.cost_data(study)["points"] == []
    assert len(data.timeline_data(study)["bars"]) == 2
    assert list(data.table_data(study)["frame"]["state"]) == ["PRUNED", "FAIL"]


def test_table_has_no_system_attrs_and_is_best_first(synthetic):
    synthetic.trials  # noqa: B018
    df = data.table_data(synthetic)["frame"]
    assert not any("system" in c or c.startswith("artifacts") for c in df.columns)
    complete = df[df["state"] == "COMPLETE"]["accuracy"].tolist()
    assert complete == sorted(complete, reverse=True)
    assert df.iloc[0]["number"] == data.summary_data(synthetic)["best"]["number"]
    assert "traceback" not in df.columns and "param_rank" in df.columns
