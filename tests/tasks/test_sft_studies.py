"""The shipped sft studies: sft-tiny validates and runs; sft-llama validates on a tiny stand-in model;
the shipped data and tokenizer are what studies/data/make_sft_data.py makes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lora_tune.cli.main import cli
from lora_tune.study.run.runner import prepare_spec
from lora_tune.study.schema.spec import check_spec, load_spec_file

pytestmark = pytest.mark.usefixtures("sft_cache")

ROOT = Path(__file__).resolve().parents[2]
STUDIES = ROOT / "studies"
DATA = STUDIES / "data" / "sft"


def _absolute_paths(task: dict) -> dict:
    """The study's data paths (relative to studies/) made absolute (the tests' copies lie elsewhere)."""
    for key in ("tokenizer", "train_file", "eval_file"):
        if isinstance(task.get(key), str) and not Path(task[key]).is_absolute():
            task[key] = str(STUDIES / task[key])
    return task


def test_sft_tiny_validates_against_its_task(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec, task, baseline = prepare_spec(load_spec_file(STUDIES / "sft-tiny.yaml"))
    assert task.name == "sft" and spec.metrics == ["eval_loss"] and spec.directions == ["minimize"]
    assert task.metrics == ("eval_loss", "perplexity", "exact_match")
    assert task.format == "messages" and len(task.train.examples) == 400 and len(task.eval.examples) == 60
    assert task.warnings == [] and baseline["targets"] == "attention-qv"


def test_sft_tiny_runs_with_a_small_budget(tmp_path, monkeypatch):
    data = yaml.safe_load((STUDIES / "sft-tiny.yaml").read_text())
    data["study"].update(n_trials=2, storage=f"sqlite:///{tmp_path / 'sft.db'}")
    data["train"].update(epochs=1)
    data["task"].update(max_train_examples=48, max_eval_examples=12)
    _absolute_paths(data["task"])
    path = tmp_path / "sft-tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.delenv("LORA_TUNE_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "2/2 trials finished" in result.output and "best trial" in result.output


def test_sft_llama_validates_with_a_tiny_stand_in_model(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from lora_tune.models.tiny_lm import save_tiny_model

    model_dir = save_tiny_model("llama", tmp_path / "Llama-3.2-1B-Instruct",
                                tokenizer=AutoTokenizer.from_pretrained(str(DATA / "tokenizer")))
    data = yaml.safe_load((STUDIES / "sft-llama.yaml").read_text())
    assert data["task"]["model"] == "../models/Llama-3.2-1B-Instruct" and data["task"]["dtype"] == "bfloat16"
    assert data["search_space"]["quant_bits"] == 4 and data["train"]["precision"] == "bf16"
    data["task"]["model"] = str(model_dir)
    _absolute_paths(data["task"])
    _, problems = check_spec(data)
    assert problems == []
    data["train"]["device"] = "cpu"  # what a machine without a GPU can check of the rest
    _, task, _ = prepare_spec(check_spec(data)[0])
    assert str(task.weight_dtype) == "torch.bfloat16" and task.format == "messages"


def test_shipped_data_is_what_the_script_makes(tmp_path, monkeypatch):
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("make_sft_data", STUDIES / "data" / "make_sft_data.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path)
    module.main()
    for name in ("train.jsonl", "eval.jsonl", "train-pc.jsonl", "eval-pc.jsonl", "tokenizer/tokenizer.json",
                 "tokenizer/tokenizer_config.json", "tokenizer/chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]
    assert any(len(r["messages"]) > 3 for r in rows) and any(r["messages"][0]["role"] == "system" for r in rows)
