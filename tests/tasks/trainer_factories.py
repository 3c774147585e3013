"""Trainer factories for the ``trainer`` task tests: what a user's training script would hold.

``make_trainer`` builds a plain ``transformers.Trainer`` for causal-LM training on the project's
instruction data (prompt + completion as one text, loss on every token); ``make_sft_trainer``
builds TRL's ``SFTTrainer`` on the same data as chat messages. Both evaluate every
``eval_every`` steps, save nothing and report nowhere.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "studies" / "data" / "sft"


def _rows(name: str, n: int) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()][:n]


def _texts(name: str, n: int) -> list[str]:
    out = []
    for row in _rows(name, n):
        turns = row["messages"]
        out.append("\n".join(f"{t['role']}: {t['content']}" for t in turns))
    return out


class _Tokenized:
    """A list of tokenized causal-LM examples (labels = input ids)."""

    def __init__(self, tokenizer, texts: list[str], max_length: int):
        self.rows = []
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            self.rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _collate(tokenizer):
    def collate(rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        pad = tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return collate


def training_arguments(output_dir: str, eval_every: int, **overrides):
    from transformers import TrainingArguments

    values = dict(output_dir=output_dir, per_device_train_batch_size=8, per_device_eval_batch_size=16,
                  learning_rate=1e-3, num_train_epochs=1, eval_strategy="steps", eval_steps=eval_every,
                  save_strategy="no", report_to="none", logging_strategy="no", use_cpu=True,
                  dataloader_num_workers=0, disable_tqdm=True, seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


def make_trainer(model, tokenizer, params, callbacks, output_dir, n_train: int = 64, n_eval: int = 24,
                 max_length: int = 64, eval_every: int = 2, not_a_trainer: bool = False, explode: bool = False):
    from transformers import Trainer

    if explode:
        raise RuntimeError("the user's factory exploded")
    if not_a_trainer:
        return {"model": model}
    return Trainer(model=model, args=training_arguments(output_dir, eval_every),
                   train_dataset=_Tokenized(tokenizer, _texts("train.jsonl", n_train), max_length),
                   eval_dataset=_Tokenized(tokenizer, _texts("eval.jsonl", n_eval), max_length),
                   data_collator=_collate(tokenizer), callbacks=callbacks)


def make_sft_trainer(model, tokenizer, params, callbacks, output_dir, n_train: int = 64, n_eval: int = 24,
                     max_length: int = 64, eval_every: int = 2):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=output_dir, per_device_train_batch_size=8, per_device_eval_batch_size=16,
                     learning_rate=1e-3, num_train_epochs=1, eval_strategy="steps", eval_steps=eval_every,
                     save_strategy="no", report_to="none", logging_strategy="no", use_cpu=True,
                     dataloader_num_workers=0, disable_tqdm=True, seed=0, max_length=max_length,
                     gradient_checkpointing=False, assistant_only_loss=False)
    train = Dataset.from_list([{"messages": r["messages"]} for r in _rows("train.jsonl", n_train)])
    held_out = Dataset.from_list([{"messages": r["messages"]} for r in _rows("eval.jsonl", n_eval)])
    return SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                      processing_class=tokenizer, callbacks=callbacks)
