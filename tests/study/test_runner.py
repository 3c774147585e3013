"""create / load / optimize on real storages (SQLite files, journal files)."""
from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from lora_tune.errors import ConfigError, StudyNotFoundError, StudySpecError
from lora_tune.study.run.runner import build_pruner, build_sampler, create_study, load_study, optimize
from lora_tune.study.schema.spec import resolve_objective
from lora_tune.study.storage.opening import dispose_storage
from tests.study.conftest import make_spec
from tests.study.toy_task import ToyTask


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'studies.db'}"


def _trials(study):
    return study.get_trials(deepcopy=False)


def test_create_stores_the_spec_and_enqueues_the_baseline_once(url, toy_task):
    spec = make_spec()
    study = create_study(spec, url, task=toy_task)
    stored = study.user_attrs["spec"]
    assert stored["study"]["metric"] == "accuracy" and stored["study"]["direction"] == "maximize"
    assert study.user_attrs["metrics"] == ["accuracy"] and study.metric_names == ["accuracy"]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs == {"is_baseline": True}
    assert waiting[0].system_attrs["fixed_params"] == {"rank": 8, "alpha_ratio": 2.0, "targets": "attention-qv",
                                                       "quant_bits": 0, "learning_rate": 1e-3}
    again = create_study(spec, url, resume=True, task=toy_task)
    assert len(again.get_trials(states=(TrialState.WAITING,))) == 1
    dispose_storage(study._storage)
    dispose_storage(again._storage)


def test_existing_study_needs_resume(url, toy_task):
    create_study(make_spec(), url, task=toy_task)
    with pytest.raises(ConfigError, match="--resume"):
        create_study(make_spec(), url, task=toy_task)


def test_resume_refuses_a_changed_search_space(url, toy_task):
    create_study(make_spec(), url, task=toy_task)
    changed = make_spec(search_space={"rank": {"choices": [8, 16]}})
    with pytest.raises(StudySpecError) as info:
        create_study(changed, url, resume=True, task=toy_task)
    assert [p for p, _ in info.value.errors] == ["search_space"]
    # a bigger budget is fine and is stored
    bigger = create_study(make_spec(study={"n_trials": 9}), url, resume=True, task=toy_task)
    assert bigger.user_attrs["spec"]["study"]["n_trials"] == 9


def test_invalid_spec_writes_nothing(tmp_path, toy_task):
    db = tmp_path / "nothing.db"
    spec = make_spec(search_space={"rank": {"choices": [4, 16]}})  # baseline rank 8 not in the space
    with pytest.raises(StudySpecError):
        create_study(spec, f"sqlite:///{db}", task=toy_task)
    with pytest.raises(StudySpecError):
        create_study(make_spec(study={"metric": "bleu"}), f"sqlite:///{db}", task=toy_task)
    assert not db.exists()


def test_load_unknown_study_lists_the_existing_ones(url, toy_task):
    create_study(make_spec(), url, name="alpha-study", task=toy_task)
    with pytest.raises(StudyNotFoundError) as info:
        load_study("beta", url)
    assert info.value.available == ["alpha-study"] and "alpha-study" in str(info.value)


def test_optimize_runs_the_budget_exactly_and_resumes(url, toy_task):
    spec = make_spec(study={"n_trials": 5})
    create_study(spec, url, task=toy_task)
    study, loaded = load_study("toy", url, allow_code=["tests.study.toy_task:*"])
    assert loaded.metrics == ["accuracy"]
    first = optimize(study, loaded, n_trials=2, task=toy_task)
    assert first.trials_run == 2 and first.stop_reason == "n_trials"
    rest = optimize(study, loaded, task=toy_task)
    assert rest.trials_run == 3 and rest.stop_reason == "budget"
    trials = _trials(study)
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.user_attrs["is_baseline"] for t in trials] == [True, False, False, False, False]
    assert optimize(study, loaded, task=toy_task).trials_run == 0
    dispose_storage(study._storage)


def test_failures_do_not_stop_the_study_but_a_run_of_them_does(url):
    task = ToyTask(fail_in="evaluate")
    spec = make_spec(study={"n_trials": 6, "max_consecutive_failures": 3})
    study = create_study(spec, url, task=task)
    result = optimize(study, spec, task=task)
    assert result.stop_reason == "failures" and result.trials_run == 3
    failed = _trials(study)
    assert [t.state for t in failed] == [TrialState.FAIL] * 3
    assert all(t.user_attrs["fail_reason"] == "ValueError: toy task: evaluate exploded" for t in failed)
    dispose_storage(study._storage)


