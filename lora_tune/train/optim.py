"""Optimizer, LoRA+ parameter groups and learning-rate schedules for :func:`lora_tune.train.fit`."""
from __future__ import annotations

import math

import torch
from torch import nn

from lora_tune.errors import ConfigError
from lora_tune.quiet import quiet_bitsandbytes
from lora_tune.train.train_config import TrainConfig

LORA_B_SUFFIX = "lora_B"  # the name of every wrapper's up-projection (lora_tune.lora.layers)


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Trainable parameters as optimizer groups. With ``loraplus_lr_ratio`` every ``lora_B``
    gets ``ratio × learning_rate`` and the rest (``lora_A``, modules to save) the base rate."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.loraplus_lr_ratio is None:
        return [{"params": [p for _, p in trainable], "lr": config.learning_rate, "name": "all"}]
    fast = [p for n, p in trainable if n.rsplit(".", 1)[-1] == LORA_B_SUFFIX]
    if not fast:
        raise ConfigError("train.loraplus_lr_ratio", config.loraplus_lr_ratio,
                          "null for a model without LoRA factors", "LoRA+ scales the lr of lora_B factors")
    slow = [p for n, p in trainable if n.rsplit(".", 1)[-1] != LORA_B_SUFFIX]
    groups = [{"params": slow, "lr": config.learning_rate, "name": "base"}] if slow else []
    groups.append({"params": fast, "lr": config.learning_rate * config.loraplus_lr_ratio, "name": "lora_B"})
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    # bitsandbytes runs its 8-bit optimizers on the CPU too; paged ones fall back to unpaged there.
    quiet_bitsandbytes()
    try:
        import bitsandbytes.optim as bnb_optim  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ConfigError("train.optimizer", config.optimizer, "adamw without bitsandbytes",
                          "install it with `pip install 'lora-tune[quant]'`") from exc
    cls = {"adamw_8bit": bnb_optim.AdamW8bit, "paged_adamw": bnb_optim.PagedAdamW,
           "paged_adamw_8bit": bnb_optim.PagedAdamW8bit}[config.optimizer]
    return cls(groups, lr=config.learning_rate, weight_decay=config.weight_decay)


def apply_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float | None,
               scaler: torch.amp.GradScaler | None) -> None:
    """The optimizer step after backward: unscale (fp16), clip the gradient norm, step, zero the grads."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def warmup_steps(config: TrainConfig, planned_steps: int) -> int:
    """``warmup_steps`` when given, else ``ceil(warmup_ratio × planned steps)``."""
    if config.warmup_steps is not None:
        return min(config.warmup_steps, planned_steps)
    return math.ceil(config.warmup_ratio * planned_steps)


def lr_factor(step: int, planned_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the learning rate for the optimizer step ``step`` (0-based): linear warmup
    from 0 over ``warmup`` steps, then constant, linear decay to 0 or half a cosine to 0 at
    ``planned_steps`` (the formulas of transformers' ``get_scheduler``)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, planned_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ConfigError("train.lr_scheduler", kind, "constant, linear or cosine")


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    planned_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(config, planned_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, planned_steps, warmup, config.lr_scheduler))
