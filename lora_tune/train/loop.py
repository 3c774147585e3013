"""The train/eval loop :func:`fit`; it knows nothing of Optuna."""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterator

import torch

from lora_tune.errors import ConfigError, NonFiniteLossError, TrainingOutOfMemoryError
from lora_tune.train.divergence import DivergenceCheck, non_finite
from lora_tune.train.callbacks import batch_examples
from lora_tune.train.train_config import TrainConfig, resolve_device, resolve_precision
from lora_tune.train.memory import MemoryMeter, peak_total_bytes
from lora_tune.train.optim import apply_step, build_optimizer, build_scheduler
from lora_tune.train.result import TrainResult
from lora_tune.train.task import TrainTask

OnEval = Callable[[int, int, dict], bool]
HISTORY_KEYS = ("step", "epoch", "eval_index", "train_loss", "learning_rate", "elapsed")


def eval_steps(steps_per_epoch: int, evals_per_epoch: int) -> list[int]:
    """1-based step numbers within an epoch after which to evaluate (evenly spaced, last = end)."""
    n = min(evals_per_epoch, steps_per_epoch)
    return sorted({max(1, round((k + 1) * steps_per_epoch / n)) for k in range(n)})


@dataclass
class _Plan:
    """Optimizer steps per epoch and in all, and after which steps to evaluate."""

    micro_per_epoch: int
    steps_per_epoch: int
    planned: int
    within_epoch: set[int]
    every: int | None

    @classmethod
    def of(cls, n_examples: int, config: TrainConfig) -> _Plan:
        micro = max(1, math.ceil(math.ceil(n_examples / config.batch_size) * config.data_fraction))
        per_epoch = math.ceil(micro / config.gradient_accumulation_steps)
        planned = per_epoch * config.epochs
        if config.max_steps is not None:
            planned = min(planned, config.max_steps)
        within = set() if config.eval_steps else set(eval_steps(per_epoch, config.evals_per_epoch))
        return cls(micro, per_epoch, planned, within, config.eval_steps)

    def evaluates_after(self, step: int, step_in_epoch: int) -> bool:
        if self.every is not None:
            return step % self.every == 0 or step >= self.planned
        return step_in_epoch in self.within_epoch or step >= self.planned


def planned_steps(n_examples: int, config: TrainConfig) -> int:
    """The optimizer steps :func:`fit` plans for ``n_examples`` training examples under ``config``."""
    return _Plan.of(n_examples, config).planned


