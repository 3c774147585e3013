"""How to train one adapted model: :class:`TrainConfig`, its allowed values, and what the
training device can run (:func:`resolve_device`, :func:`resolve_precision`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lora_tune.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULERS = ("constant", "linear", "cosine")
# torch's AdamW, and bitsandbytes' 8-bit and paged (CUDA unified memory) variants.
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
DEVICE_HELP = "'auto', 'cpu', 'cuda' or 'cuda:N'"


@dataclass
class TrainConfig:
    """How to train one adapted model.

    ``batch_size`` is the micro-batch of one forward/backward pass; an optimizer step takes
    ``gradient_accumulation_steps`` of them, so the effective batch is their product
    (:attr:`effective_batch_size`). ``max_steps`` caps optimizer steps over all epochs;
    ``eval_steps`` (every N optimizer steps) replaces ``evals_per_epoch`` when given.
    ``precision`` is the autocast dtype (``auto``: bf16 on a CUDA device that has it, else fp16
    with a gradient scaler on CUDA, fp32 on CPU). ``loraplus_lr_ratio`` trains every ``lora_B``
    at that multiple of the learning rate (LoRA+, Hayou et al. 2024).
    """

    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    evals_per_epoch: int = 2
    seed: int = 0
    device: str = "auto"
    grad_clip: float | None = 1.0
    max_steps: int | None = None
    precision: str = "auto"
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    loraplus_lr_ratio: float | None = None
    eval_steps: int | None = None
    data_fraction: float = 1.0  # each epoch trains on a random fraction of the data (multi-fidelity)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "evals_per_epoch", "gradient_accumulation_steps"):
            if not _int_at_least(getattr(self, name), 1):
                raise ConfigError(f"train.{name}", getattr(self, name), "an integer >= 1")
        for name in ("max_steps", "eval_steps"):
            if getattr(self, name) is not None and not _int_at_least(getattr(self, name), 1):
                raise ConfigError(f"train.{name}", getattr(self, name), "null or an integer >= 1")
        if self.warmup_steps is not None and not _int_at_least(self.warmup_steps, 0):
            raise ConfigError("train.warmup_steps", self.warmup_steps, "null or an integer >= 0")
        if not _finite_number(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError("train.learning_rate", self.learning_rate, "a finite number > 0")
        if not _finite_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError("train.weight_decay", self.weight_decay, "a finite number >= 0")
        if self.grad_clip is not None and (not _finite_number(self.grad_clip) or self.grad_clip <= 0):
            raise ConfigError("train.grad_clip", self.grad_clip, "null or a finite number > 0")
        if not _finite_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train.warmup_ratio", self.warmup_ratio, "a number >= 0 and < 1")
        if self.loraplus_lr_ratio is not None and (
                not _finite_number(self.loraplus_lr_ratio) or self.loraplus_lr_ratio <= 0):
            raise ConfigError("train.loraplus_lr_ratio", self.loraplus_lr_ratio, "null or a finite number > 0")
        if not _finite_number(self.data_fraction) or not 0 < self.data_fraction <= 1:
            raise ConfigError("study.fidelity.data_fraction", self.data_fraction, "a number > 0 and <= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("train.seed", self.seed, "an integer")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError("train.gradient_checkpointing", self.gradient_checkpointing, "true or false")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError("train.device", self.device, DEVICE_HELP)
        for name, allowed in (("precision", PRECISIONS), ("lr_scheduler", LR_SCHEDULERS),
                              ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name}", getattr(self, name), ", ".join(allowed))

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps


def resolve_device(name: str) -> torch.device:
    """``"auto"`` means CUDA when available, else CPU; anything else is parsed by torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError("train.device", name, DEVICE_HELP) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "'auto' or 'cpu' (CUDA is not available on this machine)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("train.device", name, DEVICE_HELP)
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``precision`` on ``device`` (float32: no autocast); ConfigError
    naming ``train.precision`` when the device cannot run it."""
    cuda = device.type == "cuda"
    bf16_ok = (not cuda) or torch.cuda.is_bf16_supported()
    if precision == "auto":
        return (torch.bfloat16 if bf16_ok else torch.float16) if cuda else torch.float32
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        if not cuda:
            raise ConfigError("train.precision", precision, "fp32, bf16 or auto on a CPU",
                              "fp16 mixed precision needs a CUDA device (a gradient scaler on CUDA)")
        return torch.float16
    if precision == "bf16":
        if not bf16_ok:
            raise ConfigError("train.precision", precision, "fp32, fp16 or auto on this GPU",
                              f"{torch.cuda.get_device_name(device)} has no bfloat16 support")
        return torch.bfloat16
    raise ConfigError("train.precision", precision, ", ".join(PRECISIONS))


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _int_at_least(value: Any, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low
