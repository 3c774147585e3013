"""What :func:`lora_tune.train.fit` needs of a task: the :class:`TrainTask` protocol."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

from lora_tune.train.callbacks import batch_examples


@runtime_checkable
class TrainTask(Protocol):
    def num_train_examples(self) -> int: ...

    def train_batches(self, batch_size: int, seed: int, epoch: int) -> Iterable[Any]:
        """One epoch of training batches in a deterministic order for ``(seed, epoch)``."""
        ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]: ...

    def to_device(self, batch: Any, device: torch.device | str) -> Any: ...

    def loss_weight(self, batch: Any) -> float:
        """The units :meth:`loss` averages over (gradient accumulation weighs micro-batches by them)."""
        ...

    def batch_tokens(self, batch: Any) -> int:
        """Non-padding tokens of a batch (0 for tasks that do not count tokens)."""
        ...


def examples_weight(batch: Any) -> float:
    """The default :meth:`TrainTask.loss_weight`: the examples in the batch (at least 1)."""
    return float(batch_examples(batch) or 1)
