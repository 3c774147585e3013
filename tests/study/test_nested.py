"""Nested ranks in a study (lora_tune.study.trial.nested_trials): one trial, one finished result per listed rank."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import FixedTrial, TrialState

from lora_tune import load_adapter
from lora_tune.cli.main import cli
from lora_tune.errors import StudySpecError
from lora_tune.export import export_best
from lora_tune.study.trial.artifacts import adapter_artifacts
from lora_tune.study.trial import record
from lora_tune.study.trial.confirm import confirm_top
from lora_tune.study.trial.nested_trials import nested_problems
from lora_tune.study.trial.objective import Objective
from lora_tune.study.trial.record import CONFIRM_OF, CONFIRM_SHARED, NESTED_PARENT, NESTED_RANK_VALUES, SEED
from lora_tune.study.schema.space import SearchSpace, baseline_params, check_search_space
from lora_tune.study.schema.spec import resolve_objective
from tests.study.conftest import BASE, make_spec
from tests.study.toy_task import ToyTask

ROOT = Path(__file__).resolve().parents[2]
SPACE = {"rank": {"nested": [2, 4, 8]}, "alpha": {"ratio": [1, 2]}, "targets": "all-linear",
         "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}}
PARAMS = {"rank": 8, "alpha_ratio": 2.0, "learning_rate": 1e-2}


def _objective(task, space=SPACE, **sections) -> Objective:
    return Objective(resolve_objective(make_spec(search_space=space, **sections), task), task)


def _study(objective: Objective, params=PARAMS, storage=None, **kwargs) -> optuna.Study:
    directions = [d for d in objective.spec.directions]
    study = optuna.create_study(directions=directions, storage=storage, **kwargs)
    study.enqueue_trial(params)
    study.optimize(objective, n_trials=1)
    return study


def _ranks(study: optuna.Study, parent: int = 0) -> dict[int, optuna.trial.FrozenTrial]:
    return {t.params["rank"]: t for t in study.get_trials() if t.user_attrs.get(NESTED_PARENT) == parent}


def test_one_trained_trial_adds_a_finished_trial_for_each_smaller_rank(toy_task):
    study = _study(_objective(toy_task, train={"epochs": 2}))
    parent = study.trials[0]
    assert parent.state == TrialState.COMPLETE and parent.params["rank"] == 8
    assert parent.user_attrs["nested_ranks"] == [2, 4, 8]
    assert parent.value == parent.user_attrs["metric_values"]["accuracy"]
    assert not any("@rank" in k for k in parent.user_attrs["metric_values"])
    ranks = _ranks(study)
    assert sorted(ranks) == [2, 4] and len(study.trials) == 3
    for r, t in ranks.items():
        assert t.state == TrialState.COMPLETE and t.value == t.user_attrs["metric_values"]["accuracy"]
        assert ({k: v for k, v in t.params.items() if k != "rank"}
                == {k: v for k, v in parent.params.items() if k != "rank"})
        assert t.user_attrs["lora_config"]["rank"] == r and t.user_attrs["lora_config"]["alpha"] == 2.0 * r
        assert t.user_attrs["fidelity"] == {**parent.user_attrs["fidelity"], "rank": r, "trained_rank": 8}
        assert t.user_attrs["target_modules"] == parent.user_attrs["target_modules"]
        # 13 adapted layers; the trained head (16*3 + 3) does not shrink with the rank
        lora_at_8 = parent.user_attrs["trainable_params"] - 51
        assert t.user_attrs["trainable_params"] == lora_at_8 * r // 8 + 51
        assert t.user_attrs["adapter_bytes"] == parent.user_attrs["adapter_bytes"] * r // 8
        assert sorted(t.intermediate_values) == sorted(parent.intermediate_values)  # every evaluation scored it
        assert "train_seconds" not in t.user_attrs and t.user_attrs["train_steps"] == parent.user_attrs["train_steps"]


def test_the_rank_r_result_without_nested_dropout_equals_a_normal_trial_with_the_same_seed(toy_task):
    nested = FixedTrial(PARAMS)
    off = _objective(toy_task, space={**SPACE, "rank": {"nested": [2, 4, 8], "nested_dropout": False}})
    value = off(nested)
    plain = FixedTrial(PARAMS)
    expected = _objective(toy_task, space={**SPACE, "rank": {"choices": [2, 4, 8]}})(plain)
    assert value == expected
    assert nested.user_attrs["metric_values"] == plain.user_attrs["metric_values"]
    assert nested.user_attrs["lora_config"] == plain.user_attrs["lora_config"]


def test_confirming_a_nested_rank_trains_its_parent_again_and_reads_its_rank(toy_task):
    objective = _objective(toy_task, train={"epochs": 2})
    study = _study(objective)
    ranks = _ranks(study)
    runs = confirm_top(study, objective, top=3, seeds=1)  # the parent (rank 8) and its ranks 2 and 4
    by_original = {r.user_attrs[CONFIRM_OF]: r for r in runs}
    assert sorted(by_original) == [0, *sorted(t.number for t in ranks.values())]
    # one training run of the parent's config with the new seed scored all three
    again = FixedTrial(PARAMS)
    again.set_user_attr(CONFIRM_OF, 0)
    again.set_user_attr(SEED, runs[0].user_attrs[SEED])
    value = objective(again)
    assert by_original[0].value == value
    for r, t in ranks.items():
        run = by_original[t.number]
        assert run.state == TrialState.COMPLETE and run.value == again.user_attrs[NESTED_RANK_VALUES][str(r)][0]
        assert run.params == t.params and run.user_attrs["lora_config"]["rank"] == r
        assert run.user_attrs["fidelity"]["rank"] == r
    assert len({by_original[t.number].value for t in ranks.values()} | {value}) > 1  # the ranks were told apart
    assert sum(CONFIRM_SHARED in r.user_attrs for r in runs) == 2
    assert record.account(study.trials).confirm == pytest.approx(1.0)  # the shared run is counted once
    assert confirm_top(study, objective, top=3, seeds=1) == []  # nothing is run twice


@pytest.mark.parametrize("ranks", [[4, 16], [2, 8]])
def test_confirming_the_baseline_under_nested_ranks_trains_it_again_plainly(tmp_path, toy_task, ranks):
    """The baseline trains rank 8 plainly. With a larger nested rank, its rank 8 lies outside the
    space's IntDistribution(16, 16) (confirming it crashed); with 8 the largest listed rank, its
    confirmation must not train nested ranks as the other trials of rank 8 do."""
    from lora_tune.study.run.runner import create_study, optimize

    spec = make_spec(study={"n_trials": 1, "baseline": True}, search_space={**SPACE, "rank": {"nested": ranks}})
    study = create_study(spec, f"sqlite:///{tmp_path / 's.db'}", task=toy_task)
    resolved = resolve_objective(spec, toy_task)
    optimize(study, resolved, task=toy_task)
    (baseline,) = study.trials  # n_trials: 1 runs the baseline only
    assert baseline.user_attrs["is_baseline"] and baseline.params["rank"] == 8
    assert "nested_ranks" not in baseline.user_attrs
    objective = Objective(resolved, toy_task)
    (run,) = confirm_top(study, objective, top=3, seeds=1)
    assert run.state == TrialState.COMPLETE and run.user_attrs[CONFIRM_OF] == baseline.number
    assert run.params == baseline.params and study.trials[-1].params == baseline.params
    assert "nested_ranks" not in run.user_attrs and not run.user_attrs["is_baseline"]
    again = FixedTrial(dict(baseline.params))  # the baseline's plain training with the run's seed
    again.set_user_attr("is_baseline", True)
    again.set_user_attr(SEED, run.user_attrs[SEED])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The value 8 of the parameter 'rank' is out of the range")
        assert run.value == objective(again)
    assert confirm_top(study, objective, top=3, seeds=1) == []


def test_a_pruned_trial_records_its_smaller_ranks_as_pruned_with_their_evaluations(toy_task):
    objective = _objective(toy_task, train={"epochs": 2, "evals_per_epoch": 3})
    study = _study(objective, pruner=optuna.pruners.ThresholdPruner(lower=1.01, n_warmup_steps=1))
    assert study.trials[0].state == TrialState.PRUNED
    ranks = _ranks(study)
    assert sorted(ranks) == [2, 4]
    for t in ranks.values():
        assert t.state == TrialState.PRUNED and t.value is None and sorted(t.intermediate_values) == [0, 1]


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_the_exported_best_at_rank_r_reloads_with_the_metric_it_was_scored_with(tmp_path, isolation):
    task = ToyTask()
    # with trainable_params as a second objective the smallest rank is on the Pareto front: it keeps its adapter
    objective = _objective(task, study={"metric": ["accuracy", "trainable_params"],
                                        "directions": ["maximize", "minimize"]},
                           train={"isolation": isolation})
    study = _study(objective, storage=f"sqlite:///{tmp_path / 's.db'}")
    smallest = _ranks(study)[2]
    assert adapter_artifacts(study, smallest)
    content = export_best(study, tmp_path / "best.yaml", trial_number=smallest.number, adapter_dir=tmp_path / "adapter")
    assert content["lora"]["rank"] == 2 and content["trial"]["params"]["rank"] == 2
    for fmt in content["adapter"]["formats"]:
        reloaded = load_adapter(task.build_model(), tmp_path / "adapter" / fmt)
        metrics = task.evaluate(reloaded, 64)
        assert metrics == smallest.user_attrs["metric_values"], fmt
        assert smallest.values == [metrics["accuracy"], smallest.user_attrs["trainable_params"]]


def test_samplers_and_a_database_take_the_added_trials_alongside_new_ones(tmp_path, toy_task):
    objective = _objective(toy_task)
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 's.db'}",
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    study.optimize(objective, n_trials=3)
    parents = [t for t in study.trials if NESTED_PARENT not in t.user_attrs]
    assert len(parents) == 3 and len(study.trials) == 9
    assert all(t.params["rank"] == 8 for t in parents)
    assert sorted(t.params["rank"] for t in study.trials) == [2, 2, 2, 4, 4, 4, 8, 8, 8]
    assert study.best_trial.value == max(t.value for t in study.trials)


def test_the_baseline_trains_its_conventional_rank_plainly(toy_task):
    space = SearchSpace.from_dict({**SPACE, "rank": {"nested": [4, 16, 32]}})
    params, problems = baseline_params(space, {}, "attention-qv")
    assert not problems and params["rank"] == 8 and params["alpha_ratio"] == 2.0
    objective = _objective(toy_task, space={**SPACE, "targets": {"choices": ["attention-qv", "all-linear"]}})
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({**PARAMS, "targets": "attention-qv"}, user_attrs={"is_baseline": True})
    study.optimize(objective, n_trials=1)
    assert len(study.trials) == 1 and "nested_ranks" not in study.trials[0].user_attrs
    assert study.trials[0].user_attrs["lora_config"]["rank"] == 8


# -- bad input ------------------------------------------------------------------------------------

def _validate(tmp_path, monkeypatch, space: dict):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "search_space": space, "study": {**BASE["study"], "baseline": False}}))
    return CliRunner().invoke(cli, ["validate", str(path)], catch_exceptions=False)


@pytest.mark.parametrize("ranks, where, message", [
    ([8, 4, 16], "search_space.rank.nested", "increasing order"),
    ([4, 4, 8], "search_space.rank.nested", "each once"),
    ([4, 8, 32], "search_space.rank.nested[2]", "above min(in, out) of every target"),  # the toy layers are 16 wide
])
def test_bad_nested_ranks_exit_2_naming_the_key(tmp_path, monkeypatch, ranks, where, message):
    result = _validate(tmp_path, monkeypatch, {**SPACE, "rank": {"nested": ranks}})
    assert result.exit_code == 2, result.output
    assert f"{where}: " in result.output and message in result.output


def test_fitting_nested_ranks_validate(tmp_path, monkeypatch):
    result = _validate(tmp_path, monkeypatch, {**SPACE, "rank": {"nested": [4, 8, 16]}})
    assert result.exit_code == 0, result.output


def test_other_nested_problems_name_their_key():
    assert check_search_space({"rank": {"nested": [4, 8]}, "init": "pissa"}, {})[0][0] == "search_space.init"
    assert check_search_space({"alpha": {"nested": [4, 8]}}, {})[0][0] == "search_space.alpha.nested"
    assert check_search_space({"rank": {"nested": [4]}}, {})[0][0] == "search_space.rank.nested"
    space = SearchSpace.from_dict({"rank": {"nested": [4, 8]}})
    trainer = SimpleNamespace(name="trainer", train_adapted=lambda *a, **k: None)
    assert nested_problems(space, trainer)[0][0] == "search_space.rank.nested"
    with pytest.raises(StudySpecError, match="search_space.rank.nested_dropout"):
        SearchSpace.from_dict({"rank": {"nested": [4, 8], "nested_dropout": "yes"}})


def test_nested_ranks_alpha_follows_the_space_at_each_rank():
    ratio = SearchSpace.from_dict({"rank": {"nested": [4, 8, 16]}, "alpha": {"ratio": [0.5, 2]}})
    assert ratio.nested_ranks({"rank": 16, "alpha_ratio": 2.0}).alphas == (8.0, 16.0, 32.0)
    fixed = SearchSpace.from_dict({"rank": {"nested": [4, 8, 16]}, "alpha": 16, "rslora": True})
    nested = fixed.nested_ranks({"rank": 16})
    assert nested.alphas == (16.0, 16.0, 16.0) and nested.rslora and math.isclose(nested.scaling_of(4), 8.0)
    assert fixed.nested_ranks({"rank": 8}) is None  # an enqueued trial with another rank trains it plainly
