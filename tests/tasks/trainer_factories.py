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
                 max_length: int = 64, eval_every: int = 2, not_a_trainer: bool = False, explode: bool | str = False):
    from transformers import Trainer

    if explode:
        raise RuntimeError(explode if isinstance(explode, str) else "the user's factory exploded")
    if not_a_trainer:
        return {"model": model}
    return Trainer(model=model, args=training_arguments(output_dir, eval_every),
                   train_dataset=_Tokenized(tokenizer, _texts("train.jsonl", n_train), max_length),
                   eval_dataset=_Tokenized(tokenizer, _texts("eval.jsonl", n_eval), max_length),
                   data_collator=_collate(tokenizer), callbacks=callbacks)


def make_sft_trainer(model, tokenizer, params, callbacks, output_dir, n_train: int = 64, n_eval: int = 24,
                     max_length: int = 64, eval_every: int = 2, peft_config: bool = False,
                     wrap_in_peft: bool = False, model_init_kwargs: bool = False, save_to: str | None = None):
    """TRL's SFTTrainer as a script has it. The options are what scripts written for a plain run
    do: ``peft_config`` passes a PEFT LoraConfig to the trainer, ``wrap_in_peft`` makes the model
    a PeftModel itself, ``model_init_kwargs`` sets them on an instantiated model (TRL warns),
    ``save_to`` saves checkpoints every 2 steps into a directory of the script's own."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    saving = {"save_strategy": "steps", "save_steps": 2} if save_to else {"save_strategy": "no"}
    args = SFTConfig(output_dir=save_to or output_dir, per_device_train_batch_size=8, per_device_eval_batch_size=16,
                     learning_rate=1e-3, num_train_epochs=1, eval_strategy="steps", eval_steps=eval_every,
                     report_to="none", logging_strategy="no", use_cpu=True,
                     dataloader_num_workers=0, disable_tqdm=True, seed=0, max_length=max_length,
                     gradient_checkpointing=False, assistant_only_loss=False, **saving,
                     **({"model_init_kwargs": {"dtype": "float32"}} if model_init_kwargs else {}))
    train = Dataset.from_list([{"messages": r["messages"]} for r in _rows("train.jsonl", n_train)])
    held_out = Dataset.from_list([{"messages": r["messages"]} for r in _rows("eval.jsonl", n_eval)])
    lora = None
    if peft_config or wrap_in_peft:
        from peft import LoraConfig

        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if wrap_in_peft:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    return SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                      processing_class=tokenizer, callbacks=callbacks, peft_config=lora if peft_config else None)


def make_trl_script_trainer(model, tokenizer, params, callbacks, output_dir, argv):
    """A TrlParser script's main() turned into a factory: its command line comes from
    ``task.args: {argv: [...]}`` (the README's pattern)."""
    from dataclasses import dataclass, field

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer, TrlParser

    @dataclass
    class ScriptArguments:
        train_rows: int = field(default=64)
        eval_rows: int = field(default=24)

    script_args, training_args = TrlParser((ScriptArguments, SFTConfig)).parse_args_and_config(argv)
    training_args.output_dir = output_dir  # the script's own output_dir flag would do too: lora-tune replaces it
    train = Dataset.from_list([{"messages": r["messages"]} for r in _rows("train.jsonl", script_args.train_rows)])
    held_out = Dataset.from_list([{"messages": r["messages"]} for r in _rows("eval.jsonl", script_args.eval_rows)])
    return SFTTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=held_out,
                      processing_class=tokenizer, callbacks=callbacks)
