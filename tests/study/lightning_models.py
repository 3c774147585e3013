"""A tiny lightning.pytorch module and trainer for the Lightning callback tests (imports lightning)."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from tests.study.callback_models import VOCAB, TokenSequences

MAX_STEPS = 6


class TinyLM(pl.LightningModule):
    """A bag-of-embeddings next-token model on TokenSequences batches; logs ``val_loss``."""

    def __init__(self, lr: float = 1e-2):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)
        self.embed.weight.requires_grad_(False)  # frozen, like a base model's weights
        self.lr = lr

    def _loss(self, batch: dict) -> torch.Tensor:
        logits = self.head(self.embed(batch["input_ids"][:, :-1]))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def fit(callback: Any, root: Any, max_steps: int = MAX_STEPS, **trainer_args: Any) -> pl.Trainer:
    """Fit TinyLM on 32 unshuffled TokenSequences (batches of 4), validating after every step."""
    settings = dict(accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=1, limit_val_batches=1,
                    num_sanity_val_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(root))
    settings.update(trainer_args)
    trainer = pl.Trainer(callbacks=[callback], **settings)
    train = torch.utils.data.DataLoader(TokenSequences(32, seed=0), batch_size=4, shuffle=False)
    val = torch.utils.data.DataLoader(TokenSequences(8, seed=1), batch_size=8)
    trainer.fit(TinyLM(), train, val)
    return trainer
