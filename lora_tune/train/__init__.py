"""Training one adapted model: :class:`TrainConfig` and :func:`fit`. Knows nothing of Optuna."""
from lora_tune.train.train_config import (
    LR_SCHEDULERS, OPTIMIZERS, PRECISIONS, TrainConfig, resolve_device, resolve_precision,
)
from lora_tune.train.loop import (
    HISTORY_KEYS, TrainResult, enable_gradient_checkpointing, eval_steps, fit, warm_up,
)
from lora_tune.train.optim import build_optimizer, lr_factor, parameter_groups, warmup_steps

__all__ = [
    "HISTORY_KEYS", "LR_SCHEDULERS", "build_optimizer", "OPTIMIZERS", "PRECISIONS", "TrainConfig", "TrainResult",
    "enable_gradient_checkpointing", "eval_steps", "fit", "lr_factor", "parameter_groups",
    "resolve_device", "resolve_precision", "warm_up", "warmup_steps",
]
