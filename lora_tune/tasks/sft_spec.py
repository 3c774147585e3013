"""The ``sft`` spec: the checks of its keys (:func:`validate_spec`) and :class:`SFTSettings`, the
checked spec with its defaults. The keys are documented in :mod:`lora_tune.tasks.sft`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch

from lora_tune.models.tiny_lm import config_problems
from lora_tune.tasks.base import Field, Problems, check_spec, is_choice, is_fraction, is_int, is_str
from lora_tune.tasks.chat_data import FORMATS, TRAIN_ON, Columns, check_data_path
from lora_tune.tasks.generation import GenerateSettings, validate_generate
from lora_tune.tasks.hf import check_model_or_config, check_tokenizer_ref

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def is_inline_template(value: str) -> bool:
    """Whether a ``chat_template`` value is a Jinja template itself (else it names a file)."""
    return "{{" in value or "{%" in value


def _check_template(value: Any) -> str | None:
    not_text = is_str(value)
    if not_text:
        return not_text
    if is_inline_template(value) or Path(value).expanduser().is_file():
        return None
    return f"must be a Jinja template or the path of a file holding one; {value!r} is neither"


def _check_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _check_generate(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return None
    return f"must be a mapping (max_new_tokens, metric, max_examples), got {value!r}"


FIELDS = {
    "type": Field(is_choice(("sft",)), required=True),
    "model": Field(check_model_or_config, required=True, help="a local model directory or {config: {model_type: ...}}"),
    "tokenizer": Field(check_tokenizer_ref),
    "train_file": Field(check_data_path, required=True, help="a .jsonl/.json/.csv/.parquet file or save_to_disk dir"),
    "eval_file": Field(check_data_path),
    "eval_fraction": Field(is_fraction),
    "format": Field(is_choice(FORMATS)),
    "messages_column": Field(is_str),
    "prompt_column": Field(is_str),
    "completion_column": Field(is_str),
    "text_column": Field(is_str),
    "chat_template": Field(_check_template),
    "max_length": Field(is_int(2)),
    "train_on": Field(is_choice(TRAIN_ON)),
    "packing": Field(_check_bool),
    "dtype": Field(is_choice(tuple(DTYPES))),
    "max_train_examples": Field(is_int(1)),
    "max_eval_examples": Field(is_int(1)),
    "seed": Field(is_int(0)),
    "generate": Field(_check_generate),
}


def validate_spec(spec: Any) -> Problems:
    """Every problem of an ``sft`` spec; reads no data and loads no model."""
    problems = check_spec(spec, FIELDS)
    if not isinstance(spec, Mapping):
        return problems
    bad = {path for path, _ in problems}
    model = spec.get("model")
    if isinstance(model, Mapping) and "task.model" not in bad:
        problems += [(f"task.model.config.{key}", message) for key, message in config_problems(model["config"])]
        if spec.get("tokenizer") is None:
            problems.append(("task.tokenizer", "is required with model: {config: ...} (a tokenizer directory)"))
    if spec.get("eval_file") is not None and spec.get("eval_fraction") is not None:
        problems.append(("task.eval_fraction", "give either eval_file or eval_fraction, not both"))
    if spec.get("format") == "text":
        if spec.get("train_on") == "completion":
            problems.append(("task.train_on", "must be 'all' (or left out) with format: text, which has no completion"))
        if spec.get("generate") is not None:
            problems.append(("task.generate", "needs format messages or prompt-completion (a text has no prompt)"))
    if isinstance(spec.get("generate"), Mapping):
        problems += validate_generate(spec["generate"])
    return problems


@dataclass(frozen=True)
class SFTSettings:
    """A checked ``sft`` spec with its defaults (the module docstring lists the keys)."""

    model: str | Mapping[str, Any]
    train_file: str
    tokenizer: str | None = None
    eval_file: str | None = None
    eval_fraction: float = 0.1
    format: str | None = None
    columns: Columns = field(default_factory=Columns)
    chat_template: str | None = None
    max_length: int = 512
    train_on: str | None = None  # None: completion, or all for format text
    packing: bool = False
    dtype: str = "auto"
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    seed: int = 0
    generate: GenerateSettings | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> SFTSettings:
        given = {k: v for k, v in spec.items() if v is not None and k != "type"}
        names = {key: given.pop(f"{key}_column") for key in ("messages", "prompt", "completion", "text")
                 if f"{key}_column" in given}
        if "generate" in given:
            given["generate"] = GenerateSettings.from_spec(given["generate"])
        return cls(columns=Columns(**names), **given)
