"""The learning-rate range test (Smith 2017; fastai's ``lr_find``): train for a few optimizer steps
with a rate growing exponentially from ``rates[0]`` to ``rates[-1]``, note each step's training
loss, and read off the rate at which the loss stops falling. Knows nothing of studies.

The rule (:func:`pick_rate`): the step losses are smoothed (an exponential moving average with
:data:`SMOOTHING`, bias-corrected); the sweep stops early once the smoothed loss exceeds
:data:`DIVERGED` times its minimum, or a loss is not finite. A step's loss is measured before its
own update, so it shows the update of the step before: the **edge** is the rate of the step before
the smoothed loss's minimum, the largest rate of the sweep whose update still lowered the loss. The
**rate** the probe reports is the edge divided by :data:`BELOW_EDGE` (fastai's "minimum / 10"):
a rate a whole training can hold, where the edge is one that only a few steps survive.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any
from collections.abc import Iterator, Sequence

import torch

from lora_tune.errors import ConfigError
from lora_tune.train.loop import enable_gradient_checkpointing
from lora_tune.train.optim import apply_step, build_optimizer
from lora_tune.train.task import TrainTask
from lora_tune.train.train_config import TrainConfig, resolve_device, resolve_precision

SMOOTHING = 0.6  # the moving average's weight of the past (a few dozen steps: a short memory)
DIVERGED = 4.0  # the sweep stops once the smoothed loss is this many times its minimum
BELOW_EDGE = 10.0  # the reported rate: the edge divided by this


@dataclass
class RangeTest:
    """What a sweep measured: the rate and training loss of each step it ran, its time, and the
    rule's reading (:func:`pick_rate`)."""

    rates: list[float]
    losses: list[float]
    seconds: float
    edge: float
    rate: float
    falls: bool  # whether the smoothed loss fell below its start at all
    stopped: str | None = None  # why the sweep stopped before its last step
    smoothed: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.losses)


def sweep_rates(low: float, high: float, steps: int) -> list[float]:
    """``steps`` rates from ``low`` to ``high``, each the previous one times a constant factor."""
    if steps == 1:
        return [float(low)]
    return [float(low) * (float(high) / float(low)) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: Sequence[float], beta: float = SMOOTHING) -> list[float]:
    """The bias-corrected exponential moving average of ``losses``."""
    out, average = [], 0.0
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** i))
    return out


def pick_rate(rates: Sequence[float], losses: Sequence[float]) -> tuple[float, float, bool, list[float]]:
    """``(edge, rate, falls, smoothed)`` of a sweep (the module's rule); ``losses[i]`` is the loss
    of the step run at ``rates[i]`` (finite losses only)."""
    if not losses:
        raise ValueError("a range test needs at least one finite loss")
    smoothed = smooth(losses)
    best = min(range(len(smoothed)), key=lambda i: smoothed[i])
    edge = float(rates[max(best - 1, 0)])  # the update that led to the lowest loss
    return edge, edge / BELOW_EDGE, smoothed[best] < smoothed[0], smoothed


def range_test(model: torch.nn.Module, task: TrainTask, config: TrainConfig, rates: Sequence[float],
               data_share: float = 1.0) -> RangeTest:
    """Train ``model``'s trainable parameters for ``len(rates)`` optimizer steps, step ``i`` at
    ``rates[i]`` (LoRA+ groups keep their ratio), on the first ``data_share`` of an epoch's
    micro-batches (in ``config.seed``'s order, used again in turn when the steps need more);
    batches, gradient accumulation, precision, clipping and optimizer as ``config`` says."""
    start = time.perf_counter()
    device = resolve_device(config.device)
    amp_dtype = resolve_precision(config.precision, device)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("targets", "(none)", "a model with at least one trainable parameter")
    n_examples = int(task.num_train_examples())
    if n_examples < 1:
        raise ConfigError("task", f"{n_examples} training examples", "a task with at least one training example")
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device)
    accumulation = config.gradient_accumulation_steps
    micro = max(1, math.ceil(math.ceil(n_examples / config.batch_size) * data_share))
    optimizer = build_optimizer(model, replace(config, learning_rate=1.0))  # group lr = its multiple
    multiples = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    losses: list[float] = []
    stopped = None
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        batches = _cycle(list(itertools.islice(task.train_batches(config.batch_size, config.seed, 0), micro)))
        for rate in rates:
            for group, multiple in zip(optimizer.param_groups, multiples):
                group["lr"] = rate * multiple
            loss = _step(model, task, [next(batches) for _ in range(accumulation)], device, amp_dtype, scaler)
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                stopped = f"the loss was {loss} at rate {rate:.3g}"
                break
            apply_step(optimizer, params, config.grad_clip, scaler)
            losses.append(loss)
            smoothed = smooth(losses)
            if smoothed[-1] > DIVERGED * min(smoothed):
                stopped = f"the smoothed loss passed {DIVERGED:g} x its minimum at rate {rate:.3g}"
                break
    model.eval()
    if not losses:
        raise ConfigError("lr_probe", stopped or "no step", "a first step with a finite training loss",
                          "the task's loss is not finite even at the sweep's lowest rate")
    done = list(rates[:len(losses)])
    edge, rate, falls, smoothed = pick_rate(done, losses)
    return RangeTest(done, losses, time.perf_counter() - start, edge, rate, falls, stopped, smoothed)


def _step(model: torch.nn.Module, task: TrainTask, micro_batches: list[Any], device: torch.device,
          amp_dtype: torch.dtype, scaler: Any) -> float:
    """Forward and backward of one optimizer step's micro-batches, weighted as :func:`fit` weights
    them; returns the step's loss."""
    weights = [float(task.loss_weight(b)) for b in micro_batches]
    total = sum(weights) or 1.0
    value = 0.0
    for batch, weight in zip(micro_batches, weights):
        batch = task.to_device(batch, device)
        with _autocast(device, amp_dtype):
            loss = task.loss(model, batch)
        scaled = loss * (weight / total)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        value += float(loss.detach()) * weight / total
    return value


def _cycle(batches: list[Any]) -> Iterator[Any]:
    if not batches:
        raise ConfigError("task", "no training batches", "a task whose train_batches yields at least one batch")
    return itertools.cycle(batches)


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