def test_journal_storage_and_pruning_with_a_real_pruner(tmp_path, toy_task):
    spec = make_spec(study={"n_trials": 8, "pruner": {"type": "median", "options": {"n_startup_trials": 2}},
                            "sampler": {"type": "tpe", "seed": 1}},
                     train={"epochs": 2, "evals_per_epoch": 2})
    study = create_study(spec, f"journal:{tmp_path / 'j.log'}", task=toy_task)
    optimize(study, spec, task=toy_task)
    states = [t.state for t in _trials(study)]
    assert len(states) == 8 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}
    for t in _trials(study):
        assert len(t.intermediate_values) == (4 if t.state == TrialState.COMPLETE else len(t.intermediate_values))


def test_multi_objective_disables_pruning(toy_task, caplog):
    spec = resolve_objective(make_spec(study={"metric": ["accuracy", "trainable_params"],
                                              "pruner": {"type": "hyperband"}, "n_trials": 3}), toy_task)
    assert isinstance(build_pruner(spec), optuna.pruners.NopPruner)
    study = optuna.create_study(directions=spec.directions, sampler=build_sampler(spec))
    with caplog.at_level("WARNING", logger="lora_tune.study"):
        optimize(study, spec, task=toy_task)
    assert "pruning is disabled for multi-objective" in caplog.text
    assert all(len(t.values) == 2 and not t.intermediate_values for t in study.trials)


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid", "cmaes", "gp", "nsga2"])
def test_every_sampler_builds_seeded(sampler):
    space = {"rank": {"choices": [4, 8]}, "dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1}}
    spec = make_spec(study={"sampler": {"type": sampler, "seed": 7}, "metric": "accuracy", "direction": "maximize"},
                     search_space=space)
    built = build_sampler(spec)
    assert type(built).__name__.lower().startswith({"tpe": "tpe", "random": "random", "grid": "orderedgrid",
                                                    "cmaes": "cmaes", "gp": "gp", "nsga2": "nsgaii"}[sampler])


def test_sampler_and_pruner_options_are_checked():
    with pytest.raises(StudySpecError) as info:
        build_sampler(make_spec(study={"sampler": {"type": "tpe", "options": {"n_startup": 3}}}))
    assert info.value.errors[0][0] == "study.sampler.options.n_startup"
    assert "n_startup_trials" in info.value.errors[0][1]
    with pytest.raises(StudySpecError) as info:
        build_pruner(make_spec(study={"pruner": {"type": "sha", "options": {"reduction_factor": 1}}}))
    assert info.value.errors[0][0] == "study.pruner.options"
    pruner = build_pruner(make_spec(study={"pruner": {"type": "hyperband"}}, train={"epochs": 3, "evals_per_epoch": 2}))
    assert pruner._max_resource == 6


def test_sqlite_study_database_uses_wal(url, tmp_path, toy_task):
    import sqlite3

    study = create_study(make_spec(), url, task=toy_task)
    dispose_storage(study._storage)
    with sqlite3.connect(tmp_path / "studies.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_grid_study_stops_when_every_point_is_evaluated(url, toy_task):
    space = {"rank": {"choices": [4, 8]}, "targets": {"choices": ["attention-qv", "all-linear"]}}
    spec = make_spec(study={"n_trials": 10, "sampler": {"type": "grid", "seed": 0}}, search_space=space)
    study = create_study(spec, url, task=toy_task)
    result = optimize(study, spec, task=toy_task)
    points = sorted((t.params["rank"], t.params["targets"]) for t in _trials(study))
    assert result.stop_reason == "exhausted"
    assert points == [(4, "all-linear"), (4, "attention-qv"), (8, "all-linear"), (8, "attention-qv")]
    assert [t.user_attrs["is_baseline"] for t in _trials(study)][0] is True
    dispose_storage(study._storage)


def test_a_study_file_without_a_pruner_gets_hyperband_over_its_evaluations():
    import copy

    from lora_tune.study.schema.spec import validate_spec
    from tests.study.conftest import BASE

    raw = copy.deepcopy(BASE)
    del raw["study"]["pruner"]
    raw["train"].update(epochs=2, evals_per_epoch=3)
    spec = validate_spec(raw)
    assert spec.study.pruner.type == "hyperband"
    pruner = build_pruner(spec)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner) and pruner._max_resource == 6
