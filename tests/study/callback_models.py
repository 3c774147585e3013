"""Tiny Hugging Face training pieces for the callback tests (built from configs, nothing downloaded)."""
from __future__ import annotations

from typing import Any

import torch

VOCAB, LENGTH = 64, 16


class TokenSequences(torch.utils.data.Dataset):
    """Seeded random token sequences, right-padded to LENGTH (lengths 8..16): input_ids,
    attention_mask, and labels that ignore the padding."""

    def __init__(self, n: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=generator)
        self.lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = (torch.arange(LENGTH) < self.lengths[i]).long()
        ids = self.ids[i] * mask
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def non_padding_tokens(self) -> int:
        return int(self.lengths.sum())


def tiny_lora_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama of hidden size 64 with rank-4 LoRA on every linear layer."""
    from lora_tune import LoraConfig, inject
    from lora_tune.models.tiny_lm import causal_lm_from_config, tiny_config

    model = causal_lm_from_config(tiny_config("llama", vocab_size=VOCAB), seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject(model, LoraConfig(rank=4, alpha=8))
    return model


def training_args(output_dir: Any, **overrides: Any) -> Any:
    """TrainingArguments for a few CPU steps with an evaluation after every step."""
    from transformers import TrainingArguments

    settings = dict(output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4,
                    per_device_eval_batch_size=8, eval_strategy="steps", eval_steps=1, learning_rate=1e-2,
                    report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                    use_cpu=True, seed=0, dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(**settings)
