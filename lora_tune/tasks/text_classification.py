"""``text-classification``: a Hugging Face encoder with a sequence-classification head.

Spec keys (``task:`` in a study file)::

    type: text-classification
    model: minilm                 # a local HF directory, 'minilm', or a hub id already cached locally
    train_file: data/train.csv    # .csv, .tsv or .jsonl
    eval_file: data/test.csv
    text_column: text             # default 'text'
    label_column: label           # default 'label'
    max_length: 128               # tokens per example (truncated)
    max_train_examples: 2000      # optional: a seeded random subset, in file order
    max_eval_examples: 500
    modules_to_save: [classifier] # optional; default: the freshly initialised head modules
    seed: 0                       # head initialisation and subsets

Labels are the distinct values of ``label_column`` in the training file, sorted (numerically when
they are all integers); an evaluation label never seen in training is an error. Texts are
tokenized once when the task is built; each batch is padded to its own longest example.
Metrics: ``accuracy`` (default, maximize) and ``macro_f1``.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from lora_tune.errors import ConfigError, clip, short
from lora_tune.tasks.base import (
    Field, ModelTemplate, Problems, Task, check_spec, classification_metrics, eval_mode, index_batches,
    is_choice, is_existing_file, is_int, is_str, is_str_list, majority_share, model_device, prior_loss,
)
from lora_tune.tasks.data_files import TABLE_SUFFIXES, read_columns, read_table
from lora_tune.tasks.hf import (MODEL_LOAD, TOKENIZER_LOAD, check_model_ref, fresh_module_names, quiet_transformers,
                                resolve_model_ref)

# Libraries a trial's child process needs: its fork server imports them once (study/trial/trial_process.py).
HEAVY_IMPORTS = ("transformers", "transformers.modeling_utils")

HEAD_NAMES = ("pre_classifier", "classifier", "score")

FIELDS = {
    "type": Field(is_choice(("text-classification",)), required=True),
    "model": Field(check_model_ref, required=True, help="a local model directory, 'minilm', or a cached hub id"),
    "train_file": Field(is_existing_file(TABLE_SUFFIXES), required=True, help="a .csv, .tsv or .jsonl file"),
    "eval_file": Field(is_existing_file(TABLE_SUFFIXES), required=True, help="a .csv, .tsv or .jsonl file"),
    "text_column": Field(is_str),
    "label_column": Field(is_str),
    "max_length": Field(is_int(2)),
    "max_train_examples": Field(is_int(1)),
    "max_eval_examples": Field(is_int(1)),
    "modules_to_save": Field(is_str_list),
    "seed": Field(is_int(0)),
}


def validate_spec(spec: Any) -> Problems:
    problems = check_spec(spec, FIELDS)
    if problems and any(p[0] == "task" for p in problems):
        return problems
    bad = {p for p, _ in problems}
    for file_key in ("train_file", "eval_file"):
        if f"task.{file_key}" in bad or spec.get(file_key) is None:
            continue
        try:
            columns = read_columns(spec[file_key], f"task.{file_key}")
        except ConfigError as exc:
            problems.append((f"task.{file_key}", f"cannot read {short(spec[file_key])}: {exc.hint or exc.allowed}"))
            continue
        except (OSError, ValueError) as exc:
            problems.append((f"task.{file_key}", f"cannot read {short(spec[file_key])}: {exc}"))
            continue
        for col_key, default in (("text_column", "text"), ("label_column", "label")):
            column = spec.get(col_key) or default
            if f"task.{col_key}" not in bad and isinstance(column, str) and column not in columns:
                problems.append((f"task.{col_key}", f"column {short(column)} is not in {short(spec[file_key])} "
                                                     f"(columns: {clip(', '.join(columns))})"))
    return problems


def _sorted_labels(values: list[str]) -> list[str]:
    try:
        return sorted(values, key=lambda v: int(v))
    except ValueError:
        return sorted(values)


def _subset(n: int, limit: int | None, seed: int) -> list[int]:
    if not limit or limit >= n:
        return list(range(n))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    return sorted(chosen.tolist())


class Encoded:
    """Token ids of a split, padded to the split's longest example, with lengths and labels."""

    def __init__(self, ids: list[list[int]], labels: list[int], pad_id: int):
        self.lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        width = int(self.lengths.max()) if ids else 1
        self.input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        for row, x in enumerate(ids):
            self.input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        self.attention_mask = (torch.arange(width)[None, :] < self.lengths[:, None]).long()
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        width = int(self.lengths[idx].max())
        return {"input_ids": self.input_ids[idx, :width], "attention_mask": self.attention_mask[idx, :width],
                "labels": self.labels[idx]}


