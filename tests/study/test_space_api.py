"""The search space for your own objective: SearchSpace.from_file / from_dict, space.suggest(trial)
-> LoraConfig and space.suggest_training(trial), with the trial parameters of lora-tune's own
studies; and the runnable example examples/own_objective.py."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import FixedTrial

import lora_tune
from lora_tune import ConfigError, LoraConfig, SearchSpace, StudySpecError
from lora_tune.study.schema.space import KEYS, LORA_DEFAULTS, TRAIN_KEYS

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "studies" / "quickstart.yaml"

SPACE = {
    "rank": {"type": "int", "low": 2, "high": 32, "log": True},
    "alpha": {"ratio": [0.5, 2]},
    "targets": {"choices": ["attention-qv", ["fc1", "fc2"]]},
    "quant_bits": {"choices": [None, 8, 4]},
    "quant_type": {"choices": ["nf4", "fp4"]},
    "dropout": {"type": "float", "low": 0.0, "high": 0.2},
    "method": "merged",
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "batch_size": {"choices": [16, 32]},
}


def test_from_file_reads_the_quickstart_study():
    space = SearchSpace.from_file(QUICKSTART)
    section = yaml.safe_load(QUICKSTART.read_text())["search_space"]
    assert space == SearchSpace.from_spec(section)
    assert [p.name for p in space.sampled] == ["rank", "alpha_ratio", "targets", "quant_bits", "dropout",
                                                "learning_rate"]


def test_a_study_file_and_a_bare_search_space_give_the_same_space(tmp_path):
    study = tmp_path / "study.yaml"
    # the task section is not looked at: its data file does not exist
    study.write_text(yaml.safe_dump({"study": {"name": "x"}, "task": {"type": "causal-lm", "train_file": "missing.txt"},
                                     "search_space": SPACE, "train": {"epochs": 1}}, sort_keys=False))
    bare = tmp_path / "space.yaml"
    bare.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    from_study, from_bare = SearchSpace.from_file(study), SearchSpace.from_file(bare)
    assert from_study == from_bare == SearchSpace.from_dict(SPACE) == SearchSpace.from_dict({"search_space": SPACE})
    assert [p.key for p in from_study.params][:3] == ["rank", "alpha", "targets"]
    # a study file without a search space: every trial is LoraConfig's defaults
    empty = SearchSpace.from_dict({"study": {"name": "x"}, "task": {"type": "digits"}})
    assert empty.params == [] and empty.suggest(FixedTrial({})) == LoraConfig()


@pytest.mark.parametrize("text, path, fragment", [
    ("search_space:\n  rank: {type: int, low: 0, high: 8}\n", "search_space.rank.low", "≥ 1"),
    ("search_space:\n  rnak: {choices: [4, 8]}\n", "search_space.rnak", "unknown parameter"),
    ("rank: {choices: [4, 4]}\n", "search_space.rank.choices", "same choice twice"),
    ("study: {name: x}\nsearch-space:\n  rank: 8\n", "search-space", "unknown key; allowed: study, task, search_space"),
    ("search_space: [rank]\n", "search_space", "must be a mapping"),
    ("search_space:\n  rank: 4\n  rank: 8\n", "line 3, column 3", "duplicate key 'rank'"),
    ("search_space: {rank: [\n", "line 2, column 1", "not valid YAML"),
    ("", "(file)", "got empty"),
    ("- rank\n", "(file)", "got list"),
])
def test_bad_files_name_the_file_and_the_key(tmp_path, text, path, fragment):
    file = tmp_path / "study.yaml"
    file.write_text(text)
    with pytest.raises(StudySpecError) as err:
        SearchSpace.from_file(file)
    assert err.value.source == str(file) and str(file) in str(err.value)
    assert [p for p, _ in err.value.errors][0] == path
    assert fragment in str(err.value)


def test_every_problem_at_once_and_a_missing_file(tmp_path):
    with pytest.raises(StudySpecError) as err:
        SearchSpace.from_dict({"rank": {"type": "float", "low": 1, "high": 2}, "quant_type": {"choices": ["nf5"]}})
    assert [p for p, _ in err.value.errors] == ["search_space.rank.type", "search_space.quant_type.choices[0]"]
    with pytest.raises(StudySpecError, match="no such file"):
        SearchSpace.from_file(tmp_path / "absent.yaml")
    with pytest.raises(StudySpecError, match="expected a mapping"):
        SearchSpace.from_dict(["rank"])


def test_suggest_gives_a_lora_config_and_suggest_training_the_rest():
    space = SearchSpace.from_dict(SPACE)
    trial = FixedTrial({"rank": 8, "alpha_ratio": 2.0, "targets": "fc1|fc2", "quant_bits": 4, "quant_type": "fp4",
                        "dropout": 0.1, "learning_rate": 1e-3, "batch_size": 16})
    config = space.suggest(trial)
    assert config == LoraConfig(rank=8, alpha=16.0, targets=["fc1", "fc2"], quant_bits=4, quant_type="fp4",
                                dropout=0.1, method="merged")
    assert space.suggest_training(trial) == {"learning_rate": 1e-3, "batch_size": 16}
    # together they are what the study driver samples
    assert {**config.to_dict(), **space.suggest_training(trial)} == {**config.to_dict(), **space.sample(trial)}
    # quant_type is a parameter only with 4 bits; an unsampled field keeps LoraConfig's default
    config = space.suggest(FixedTrial({"rank": 4, "alpha_ratio": 0.5, "targets": "attention-qv", "quant_bits": 0,
                                       "dropout": 0.0}))
    assert config.quant_bits is None and config.quant_type == LoraConfig().quant_type and config.alpha == 2.0


def test_suggest_with_fixed_fields():
    space = SearchSpace.from_dict({"rank": {"choices": [4, 8]}})
    config = space.suggest(FixedTrial({"rank": 4}), modules_to_save=["classifier"], targets=["q", "v"])
    assert config.modules_to_save == ["classifier"] and config.targets == ["q", "v"] and config.rank == 4
    with pytest.raises(ConfigError, match="already sets 'rank'"):
        space.suggest(FixedTrial({"rank": 4}), rank=16)
    with pytest.raises(ConfigError, match="fields of LoraConfig"):
        space.suggest(FixedTrial({"rank": 4}), rnak=16)


def test_own_objective_and_the_driver_store_the_same_parameters():
    """Same sampler seed, one study sampling as lora-tune's driver does (space.sample), one as a
    user's objective does (suggest + suggest_training): the same parameters and distributions."""
    space = SearchSpace.from_dict(SPACE)

    def run(objective):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
        study.optimize(objective, n_trials=25)
        return study.trials

    def driver(trial):
        space.sample(trial)
        return 0.0

    seen = []

    def own(trial):
        config, train = space.suggest(trial), space.suggest_training(trial)
        seen.append((trial.params, config, train))
        return 0.0

    theirs, ours = run(driver), run(own)
    assert [t.params for t in ours] == [t.params for t in theirs]
    assert [t.distributions for t in ours] == [t.distributions for t in theirs]
    assert {t.params["quant_bits"] for t in ours} == {0, 4, 8}
    for params, config, train in seen:
        assert config.rank == params["rank"] and config.alpha == pytest.approx(params["alpha_ratio"] * params["rank"])
        assert config.quant_bits == (params["quant_bits"] or None)
        assert ("quant_type" in params) == (config.quant_bits == 4)
        assert train == {"learning_rate": params["learning_rate"], "batch_size": params["batch_size"]}
        # a finished trial replays to the same config
        assert space.suggest(FixedTrial(params)) == config


def test_defaults_come_from_lora_config():
    assert dict(LORA_DEFAULTS) == LoraConfig().to_dict()
    lora_keys = set(KEYS) - set(TRAIN_KEYS)
    assert lora_keys <= {f.name for f in dataclasses.fields(LoraConfig)}


def test_search_space_is_exported_lazily_without_optuna():
    code = ("import sys, lora_tune; assert 'optuna' not in sys.modules and 'torch' not in sys.modules; "
            "lora_tune.SearchSpace; assert 'optuna' not in sys.modules, 'space imports optuna'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    assert "SearchSpace" in lora_tune.__all__


@pytest.mark.parametrize("args", [[], ["--peft"]], ids=["inject", "peft"])
def test_the_example_runs(args):
    pytest.importorskip("transformers")
    if args:
        pytest.importorskip("peft")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "own_objective.py"), "--trials", "4", *args],
                         check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("trial ") for line in lines) == 4
    base = float(lines[0].split()[-1])
    best = float(lines[-1].split("eval_loss ")[1].split()[0])
    assert lines[-1].startswith("best trial #") and "LoraConfig(rank=" in lines[-1]
    assert best < base   # training the adapter helped
