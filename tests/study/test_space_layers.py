"""``layers`` in the search space, target coverage at validation and creation, and a trial that
trains on the chosen blocks (toy task: blocks.0 and blocks.1, an embed Linear and a head)."""
from __future__ import annotations

import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import FixedTrial

from lora_tune.cli.main import cli
from lora_tune.errors import StudySpecError
from lora_tune.study.run.runner import create_study, load_study, optimize, prepare_spec
from lora_tune.study.schema.space import SearchSpace, baseline_params
from tests.study.conftest import BASE, make_spec

LAYERS = {"choices": ["all", {"last": 1}, {"first": 1}, [0, 1]]}


def test_layers_choices_are_stored_as_labels_and_decoded_for_the_config():
    space = SearchSpace.from_dict({"layers": LAYERS, "targets": "attention"})
    assert space["layers"].choices == ["all", "last:1", "first:1", "0|1"]
    assert space.values_of("layers") == [None, {"last": 1}, {"first": 1}, [0, 1]]
    for label, value in [("last:1", {"last": 1}), ("all", None), ("0|1", [0, 1])]:
        assert space.suggest(FixedTrial({"layers": label})).layers == value
    assert space.grid()[0] == {"layers": ["all", "last:1", "first:1", "0|1"]}


def test_a_fixed_layers_mapping_is_a_plain_value():
    space = SearchSpace.from_dict({"layers": {"last": 2}})
    assert not space.sampled and space.suggest(FixedTrial({})).layers == {"last": 2}


def test_the_baseline_uses_every_block():
    space = SearchSpace.from_dict({"layers": LAYERS, "rank": 8})
    params, problems = baseline_params(space, {}, "attention-qv")
    assert params["layers"] == "all" and not problems


@pytest.mark.parametrize("layers, path, fragment", [
    ({"choices": [{"last": 0}]}, "search_space.layers.choices[0]", "an integer >= 1"),
    ({"choices": ["last:2", {"last": 2}]}, "search_space.layers.choices", "the same choice twice"),
    ({"type": "int", "low": 1, "high": 2}, "search_space.layers", "{'first': N} or {'last': N}"),
    ({"middle": 2}, "search_space.layers", "got {'middle': 2}; allowed: None or 'all'"),
    ("sometimes", "search_space.layers", "written 'last:4'"),
])
def test_bad_layers_in_a_space_name_the_path(layers, path, fragment):
    with pytest.raises(StudySpecError) as err:
        SearchSpace.from_dict({"layers": layers})
    ((where, message),) = err.value.errors
    assert where == path and fragment in message


def test_layers_the_model_does_not_have_are_a_problem_of_the_study_file(toy_task):
    spec = make_spec(search_space={**BASE["search_space"], "layers": {"choices": ["all", {"last": 3}, [5]]}})
    with pytest.raises(StudySpecError) as err:
        prepare_spec(spec, toy_task)
    messages = dict(err.value.errors)
    layer_errors = [m for p, m in err.value.errors if p == "search_space.layers"]
    assert len(layer_errors) == 2
    assert "'last:3' does not fit the task's model" in layer_errors[0] and "blocks has 2 blocks" in layer_errors[0]
    assert "'5' does not fit" in layer_errors[1] and "[5] is out of range" in layer_errors[1]
    assert "search_space.targets" not in messages


def test_create_stores_the_coverage_of_every_choice(tmp_path, toy_task):
    space = {**BASE["search_space"], "targets": {"choices": ["attention-qv", "all-linear"]}, "layers": LAYERS}
    study = create_study(make_spec(search_space=space), f"sqlite:///{tmp_path / 's.db'}", task=toy_task)
    coverage = study.user_attrs["target_coverage"]
    assert [(c["targets"], c["layers"]) for c in coverage] == [
        (t, layer) for layer in ("all", "last:1", "first:1", "0|1") for t in ("attention-qv", "all-linear")]
    by = {(c["targets"], c["layers"]): c for c in coverage}
    d = 16  # toy model: embed 8->16, two blocks of q/k/v/o 16x16 and fc1/fc2 16x32, head 16->3
    total = 8 * d + 2 * (4 * d * d + 2 * 2 * d * d) + d * 3
    qv = by[("attention-qv", "all")]
    assert qv["linear_weights"] == total and qv["adapted_weights"] == 2 * 2 * d * d and qv["modules"] == 4
    assert qv["share"] == pytest.approx(4 * d * d / total) and qv["blocks"] == {"blocks": [2, 2]}
    assert by[("attention-qv", "last:1")]["blocks"] == {"blocks": [1, 1]}
    assert by[("all-linear", "all")]["adapted_weights"] == total - d * 3  # all but the head
    assert by[("all-linear", "first:1")]["adapted_weights"] == 4 * d * d + 2 * 2 * d * d  # the embed is outside
    assert all(c["warnings"] == [] for c in coverage)


def test_trials_train_on_the_blocks_they_drew(tmp_path, toy_task):
    space = {"rank": 2, "targets": "all-linear", "layers": {"choices": [{"last": 1}, {"first": 1}]},
             "learning_rate": 1e-2}
    spec = make_spec(search_space=space, study={"n_trials": 2, "baseline": False,
                                                "sampler": {"type": "grid", "seed": 0}})
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_study(spec, url, task=toy_task)
    study, loaded = load_study(spec.study.name, url, allow_code=["tests.study.toy_task:*"])
    optimize(study, loaded, task=toy_task)
    trials = study.get_trials()
    assert sorted(t.params["layers"] for t in trials) == ["first:1", "last:1"]
    for trial in trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        block = 1 if trial.params["layers"] == "last:1" else 0
        assert trial.user_attrs["lora_config"]["layers"] == ({"last": 1} if block else {"first": 1})
        assert trial.user_attrs["target_modules"] == [f"blocks.{block}.{n}" for n in
                                                      ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")]


TOY_FILE = {
    "study": {"name": "cli-layers", "n_trials": 3, "sampler": {"type": "random", "seed": 0}, "baseline": False},
    "task": {"type": "python", "factory": "tests.study.toy_task:make_task"},
    "search_space": {"targets": {"choices": ["attention", ["blocks.1.q_proj", "blocks.1.k_proj"], ["b*1.q_proj"]]},
                     "layers": {"choices": ["all", {"last": 1}]}},
    "train": {"epochs": 1, "batch_size": 64, "device": "cpu", "threads": 1},
}


def test_validate_prints_the_coverage_and_warns_about_partial_matches(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(TOY_FILE))
    result = CliRunner().invoke(cli, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "  coverage (share of the model's linear weights each target choice adapts):" in lines
    assert any(line.startswith("    attention: 8 modules, 47.9% of the linear weights") for line in lines)
    assert any(line.startswith("    attention @ layers last:1: 4 modules") for line in lines)
    warnings = [line for line in lines if "warning:" in line]
    # 'b*1.q_proj' hits block 1 only, and names no block index: a partial match; the explicit
    # names do name their blocks
    assert len(warnings) == 1 and "['b*1.q_proj'] adapt layers in only 1 of the 2 blocks of blocks" in warnings[0]
