"""Warm starts, confirmed winners, fidelity (steps and data fraction) and the compute report."""
from __future__ import annotations

import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from lora_tune.cli.main import cli
from lora_tune.errors import ConfigError, StudySpecError
from lora_tune.export import choose_trial
from lora_tune.study.trial import record
from lora_tune.study.trial.confirm import best_confirmed, config_groups, confirm_top, within_noise
from lora_tune.study.trial.objective import Objective
from lora_tune.study.trial.record import CONFIRM_OF, ENQUEUED_PARAMS, SEED, WARM_START
from lora_tune.study.run.runner import create_study, optimize
from lora_tune.study.schema.space import SearchSpace
from lora_tune.study.schema.spec import resolve_objective
from lora_tune.study.schema.templates import LEARNING_RATES, TYPICAL_LEARNING_RATE
from lora_tune.study.run.warm_start import configs_from_study, prior, project, warm_start
from lora_tune.tasks.base import MODEL_KINDS
from tests.study.conftest import BASE, make_spec
from tests.study.toy_task import ToyTask


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'plan.db'}"


def _finished(study):
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]


def test_warm_start_defaults_enqueues_the_prior_projected_onto_the_space(url, toy_task):
    space = {"rank": {"choices": [4, 8, 16]}, "alpha": {"ratio": [1, 2]},
             "targets": {"choices": ["attention-qv", "attention", "all-linear"]},
             "learning_rate": {"type": "float", "low": 3e-4, "high": 3e-2, "log": True}}
    study = create_study(make_spec(study={"warm_start": "defaults"}, search_space=space), url, task=toy_task)
    warm = [t for t in study.get_trials(states=(TrialState.WAITING,)) if WARM_START in t.user_attrs]
    params = [t.user_attrs[ENQUEUED_PARAMS] for t in warm]
    # the toy task is a decoder: prior 0 is rank 16, alpha 32 (ratio 2), all-linear, lr 2e-4
    # clamped to the space's 3e-4; prior 1 is rank 8, alpha 16 on attention at 2 x 2e-4
    assert params[0] == {"rank": 16, "alpha_ratio": 2, "targets": "all-linear", "learning_rate": 3e-4}
    assert params[1] == {"rank": 8, "alpha_ratio": 2, "targets": "attention", "learning_rate": pytest.approx(4e-4)}
    assert len(params) == 2  # PRIOR[2]'s rank 32 is not a choice here: dropped, not a rank 16 twin
    again = create_study(make_spec(study={"warm_start": "defaults"}, search_space=space), url, resume=True,
                         task=toy_task)
    assert len([t for t in again.get_trials() if WARM_START in t.user_attrs]) == 2  # not enqueued twice


def test_warm_start_from_a_study_on_another_model_re_resolves_targets(url, toy_task):
    spec = make_spec(study={"n_trials": 3, "baseline": False})
    source = create_study(spec, url, name="source", task=toy_task)
    optimize(source, resolve_objective(spec, toy_task), task=toy_task)
    configs = configs_from_study(source)
    assert len(configs) == 3 and all("targets" in c and "rank" in c for c in configs)
    # another model that has no fc1/fc2: explicit target lists naming them cannot be warm-started
    space = SearchSpace.from_spec(BASE["search_space"])
    kept = [project(space, c, fits=lambda targets: "fc1" not in str(targets)) for c in configs]
    assert all(k is None for k, c in zip(kept, configs) if "fc1" in str(c["targets"]))
    target = create_study(make_spec(study={"baseline": False}), url, name="target", task=toy_task)
    added = warm_start(target, space, configs, toy_task, origin="study source")
    assert added == len({str(c) for c in configs})
    assert warm_start(target, space, configs, toy_task, origin="study source") == 0  # duplicates skipped


def test_confirm_reruns_the_top_configs_with_new_seeds_and_export_takes_the_best_mean(url, toy_task):
    spec = make_spec(study={"n_trials": 4})
    study = create_study(spec, url, task=toy_task)
    resolved = resolve_objective(spec, toy_task)
    optimize(study, resolved, task=toy_task)
    runs = confirm_top(study, Objective(resolved, toy_task), top=2, seeds=2)
    assert len(runs) == 4 and all(r.state == TrialState.COMPLETE for r in runs)
    assert sorted({r.user_attrs[SEED] for r in runs}) == [1000, 2000]
    assert confirm_top(study, Objective(resolved, toy_task), top=2, seeds=2) == []  # already done
    groups = [g for g in config_groups(study) if len(g.values) > 1]
    assert len(groups) == 2
    for g in groups:
        values = [g.trial.value] + [r.value for r in runs if r.user_attrs[CONFIRM_OF] == g.trial.number]
        assert g.values == tuple(values)
        assert g.mean == pytest.approx(sum(values) / 3)
    best = best_confirmed(study)
    assert best.mean == max(g.mean for g in groups)
    assert choose_trial(study).number == best.trial.number
    assert within_noise(best, best.mean + best.std) and not within_noise(best, best.mean + 3 * best.std + 1e-9)
    c = record.account(study.trials)
    assert c.confirm == pytest.approx(4.0) and c.results == 8


