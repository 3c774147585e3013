"""The study file schema: valid files load, every problem is reported at once with its path."""
from __future__ import annotations

import pytest

from lora_tune.errors import StudySpecError
from lora_tune.study.schema.spec import load_spec_file, parse_spec_text, resolve_objective, validate_spec
from tests.study.conftest import make_spec

GOOD = """
study:
  name: s1
  metric: [accuracy, trainable_params]
  directions: [maximize, minimize]
  sampler: {type: nsga2, seed: 3}
  n_trials: 12
task: {type: digits, domain: flip}
search_space:
  rank: {type: int, low: 2, high: 64, log: true}
  alpha: {ratio: [0.5, 1, 2, 4]}
  targets: {choices: [attention-qv, attention, all-linear, [q_proj, v_proj]]}
  quant_bits: {choices: [null, 8, 4]}
  quant_type: {choices: [nf4, fp4]}
  method: parallel
  dropout: {type: float, low: 0.0, high: 0.2}
  learning_rate: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
  rslora: {choices: [false, true]}
train: {epochs: 2, batch_size: 16, evals_per_epoch: 3, seed: 1, device: cpu}
constraints: {max_trainable_params: 200000}
"""


def test_a_full_file_loads_with_its_values(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD)
    spec = load_spec_file(path)
    assert spec.study.sampler.type == "nsga2" and spec.study.sampler.seed == 3
    assert spec.metrics == ["accuracy", "trainable_params"]
    assert spec.directions == ["maximize", "minimize"]
    assert spec.train.evals_per_epoch == 3 and spec.train.learning_rate == 1e-3  # default kept
    assert spec.constraints.max_trainable_params == 200000
    assert spec.search_space["quant_bits"] == {"choices": [None, 8, 4]}
    assert spec.study.storage is None and spec.study.baseline is True


def test_every_error_is_reported_at_once_with_its_path():
    bad = """
study: {name: "bad name!", n_trials: 0, sampler: {type: foo}, bogus: 1, direction: up}
task: {type: digits, domain: sideways}
search_space:
  rank: {type: int, low: 0, high: 64, log: true}
  alpha: {ratio: [0.5, -1]}
  quant_bits: {choices: [null, 8, 3]}
  foo: 3
  dropout: {type: float, low: 0.3, high: 0.1}
  targets: {type: int, low: 1, high: 2}
train: {epochs: 0, nope: 1}
"""
    with pytest.raises(StudySpecError) as info:
        parse_spec_text(bad, source="bad.yaml")
    errors = dict(info.value.errors)
    assert errors["search_space.rank.low"] == "must be an integer ≥ 1, got 0"
    assert "allowed" in errors["study.name"]
    assert errors["study.n_trials"].startswith("must be ≥ 1")
    assert "'tpe'" in errors["study.sampler.type"] and "foo" in errors["study.sampler.type"]
    assert errors["study.bogus"].startswith("unknown key; allowed: name, storage")
    assert "'maximize'" in errors["study.direction"]
    assert errors["train.epochs"] == "must be an integer ≥ 1, got 0"
    assert errors["train.nope"].startswith("unknown key")
    assert errors["search_space.alpha.ratio[1]"] == "must be a number > 0, got -1"
    assert "null/None, 16 or 32 (no quantization), 8 or 4" in errors["search_space.quant_bits.choices[2]"]
    assert errors["search_space.foo"].startswith("unknown parameter; allowed: rank, alpha")
    assert errors["search_space.dropout.high"] == "must be ≥ low (0.3), got 0.1"
    assert "not a range" in errors["search_space.targets"]
    assert "task.domain" in errors
    assert len(info.value.errors) == 14
    assert str(info.value).startswith("bad.yaml: 14 error(s) in study file:")


@pytest.mark.parametrize("text, path, fragment", [
    ("study: [1, 2", "line", "not valid YAML"),
    ("- a\n- b\n", "(file)", "must be a YAML mapping"),
    ("", "(file)", "got empty"),
    ("study: {name: a}\n", "task", "is required"),
    ("study: {name: a, metric: [accuracy, macro_f1], direction: maximize}\ntask: {type: digits}\n",
     "study", "several metrics need `directions"),
    ("study: {name: a, metric: [accuracy, macro_f1], directions: [maximize]}\ntask: {type: digits}\n",
     "study", "one direction per metric"),
    ("study: {name: a, direction: maximize, directions: [maximize]}\ntask: {type: digits}\n",
     "study", "not both"),
    ("study: {name: a}\ntask: {type: digits}\nsearch_space: {rank: {choices: [4, 4]}}\n",
     "search_space.rank.choices", "same choice twice"),
    ("study: {name: a}\ntask: {type: digits}\nsearch_space: {rank: {type: int, low: 2, high: 8, step: 2, log: true}}\n",
     "search_space.rank.step", "log"),
    ("study: {name: a}\ntask: {type: digits}\nsearch_space: {dropout: {ratio: [1]}}\n",
     "search_space.dropout.ratio", "only `alpha`"),
    ("study: {name: a}\ntask: {type: digits}\nsearch_space: {rank: {choices: [2], low: 1}}\n",
     "search_space.rank", "cannot be combined with a range"),
    ("study: {name: a}\ntask: {type: digits}\nsearch_space: {rank: {choices: [2], lo: 1}}\n",
     "search_space.rank.lo", "unknown key"),
    ("study: {name: a}\ntask: {type: nope}\n", "task.type", "allowed"),
    ("study: {name: a, sampler: {type: grid}}\ntask: {type: digits}\nsearch_space: {dropout: {low: 0.0, high: 0.1}}\n",
     "search_space.dropout", "grid sampler"),
])
def test_single_problems_name_their_path(text, path, fragment):
    with pytest.raises(StudySpecError) as info:
        parse_spec_text(text)
    matches = [m for p, m in info.value.errors if p.startswith(path)]
    assert matches, info.value.errors
    assert any(fragment in m for m in matches), info.value.errors


def test_yaml_is_loaded_safely():
    with pytest.raises(StudySpecError) as info:
        parse_spec_text("study: !!python/object/apply:os.system ['echo hi']\n")
    assert "not valid YAML" in info.value.errors[0][1]


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(StudySpecError) as info:
        load_spec_file(tmp_path / "none.yaml")
    assert "no such file" in str(info.value)


def test_objective_defaults_come_from_the_task(toy_task):
    spec = resolve_objective(make_spec(), toy_task)
    assert spec.metrics == ["accuracy"] and spec.directions == ["maximize"]
    multi = resolve_objective(make_spec(study={"metric": ["macro_f1", "trainable_params"]}), toy_task)
    assert multi.directions == ["maximize", "minimize"] and multi.is_multi_objective


def test_unknown_metric_names_the_allowed_ones(toy_task):
    with pytest.raises(StudySpecError) as info:
        resolve_objective(make_spec(study={"metric": "bleu"}), toy_task)
    path, message = info.value.errors[0]
    assert path == "study.metric" and "accuracy, macro_f1, eval_loss, trainable_params" in message


def test_stored_spec_round_trips():
    spec = make_spec(constraints={"max_trainable_params": 10})
    again = validate_spec(spec.to_stored())
    assert again == spec


def test_a_key_given_twice_is_an_error_not_silently_the_last():
    with pytest.raises(StudySpecError, match=r"(?s)dup.yaml: .*line 3, column 3: not valid YAML: duplicate key 'name'"):
        parse_spec_text("study:\n  name: a\n  name: b\ntask: {type: digits}\n", source="dup.yaml")
