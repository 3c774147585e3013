"""How to train one adapted model: :class:`TrainConfig`, its allowed values, and what the
training device can run (:func:`resolve_device`, :func:`resolve_precision`)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lora_tune.errors import ConfigError
from lora_tune.settings import check_settings, setting

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULERS = ("constant", "linear", "cosine")
# torch's AdamW, and bitsandbytes' 8-bit and paged (CUDA unified memory) variants.
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
DEVICE_HELP = "'auto', 'cpu', 'cuda' or 'cuda:N'"


@dataclass
class TrainConfig:
    """How to train one adapted model; each field's type, bounds, whether a study may search it
    and its ``TrainingArguments`` name are declared once here (the table in README.md says what
    each does). ``batch_size`` is one forward/backward pass's micro-batch."""

    epochs: int = setting(3, int, ge=1, searchable=True, hf="num_train_epochs")
    batch_size: int = setting(32, int, ge=1, searchable=True, hf="per_device_train_batch_size")
    learning_rate: float = setting(1e-3, float, gt=0, searchable=True, hf="learning_rate")
    weight_decay: float = setting(0.0, float, ge=0, searchable=True, hf="weight_decay")
    evals_per_epoch: int = setting(2, int, ge=1)
    seed: int = setting(0, int, hf="seed")
    device: str = setting("auto", str, describe=DEVICE_HELP, hf="use_cpu")
    grad_clip: float | None = setting(1.0, float, gt=0, nullable=True, searchable=True, hf="max_grad_norm")
    max_steps: int | None = setting(None, int, ge=1, nullable=True, hf="max_steps")
    precision: str = setting("auto", choices=PRECISIONS, searchable=True, hf=("bf16", "fp16"))
    gradient_accumulation_steps: int = setting(1, int, ge=1, searchable=True, hf="gradient_accumulation_steps")
    lr_scheduler: str = setting("constant", choices=LR_SCHEDULERS, searchable=True, hf="lr_scheduler_type")
    warmup_ratio: float = setting(0.0, float, ge=0, lt=1, searchable=True, hf="warmup_steps")
    warmup_steps: int | None = setting(None, int, ge=0, nullable=True, hf="warmup_steps")
    gradient_checkpointing: bool = setting(False, bool, hf="gradient_checkpointing")
    optimizer: str = setting("adamw", choices=OPTIMIZERS, searchable=True, hf="optim")
    loraplus_lr_ratio: float | None = setting(None, float, gt=0, nullable=True, searchable=True)
    eval_steps: int | None = setting(None, int, ge=1, nullable=True, hf="eval_steps")
    data_fraction: float = setting(1.0, float, gt=0, le=1, section="study.fidelity")
    # stop a training that has clearly failed (lora_tune.train.divergence); null: never
    diverged_after: float | None = setting(0.25, float, gt=0, le=1, nullable=True)
    diverged_loss_ratio: float = setting(1.0, float, gt=0)
    diverged_chance_margin: float = setting(0.02, float, ge=0, lt=1)

    def __post_init__(self) -> None:
        check_settings(self, "train")

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


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (``train.threads``; None: unchanged), restoring the count after."""
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
