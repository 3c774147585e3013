"""A model directory never runs code: no ``auto_map`` code, no unpickling (issue 16).

Real transformers on real directories: a tiny Llama saved with ``save_pretrained``, then
changed the way a downloaded checkpoint can be (pickled weights; an ``auto_map`` with the
model's own Python files, which would write a marker when imported)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lora_tune.tasks.hf import MODEL_LOAD, check_model_ref, check_tokenizer_ref, resolve_model_ref

REPO = Path(__file__).resolve().parents[2]
SFT_DATA = REPO / "studies" / "data" / "sft"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from lora_tune.models.tiny_lm import save_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(str(SFT_DATA / "tokenizer"))
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama") / "model", tokenizer=tokenizer)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _with_custom_code(src: Path, dst: Path, marker: Path, model_type: str) -> Path:
    _copy(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_x.XConfig",
                                                   "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (dst / "config.json").write_text(json.dumps(config))
    for name in ("configuration_x.py", "modeling_x.py"):
        (dst / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return dst


def test_pickled_weights_are_refused_naming_the_file(llama_dir, tmp_path):
    from safetensors.torch import load_file

    pickled = _copy(llama_dir, tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    message = check_model_ref(str(pickled))
    assert message and "pytorch_model.bin" in message and "safetensors" in message
    assert check_model_ref(str(llama_dir)) is None
    # transformers itself refuses the pickle under lora-tune's load settings
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(str(pickled), **MODEL_LOAD)


def test_a_model_that_needs_its_own_code_is_refused_naming_auto_map(llama_dir, tmp_path):
    marker = tmp_path / "marker"
    custom = _with_custom_code(llama_dir, tmp_path / "custom", marker, model_type="x-model")
    message = check_model_ref(str(custom))
    assert message and "auto_map" in message and "trust_remote_code" in message
    tokenizer_config = json.loads((llama_dir / "tokenizer_config.json").read_text())
    tok = _copy(llama_dir, tmp_path / "tok")
    tokenizer_config.update(tokenizer_class="XTokenizer",
                            auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]})
    (tok / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert "auto_map" in (check_tokenizer_ref(str(tok)) or "")

    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "study": {"name": "custom", "n_trials": 1},
        "task": {"type": "sft", "model": str(custom), "tokenizer": str(SFT_DATA / "tokenizer"),
                 "train_file": str(SFT_DATA / "train.jsonl"), "eval_file": str(SFT_DATA / "eval.jsonl")},
        "search_space": {"rank": {"choices": [4]}},
    }))
    result = subprocess.run([sys.executable, "-m", "lora_tune.cli.main", "validate", str(study)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "task.model" in result.stderr and "auto_map" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_a_known_model_type_with_auto_map_loads_transformers_own_class(llama_dir, tmp_path):
    marker = tmp_path / "marker"
    custom = _with_custom_code(llama_dir, tmp_path / "custom", marker, model_type="llama")
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_ref(str(custom)), **MODEL_LOAD)
    assert type(model) is LlamaForCausalLM
    assert not marker.exists()


def test_every_from_pretrained_in_lora_tune_passes_the_safe_settings():
    """One place decides how lora-tune loads checkpoints: tasks.hf's *_LOAD settings."""
    unsafe = []
    for path in (REPO / "lora_tune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                spread = {k.value.id for k in node.keywords if k.arg is None and isinstance(k.value, ast.Name)}
                explicit = {k.arg: k.value for k in node.keywords if k.arg}
                safe = spread & {"MODEL_LOAD", "TOKENIZER_LOAD", "CONFIG_LOAD"} or (
                    isinstance(explicit.get("trust_remote_code"), ast.Constant)
                    and explicit["trust_remote_code"].value is False)
                if not safe:
                    unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not unsafe, unsafe