def test_fidelity_data_fraction_and_min_steps_are_respected_and_recorded(url, toy_task):
    spec = make_spec(study={"n_trials": 2, "baseline": False, "fidelity": {"data_fraction": 0.5, "min_steps": 3}},
                     train={"batch_size": 16, "evals_per_epoch": 3})
    study = create_study(spec, url, task=toy_task)

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    study.pruner = AlwaysPrune()
    optimize(study, resolve_objective(spec, toy_task), task=toy_task)
    for t in _finished(study):
        # 192 examples / 16 = 12 batches an epoch, half of them: 6 steps; no decision before step 3
        assert t.user_attrs["planned_steps"] == 6 and t.user_attrs["fidelity"]["data_fraction"] == 0.5
        assert t.state == TrialState.PRUNED and t.user_attrs["train_steps"] == 4
        assert len(t.intermediate_values) == 2  # evaluations after steps 2 and 4
    c = record.account(study.trials)
    assert c.used == pytest.approx(2 * (4 / 6) * 0.5) and c.saved == pytest.approx(1 - c.used / 2)


@pytest.mark.parametrize("fidelity", [{"data_fraction": 0}, {"data_fraction": 1.5}, {"data_fraction": [1.0, 0.5]},
                                      {"min_steps": 0}])
def test_bad_fidelity_is_refused_naming_the_key(fidelity):
    with pytest.raises(StudySpecError) as info:
        make_spec(study={"fidelity": fidelity})
    assert any(p.startswith("study.fidelity") for p, _ in info.value.errors)


def _study_file(tmp_path, **study) -> str:
    data = {**BASE, "study": {**BASE["study"], **study}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_run_confirms_reports_compute_and_refuses_a_missing_warm_start_study(tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_TUNE_STORAGE", raising=False)
    storage = f"sqlite:///{tmp_path / 'cli.db'}"
    path = _study_file(tmp_path, n_trials=3, confirm={"top": 1, "seeds": 2})
    missing = CliRunner().invoke(cli, ["run", path, "--storage", storage, "--warm-start", "nope"])
    assert missing.exit_code == 2 and "nope" in missing.output
    assert optuna.get_all_study_names(storage) == [] if (tmp_path / "cli.db").exists() else True
    result = CliRunner().invoke(cli, ["run", path, "--storage", storage], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "confirmation: 2 run(s) of the top 1 config(s)" in result.output
    assert "compute:" in result.output and "full-trial equivalents" in result.output
    assert "best confirmed config" in result.output
    again = CliRunner().invoke(cli, ["run", _study_file(tmp_path, name="second", n_trials=2), "--storage", storage,
                                     "--warm-start", "toy"], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert "warm start: " in again.output


def test_prior_is_the_documented_recipe():
    first = prior("decoder")[0]
    assert first["rank"] == 16 and first["alpha"] == 2 * first["rank"] and first["targets"] == "all-linear"
    assert first["learning_rate"] == pytest.approx(2e-4)  # QLoRA's learning rate for a decoder LLM


def test_prior_learning_rates_follow_the_model_kind():
    assert set(TYPICAL_LEARNING_RATE) == set(LEARNING_RATES) == set(MODEL_KINDS)
    for kind in MODEL_KINDS:
        low, high = LEARNING_RATES[kind]
        assert low < TYPICAL_LEARNING_RATE[kind] < high  # lora-tune init's range spans the typical rate
    # 1x, 2x and 1/2x the kind's typical rate: a small encoder trains LoRA faster than a decoder LLM
    expected = {"decoder": [2e-4, 4e-4, 1e-4], "encoder": [1e-3, 2e-3, 5e-4], "vision": [5e-3, 1e-2, 2.5e-3]}
    for kind, rates in expected.items():
        assert [c["learning_rate"] for c in prior(kind)] == pytest.approx(rates)
    with pytest.raises(ConfigError, match="model_kind"):
        prior("llm")


def test_warm_start_defaults_uses_the_task_model_kind(url, toy_task, monkeypatch):
    monkeypatch.setattr(toy_task, "model_kind", "encoder", raising=False)
    space = {"rank": {"choices": [8, 16]}, "alpha": {"ratio": [1, 2]},
             "targets": {"choices": ["attention", "all-linear"]},
             "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}}
    spec = make_spec(study={"warm_start": "defaults", "baseline": False}, search_space=space)
    study = create_study(spec, url, task=toy_task)
    params = [t.user_attrs[ENQUEUED_PARAMS] for t in study.get_trials() if WARM_START in t.user_attrs]
    assert [(p["rank"], p["targets"]) for p in params] == [(16, "all-linear"), (8, "attention")]
    assert [p["learning_rate"] for p in params] == pytest.approx([1e-3, 2e-3])  # the encoder's, not 2e-4, 4e-4


def test_toy_task_fixture_is_the_toy(toy_task):
    assert isinstance(toy_task, ToyTask)


def test_results_outside_the_budget_are_nested_results_and_confirmation_runs():
    from optuna.trial import FixedTrial

    def kind(**attrs):
        trial = FixedTrial({})
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return record.kind_of(trial), record.in_budget(trial)

    assert kind() == (record.Kind.BUDGET, True)
    assert kind(is_baseline=True) == (record.Kind.BASELINE, True)
    assert kind(is_baseline=False, nested_parent=3) == (record.Kind.NESTED, False)
    # a confirmation run of the baseline trains as the baseline did, but is a confirmation run
    assert kind(is_baseline=True, confirm_of=0, seed=1000) == (record.Kind.CONFIRMATION, False)


def test_confirmation_runs_do_not_use_the_budget(url, toy_task):
    from lora_tune.study.storage.budget import budget_done, budget_used

    spec = make_spec(study={"n_trials": 3})
    study = create_study(spec, url, task=toy_task)
    resolved = resolve_objective(spec, toy_task)
    optimize(study, resolved, task=toy_task)
    confirm_top(study, Objective(resolved, toy_task), top=1, seeds=2)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 5 and budget_used(trials) == budget_done(trials) == 3