def fit(model: torch.nn.Module, task: TrainTask, config: TrainConfig, on_eval: OnEval | None = None) -> TrainResult:
    """Train the parameters of ``model`` that have ``requires_grad`` on ``task`` as ``config`` says.

    After each evaluation ``on_eval(step, eval_index, metrics)`` may stop training (how a study
    prunes). Each micro-batch's loss is weighted by ``task.loss_weight(batch)`` over the step's
    total, so accumulating k micro-batches of b gives the gradient of one batch of k·b.
    """
    start = time.perf_counter()
    device = resolve_device(config.device)
    amp_dtype = resolve_precision(config.precision, device)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("targets", "(none)", "a model with at least one trainable parameter",
                          "Inject LoRA (lora_tune.inject) before training.")
    n_examples = int(task.num_train_examples())
    if n_examples < 1:
        raise ConfigError("task", f"{n_examples} training examples", "a task with at least one training example")
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    memory = MemoryMeter(device)
    model.to(device)
    plan = _Plan.of(n_examples, config)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, plan.planned)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = _State()
    watch = DivergenceCheck(config.diverged_after, config.diverged_loss_ratio, config.diverged_chance_margin,
                            plan.planned, getattr(task, "majority_accuracy", None), getattr(task, "prior_loss", None))

    def evaluate(epoch: int) -> bool:
        """Evaluate, record, and ask ``on_eval`` whether to stop."""
        t1 = time.perf_counter()
        with _autocast(device, amp_dtype):
            metrics = {k: float(v) for k, v in task.evaluate(model, config.batch_size).items()}
        model.train()
        state.evaluating += time.perf_counter() - t1
        memory.sample()
        index = len(state.history)
        state.history.append({"step": state.step, "epoch": epoch, "eval_index": index,
                              "train_loss": sum(state.losses) / max(1, len(state.losses)),
                              "learning_rate": state.last_lr,
                              "elapsed": time.perf_counter() - start, **metrics})
        recent = state.history[-1]["train_loss"]
        state.losses.clear()
        if on_eval is not None and on_eval(state.step, index, metrics):
            return True
        state.diverged = watch.verdict(state.step, recent, metrics)
        return state.diverged is not None

    def optimizer_step(micro_batches: list[Any]) -> None:
        t0 = time.perf_counter()
        state.last_lr = optimizer.param_groups[0]["lr"]
        weights = [float(task.loss_weight(b)) for b in micro_batches]
        total = sum(weights) or 1.0
        losses = []  # stay on the device: read once per optimizer step, not once per micro-batch
        for batch, weight in zip(micro_batches, weights):
            state.examples += batch_examples(batch) or 1
            state.tokens += task.batch_tokens(batch)  # counted on the host batch: no device sync
            batch = task.to_device(batch, device)
            with _autocast(device, amp_dtype):
                loss = task.loss(model, batch)
            scaled = loss * (weight / total)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            losses.append(loss.detach().reshape(()))
        values = torch.stack(losses).tolist()  # the step's one device sync
        bad = next((value for value in values if not math.isfinite(value)), None)
        if bad is not None:  # before the optimizer applies anything
            optimizer.zero_grad(set_to_none=True)
            if config.diverged_after is None:
                raise NonFiniteLossError(state.step + 1, bad)
            state.diverged = non_finite(state.step + 1, bad)
            return
        step_loss = sum(value * weight / total for value, weight in zip(values, weights))
        watch.step(step_loss)
        apply_step(optimizer, params, config.grad_clip, scaler)
        scheduler.step()
        state.step += 1
        state.losses.append(step_loss)
        state.compute += time.perf_counter() - t0
        memory.sample()

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(config.seed)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            for epoch in range(config.epochs):
                batches = itertools.islice(task.train_batches(config.batch_size, config.seed, epoch),
                                           plan.micro_per_epoch)  # data_fraction < 1: a random part
                for step_in_epoch, micro_batches in enumerate(_groups(batches, config.gradient_accumulation_steps), 1):
                    optimizer_step(micro_batches)
                    if state.diverged is not None:  # a non-finite loss: no step taken, no evaluation
                        state.stopped = True
                        break
                    if plan.evaluates_after(state.step, step_in_epoch):
                        state.stopped = evaluate(epoch)
                    if state.stopped or state.step >= plan.planned:
                        break
                else:  # the task yielded fewer batches than planned: still end the epoch with an evaluation
                    if state.losses and plan.every is None:
                        state.stopped = evaluate(epoch)
                if state.stopped or state.step >= plan.planned:
                    break
    except torch.OutOfMemoryError as exc:
        raise TrainingOutOfMemoryError(config.batch_size, peak_total_bytes(device), str(device)) from exc
    model.eval()
    seconds = time.perf_counter() - start
    history = state.history
    return TrainResult(
        steps=state.step, planned_steps=plan.planned, seconds=seconds, examples=state.examples,
        throughput=state.examples / state.compute if state.compute > 0 else 0.0,
        peak_memory_bytes=memory.peak(), history=history,
        final_metrics={k: v for k, v in history[-1].items() if k not in HISTORY_KEYS} if history else {},
        stopped_early=state.stopped, diverged=state.diverged, compute_seconds=state.compute,
        eval_seconds=state.evaluating,
        tokens=state.tokens, tokens_per_second=state.tokens / state.compute if state.compute > 0 else 0.0,
        peak_memory_total_bytes=peak_total_bytes(device), effective_batch_size=config.effective_batch_size,
    )


@dataclass
class _State:
    diverged: str | None = None  # why training stopped as diverged (lora_tune.train.divergence)
    step: int = 0
    examples: int = 0
    tokens: int = 0
    compute: float = 0.0
    evaluating: float = 0.0
    stopped: bool = False
    last_lr: float = 0.0  # the learning rate of the latest optimizer step (first group)
    losses: list[float] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Hugging Face models' non-reentrant activation checkpointing (recomputes each block's
    activations in backward; works with frozen embeddings and with LoRA wrappers inside)."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError("train.gradient_checkpointing", True,
                          f"false for a {type(model).__name__}",
                          "gradient checkpointing needs a Hugging Face model that supports it")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config: Any = getattr(model, "config", None)  # a transformers PretrainedConfig
    if getattr(config, "use_cache", False):
        config.use_cache = False  # a cache is useless in training and conflicts with recomputation


def _groups(batches: Any, k: int) -> Iterator[list[Any]]:
    """Consecutive groups of ``k`` micro-batches (the last group may be shorter)."""
    batches = iter(batches)
    while group := list(itertools.islice(batches, k)):
        yield group


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def warm_up() -> None:
    """Pay torch's one-off lazy imports of the optimizer machinery (about a second) now, not in
    a process's first trial."""
    layer = torch.nn.Linear(1, 1)
    torch.optim.AdamW(layer.parameters(), lr=1e-3)

