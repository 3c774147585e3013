"""One source for each setting: LoraConfig's and TrainConfig's field declarations
(lora_tune.settings) give the study file's train: section, the search space's keys, the quant_bits
encoding and the trainer task's TrainingArguments; a bad value reads the same from every place."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from lora_tune import ConfigError, LoraConfig
from lora_tune.errors import StudySpecError
from lora_tune.settings import Setting, defaults_of, settings_of
from lora_tune.study.schema.space import SearchSpace
from lora_tune.study.schema.space_keys import KEYS, TRAIN_KEYS, encode_choice
from lora_tune.study.schema.spec import DRIVER_TRAIN_KEYS, TrainSection, spec_from_stored, validate_spec
from lora_tune.train import TrainConfig
from tests.study.conftest import BASE

TRAIN = settings_of(TrainConfig)
LORA = settings_of(LoraConfig)


def test_the_train_section_is_trainconfigs_settings_and_the_drivers():
    fields = TrainSection.model_fields
    in_file = [name for name, rule in TRAIN.items() if rule.section is None]
    assert list(fields) == in_file + list(DRIVER_TRAIN_KEYS)
    assert "data_fraction" not in fields and TRAIN["data_fraction"].section == "study.fidelity"
    defaults = defaults_of(TrainConfig)
    for name in in_file:
        assert fields[name].default == defaults[name], name
    # the section's defaults make TrainConfig's defaults
    assert TrainSection().train_config() == TrainConfig()


def test_every_searchable_setting_is_a_space_key_and_nothing_else_is():
    searchable = [k for cls in (LoraConfig, TrainConfig) for k, rule in settings_of(cls).items() if rule.searchable]
    assert list(KEYS) == searchable
    assert tuple(k for k in searchable if k in TRAIN) == TRAIN_KEYS
    assert {"rank", "alpha", "dropout", "quant_bits", "learning_rate", "warmup_ratio"} <= set(KEYS)
    assert not {"seed", "device", "evals_per_epoch", "data_fraction", "exclude"} & set(KEYS)
    for key in KEYS:
        rule = (LORA | TRAIN)[key]
        assert KEYS[key].numeric == (rule.kind.__name__ if rule.kind in (int, float) and not rule.choices else None)


def _out_of_bounds(rule: Setting) -> list:
    """One value past each bound of a numeric setting (floats as floats: pydantic keeps them)."""
    step = 1 if rule.kind is int else 0.5
    out = []
    if rule.ge is not None:
        out.append(rule.kind(rule.ge - step))
    if rule.gt is not None:
        out.append(rule.kind(rule.gt))
    if rule.le is not None:
        out.append(rule.kind(rule.le + step))
    if rule.lt is not None:
        out.append(rule.kind(rule.lt))
    return out


BAD_TRAIN = [(name, value) for name, rule in TRAIN.items() if rule.section is None
             for value in (_out_of_bounds(rule) if rule.numeric else ["nope"] if rule.choices else [])]


def _file_problem(name: str, value) -> str:
    raw = {**BASE, "train": {**BASE["train"], name: value}}
    with pytest.raises(StudySpecError) as info:
        validate_spec(raw)
    return dict(info.value.errors)[f"train.{name}"]


def _space_problem(name: str, value) -> str:
    with pytest.raises(StudySpecError) as info:
        SearchSpace.from_dict({name: value})
    (path, message), = info.value.errors
    assert path == f"search_space.{name}"
    return message


@pytest.mark.parametrize("name, value", BAD_TRAIN)
def test_a_bad_training_value_reads_the_same_from_the_file_the_space_and_trainconfig(name, value):
    message = _file_problem(name, value)
    assert message == TRAIN[name].problem(value)
    if name in KEYS:
        assert _space_problem(name, value) == message
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{name: value})
    assert err.value.field == f"train.{name}" and err.value.allowed == TRAIN[name].allowed
    assert TRAIN[name].allowed in message


def test_the_three_checks_of_warmup_ratio_are_one():
    expected = "must be a number ≥ 0 and < 1, got 1.0"
    assert _file_problem("warmup_ratio", 1.0) == _space_problem("warmup_ratio", 1.0) == expected
    with pytest.raises(ConfigError, match=r"train\.warmup_ratio: got 1\.0; allowed: a number ≥ 0 and < 1"):
        TrainConfig(warmup_ratio=1.0)
    range_problems = dict(pytest.raises(StudySpecError, SearchSpace.from_dict,
                                        {"warmup_ratio": {"low": 0.0, "high": 1.0}}).value.errors)
    assert range_problems == {"search_space.warmup_ratio.high": expected}


@pytest.mark.parametrize("name, value", [("dropout", 1.0), ("dropout", -0.5), ("rank", 0), ("alpha", 0.0),
                                         ("quant_bits", 3), ("quant_bits", 4.0), ("method", "fast"),
                                         ("rslora", "yes")])
def test_a_bad_lora_value_reads_the_same_from_the_space_and_loraconfig(name, value):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**{name: value})
    assert err.value.field == name
    message = _space_problem(name, value)
    assert message == LORA[name].problem(value) and err.value.allowed in message


@pytest.mark.parametrize("bits, stored, config", [(None, 0, None), (16, 0, None), (32, 0, None), (8, 8, 8), (4, 4, 4)])
def test_quant_bits_mean_the_same_in_the_space_and_loraconfig(bits, stored, config):
    assert encode_choice("quant_bits", bits) == stored and LoraConfig(quant_bits=bits).quant_bits == config
    assert SearchSpace.from_dict({"quant_bits": bits}).suggest(None).quant_bits == config
    assert "16 or 32 (no quantization)" in _space_problem("quant_bits", 3)


def test_the_trainer_tasks_arguments_are_the_declared_trainingarguments_names():
    transformers = pytest.importorskip("transformers")
    from lora_tune.tasks.trainer import RENAMED, TRAINING_ARGUMENTS, training_overrides

    assert {k for k, rule in TRAIN.items() if rule.hf} == set(TRAINING_ARGUMENTS)
    args = transformers.TrainingArguments(output_dir="unused")
    config = TrainConfig(eval_steps=5, max_steps=3, gradient_checkpointing=True, precision="bf16")
    written = training_overrides(config, TRAINING_ARGUMENTS)
    for key, rule in TRAIN.items():
        for name in rule.hf:
            assert hasattr(args, name) or hasattr(args, RENAMED.get(name, name)), (key, name)
    assert set(written) >= {n for rule in TRAIN.values() for n in rule.hf}
    assert written["num_train_epochs"] == 3.0 and written["per_device_train_batch_size"] == 32


def test_a_stored_spec_from_before_loads():
    """A study created before the train: section was derived stored these keys; it still loads."""
    stored = {**BASE, "search_space": dict(BASE["search_space"]),
              "train": {"epochs": 2, "batch_size": 16, "learning_rate": 0.002, "lr_scheduler": "cosine",
                        "warmup_ratio": 0.1, "grad_clip": None, "isolation": "none", "oom": "halve_batch",
                        "threads": 1, "precision": "fp32", "optimizer": "adamw", "loraplus_lr_ratio": 16.0}}
    spec = spec_from_stored(stored)
    assert spec.train.model_fields_set == set(stored["train"])
    assert spec.train.train_config().lr_scheduler == "cosine" and spec.train.oom == "halve_batch"
    assert spec.to_stored()["train"] == stored["train"]


def test_validate_names_study_when_it_is_not_a_mapping(tmp_path):
    from lora_tune.cli.main import cli

    path = tmp_path / "s.yaml"
    path.write_text('study: "oops"\ntask: {type: digits}\n')
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "study: input should be a valid dictionary" in result.output and "'oops'" in result.output


def test_the_search_space_knows_the_study_file_sections():
    """space.py cannot import StudySpec (spec.py imports it): its copy of the names must agree."""
    from lora_tune.study.schema.space import STUDY_SECTIONS
    from lora_tune.study.schema.spec import StudySpec

    assert tuple(StudySpec.model_fields) == STUDY_SECTIONS