class TextClassificationTask(Task):
    """See the module docstring."""

    name = "text-classification"
    metrics = ("accuracy", "macro_f1")
    default_metric = "accuracy"
    default_direction = "maximize"
    baseline_targets = "attention-qv"
    model_kind = "encoder"

    def __init__(self, spec: dict):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        text_col = spec.get("text_column") or "text"
        label_col = spec.get("label_column") or "label"
        self.max_length = int(spec.get("max_length") or 128)
        seed = int(spec.get("seed") or 0)
        train_rows = read_table(spec["train_file"], [text_col, label_col], "task.train_file")
        eval_rows = read_table(spec["eval_file"], [text_col, label_col], "task.eval_file")
        train_rows = [train_rows[i] for i in _subset(len(train_rows), spec.get("max_train_examples"), seed)]
        eval_rows = [eval_rows[i] for i in _subset(len(eval_rows), spec.get("max_eval_examples"), seed + 1)]
        if not train_rows or not eval_rows:
            raise ConfigError("task.train_file" if not train_rows else "task.eval_file", "(empty)",
                              "a table with at least one row")
        self.label_names = _sorted_labels(sorted({str(r[label_col]) for r in train_rows}))
        if len(self.label_names) < 2:
            raise ConfigError("task.label_column", label_col, "a column with at least two distinct labels",
                              f"found only {self.label_names} in {spec['train_file']!r}")
        label_ids = {name: i for i, name in enumerate(self.label_names)}
        unseen = sorted({str(r[label_col]) for r in eval_rows} - set(label_ids))
        if unseen:
            raise ConfigError("task.eval_file", spec["eval_file"], f"labels seen in train_file: {self.label_names}",
                              f"labels {unseen[:10]} appear only in the evaluation file")
        self.model_ref = resolve_model_ref(spec["model"])
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(self.model_ref, **TOKENIZER_LOAD)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    self.model_ref, num_labels=len(self.label_names), **MODEL_LOAD,
                    id2label=dict(enumerate(self.label_names)), label2id=label_ids,
                    ignore_mismatched_sizes=True, output_loading_info=True,
                )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        model.config.pad_token_id = pad_id

        def encode(rows: list[dict]) -> Encoded:
            out = tokenizer([str(r[text_col]) for r in rows], truncation=True, max_length=self.max_length)
            return Encoded(out["input_ids"], [label_ids[str(r[label_col])] for r in rows], pad_id)

        self.train = encode(train_rows)
        self.eval = encode(eval_rows)
        self.eval_order = torch.argsort(self.eval.lengths, descending=True)
        children = {n for n, _ in model.named_children()}
        mismatched = {k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys", ())}
        fresh = fresh_module_names(set(info.get("missing_keys", ())) | mismatched)
        default_save = sorted(set(fresh) | {n for n in HEAD_NAMES if n in children})
        self.modules_to_save = list(spec.get("modules_to_save") or default_save)
        self.template = ModelTemplate(model)
        self.resident = self.template.resident
        self.majority_accuracy = majority_share(self.eval.labels)
        self.prior_loss = prior_loss(self.train.labels)

    def build_model(self) -> torch.nn.Module:
        return self.template.fresh()

    def num_train_examples(self) -> int:
        return len(self.train)

    def train_batches(self, batch_size: int, seed: int, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        for idx in index_batches(len(self.train), batch_size, seed, epoch):
            yield self.train.batch(idx)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(out.logits.float(), batch["labels"])

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        device = model_device(model)
        preds = torch.empty(len(self.eval), dtype=torch.long)
        with eval_mode(model):
            for start in range(0, len(self.eval), batch_size):
                idx = self.eval_order[start:start + batch_size]
                batch = self.to_device(self.eval.batch(idx), device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                preds[idx] = logits.argmax(-1).cpu()
        return classification_metrics(preds, self.eval.labels, len(self.label_names))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_ref, "labels": self.label_names,
                "train_examples": len(self.train), "eval_examples": len(self.eval),
                "modules_to_save": self.modules_to_save}


def build(spec: dict) -> TextClassificationTask:
    return TextClassificationTask(spec)
