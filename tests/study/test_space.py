"""Search space -> trial.suggest_* calls, encodings, conditional parameters, grid, baseline."""
from __future__ import annotations

import optuna
import pytest
from optuna.trial import FixedTrial

from lora_tune.errors import StudySpecError
from lora_tune.study.schema.space import SearchSpace, baseline_params

SPACE = {
    "rank": {"type": "int", "low": 2, "high": 32, "log": True},
    "alpha": {"ratio": [0.5, 2]},
    "targets": {"choices": ["attention-qv", ["fc1", "fc2"]]},
    "quant_bits": {"choices": [None, 8, 4]},
    "quant_type": {"choices": ["nf4", "fp4"]},
    "method": "merged",
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "batch_size": {"choices": [16, 32]},
}


def test_fixed_trial_values_are_decoded():
    space = SearchSpace.from_spec(SPACE)
    values = space.sample(FixedTrial({"rank": 8, "alpha_ratio": 2.0, "targets": "fc1|fc2", "quant_bits": 4,
                                      "quant_type": "fp4", "learning_rate": 1e-3, "batch_size": 16}))
    assert values == {"rank": 8, "alpha": 16.0, "targets": ["fc1", "fc2"], "quant_bits": 4, "quant_type": "fp4",
                      "method": "merged", "learning_rate": 1e-3, "batch_size": 16}


def test_quant_type_is_sampled_only_with_4_bits():
    space = SearchSpace.from_spec(SPACE)
    values = space.sample(FixedTrial({"rank": 4, "alpha_ratio": 0.5, "targets": "attention-qv", "quant_bits": 0,
                                      "learning_rate": 1e-3, "batch_size": 32}))
    assert values["quant_bits"] is None and "quant_type" not in values
    assert values["alpha"] == 2.0 and values["targets"] == "attention-qv"


def test_real_study_stores_the_documented_parameter_names():
    space = SearchSpace.from_spec(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_bits = set()
    for _ in range(30):
        trial = study.ask()
        values = space.sample(trial)
        study.tell(trial, 0.0)
        params = study.trials[-1].params
        seen_bits.add(params["quant_bits"])
        assert set(params) >= {"rank", "alpha_ratio", "targets", "quant_bits", "learning_rate", "batch_size"}
        assert "alpha" not in params and "method" not in params  # derived / fixed
        assert ("quant_type" in params) == (params["quant_bits"] == 4)
        assert values["alpha"] == pytest.approx(params["alpha_ratio"] * params["rank"])
        assert 2 <= params["rank"] <= 32
        assert params["targets"] in ("attention-qv", "fc1|fc2")
    assert seen_bits == {0, 8, 4}


def test_single_choice_fixes_the_parameter():
    space = SearchSpace.from_spec({"rank": {"choices": [4]}, "dropout": 0.1})
    assert space.sampled == [] and space.sample(FixedTrial({})) == {"rank": 4, "dropout": 0.1}


def test_grid_enumerates_choices_and_stepped_ranges():
    space = SearchSpace.from_spec({"rank": {"type": "int", "low": 2, "high": 8, "step": 2},
                                   "quant_bits": {"choices": [None, 8]},
                                   "dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1}})
    grid, problems = space.grid()
    assert problems == []
    assert grid == {"rank": [2, 4, 6, 8], "quant_bits": [0, 8], "dropout": [0.0, 0.1, 0.2]}
    _, problems = SearchSpace.from_spec({"dropout": {"type": "float", "low": 0.0, "high": 0.2}}).grid()
    assert problems and problems[0][0] == "search_space.dropout"


def test_invalid_space_raises_with_paths():
    with pytest.raises(StudySpecError) as info:
        SearchSpace.from_spec({"rank": {"type": "float", "low": 1, "high": 2}, "quant_type": {"choices": ["nf5"]}})
    paths = [p for p, _ in info.value.errors]
    assert paths == ["search_space.rank.type", "search_space.quant_type.choices[0]"]


def test_baseline_uses_the_conventional_values_and_study_defaults():
    space = SearchSpace.from_spec(SPACE)
    params, problems = baseline_params(space, {"learning_rate": 2e-3, "batch_size": 64}, "attention-qv")
    assert problems == []
    # batch_size 64 is not a choice: the first choice is used; learning_rate is the train default
    assert params == {"rank": 8, "alpha_ratio": 2.0, "targets": "attention-qv", "quant_bits": 0,
                      "learning_rate": 2e-3, "batch_size": 16}


@pytest.mark.parametrize("key, entry, fragment", [
    ("rank", {"choices": [4, 16]}, "rank = 8"),
    ("rank", {"type": "int", "low": 16, "high": 64}, "rank = 8"),
    ("alpha", {"ratio": [1, 4]}, "alpha ratio = 2.0"),
    ("targets", {"choices": ["attention", "all-linear"]}, "targets = 'attention-qv'"),
    ("quant_bits", {"choices": [8, 4]}, "quant_bits = null"),
])
def test_baseline_outside_the_space_is_a_problem(key, entry, fragment):
    space = SearchSpace.from_spec({key: entry})
    _, problems = baseline_params(space, {}, "attention-qv")
    assert len(problems) == 1 and problems[0][0] == f"search_space.{key}"
    assert fragment in problems[0][1] and "study.baseline: false" in problems[0][1]
