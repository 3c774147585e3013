"""The search benchmark's study files are valid lora-tune study files, and its compute count is right."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from lora_tune.study.schema.spec import validate_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_search", REPO / "benchmarks" / "bench_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arm", ["b", "c", "d", "t", "g", "m", "n"])
def test_benchmark_study_files_validate(bench, arm, tmp_path):
    args = argparse.Namespace(
        trials=4, max_length=32, seed=0, epochs=1, batch_size=8, evals=4, threads=1, min_steps=20, data_fraction=1.0)
    for name in ("train", "dev"):
        (tmp_path / f"{name}.csv").write_text("text,label\na,0\nb,1\n")
    raw = bench.study_file(arm, "trec", tmp_path / "train.csv", tmp_path / "dev.csv", args)
    spec = validate_spec(raw)
    assert spec.study.confirm is not None and spec.study.confirm.top == bench.CONFIRM_TOP
    assert spec.study.pruner.type == ("median" if arm in ("b", "m") else "hyperband")
    assert (spec.study.warm_start == "defaults") == (arm != "b")
    assert spec.study.sampler.type == ("gp" if arm in ("d", "g", "m", "n") else "tpe") and spec.study.sampler.seed == 0
    assert ("nested" in raw["search_space"]["rank"]) == (arm in ("c", "n"))
    if arm in ("d", *bench.VARIANTS):  # the study lora-tune init writes, on the benchmark's data and budget
        assert spec.study.lr_probe and spec.study.name == f"trec-{arm}"
        assert spec.task["train_file"] == str(tmp_path / "train.csv") and spec.train.batch_size == 8


def test_compute_to_reach_counts_until_the_first_result_at_the_target(bench):
    results = [(1.0, 0.5), (0.25, None), (0.0, 0.7), (1.0, 0.9)]  # a pruned trial, a nested result
    assert bench.compute_to_reach(results, 0.7) == 1.25
    assert bench.compute_to_reach(results, 0.9) == 2.25
    assert bench.compute_to_reach(results, 0.95) is None
    assert bench.compute_to_reach([(1.0, 0.8799999952316284)], 0.88) == 1.0  # float32 as stored, float64 target


def test_goal_needs_half_the_anchor_compute_and_a_confirmed_best_at_least_the_anchor(bench):
    a = {"compute": 8.0, "confirmed_mean": 0.80, "to_anchor_best": 3.0}
    assert bench.goal_met({"a": a, "c": {"to_anchor_best": 4.0, "confirmed_mean": 0.80}})
    assert not bench.goal_met({"a": a, "c": {"to_anchor_best": 4.5, "confirmed_mean": 0.90}})
    assert not bench.goal_met({"a": a, "c": {"to_anchor_best": 1.0, "confirmed_mean": 0.79}})
    assert not bench.goal_met({"a": {**a, "best": 0.85}, "c": {"to_anchor_best": None, "confirmed_mean": 0.90,
                                                                "best": 0.84}})


def test_the_default_arm_must_also_beat_random_search_at_equal_compute(bench):
    a = {"compute": 8.0, "confirmed_mean": 0.80, "to_anchor_best": 3.0}
    d = {"to_anchor_best": 3.0, "confirmed_mean": 0.82}
    assert bench.goal_met({"a": a, "d": d, "r": {"confirmed_mean": 0.81}}, "d")
    assert not bench.goal_met({"a": a, "d": d, "r": {"confirmed_mean": 0.83}}, "d")
    assert set(bench.TUNED).isdisjoint(bench.HELD_OUT) and set(bench.HELD_OUT) == {"cr", "mpqa"}


def test_the_variants_that_choose_defaults_are_refused_on_the_held_out_pair(bench, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--datasets", "trec", "cr", "--arms", "d", "g"])
    assert stop.value.code == 2 and "held-out ['cr']" in capsys.readouterr().err



def test_a_run_in_parts_is_only_merged_with_an_earlier_run_of_the_same_budget(bench, tmp_path, capsys):
    import json

    settings = {"trials": 12, "train_examples": 1200, "dev_examples": 200, "max_length": 32, "epochs": 1,
                "batch_size": 8, "evals": 4, "seed": 0}  # the script's defaults
    assert set(settings) == set(bench.BUDGET)
    earlier = tmp_path / "run.json"
    earlier.write_text(json.dumps({"settings": {**settings, "train_examples": 400}, "trec": {}}))
    with pytest.raises(SystemExit) as stop:
        bench.main(["--datasets", "trec", "--arms", "g", "--json", str(earlier)])
    assert stop.value.code == 2 and "other train_examples: its arms" in capsys.readouterr().err


def test_the_nested_rank_benchmark_compares_one_nested_training_with_each_plain_rank(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_nested", REPO / "benchmarks" / "bench_nested.py")
    nested_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nested_bench)
    args = argparse.Namespace(max_length=32, batch_size=8, threads=1)
    (tmp_path / "d.csv").write_text("text,label\na,0\nb,1\n")
    for config in nested_bench.CONFIGS:
        nested, plain = (validate_spec(nested_bench.study_file("s", kind, config, 1, tmp_path / "d.csv",
                                                                 tmp_path / "d.csv", args)) for kind in (True, False))
        assert nested.study.n_trials == 1 and plain.study.n_trials == len(nested_bench.RANKS)
        assert plain.study.sampler.type == "grid" and nested.study.pruner.type == plain.study.pruner.type == "none"
        assert nested.train.diverged_after is None and nested.train.seed == plain.train.seed == 1


def test_the_variant_with_inits_own_sampler_is_inits_study(bench, tmp_path):
    """(d)'s numbers on the tuned pair and its variant's with the same sampler are one study."""
    from lora_tune.study.schema.templates import SAMPLER

    args = argparse.Namespace(trials=4, max_length=32, seed=0, epochs=1, batch_size=8, evals=4, threads=1)
    same = next(arm for arm, (key, value) in bench.VARIANTS.items()
                if key == "sampler" and value["type"] == SAMPLER["type"])
    d, variant = (bench.study_file(arm, "trec", tmp_path / "t.csv", tmp_path / "d.csv", args) for arm in ("d", same))
    variant["study"]["name"] = d["study"]["name"]
    assert variant == d
