"""A small train/eval loop that fires callbacks. It knows nothing of Optuna.

:func:`fit` trains the parameters that have ``requires_grad`` (after :func:`lora_tune.inject`
that is the LoRA factors and any ``modules_to_save``), evaluates the task ``evals_per_epoch``
times per epoch and calls ``on_eval(step, eval_index, metrics)`` after each evaluation; when the
callback returns ``True`` training stops (this is how a study prunes a trial).
"""
from __future__ import annotations

import ctypes
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lora_tune.errors import ConfigError, NonFiniteLossError

OnEval = Callable[[int, int, dict], bool]
_HISTORY_KEYS = ("step", "epoch", "eval_index", "train_loss", "elapsed")


@dataclass
class TrainConfig:
    """How to train one adapted model. ``max_steps`` caps the optimizer steps over all epochs."""

    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    evals_per_epoch: int = 2
    seed: int = 0
    device: str = "auto"
    grad_clip: float | None = 1.0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "evals_per_epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{name}", value, "an integer >= 1")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ConfigError("train.max_steps", self.max_steps, "null or an integer >= 1")
        if not _finite_number(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError("train.learning_rate", self.learning_rate, "a finite number > 0")
        if not _finite_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError("train.weight_decay", self.weight_decay, "a finite number >= 0")
        if self.grad_clip is not None and (not _finite_number(self.grad_clip) or self.grad_clip <= 0):
            raise ConfigError("train.grad_clip", self.grad_clip, "null or a finite number > 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("train.seed", self.seed, "an integer")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError("train.device", self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")


@dataclass
class TrainResult:
    """What :func:`fit` did.

    ``seconds`` is the wall time of the whole loop (training and evaluation);
    ``compute_seconds`` the part spent in forward/backward/optimizer steps and
    ``eval_seconds`` the part spent in ``task.evaluate``. ``throughput`` is training
    examples per second of ``compute_seconds``. ``history`` holds one dict per evaluation:
    ``step``, ``epoch``, ``eval_index``, ``train_loss`` (mean since the previous evaluation),
    ``elapsed`` and every metric.
    """

    steps: int
    planned_steps: int
    seconds: float
    examples: int
    throughput: float
    peak_memory_bytes: int
    history: list[dict] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    compute_seconds: float = 0.0
    eval_seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    """``"auto"`` means CUDA when available, else CPU; anything else is parsed by torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError("train.device", name, "'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "'auto' or 'cpu' (CUDA is not available on this machine)")
    return device


def eval_steps(steps_per_epoch: int, evals_per_epoch: int) -> list[int]:
    """1-based step numbers within an epoch after which to evaluate (evenly spaced, last = end)."""
    n = min(evals_per_epoch, steps_per_epoch)
    return sorted({max(1, round((k + 1) * steps_per_epoch / n)) for k in range(n)})


def fit(model: torch.nn.Module, task: Any, config: TrainConfig, on_eval: OnEval | None = None) -> TrainResult:
    """Train ``model`` on ``task`` as ``config`` says; see the module docstring."""
    start = time.perf_counter()
    device = resolve_device(config.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("targets", "(none)", "a model with at least one trainable parameter",
                          "Inject LoRA (lora_tune.inject) before training.")
    model.to(device)
    n_examples = int(task.num_train_examples())
    if n_examples < 1:
        raise ConfigError("task", f"{n_examples} training examples", "a task with at least one training example")
    steps_per_epoch = max(1, math.ceil(n_examples / config.batch_size))
    planned = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        planned = min(planned, config.max_steps)
    within = set(eval_steps(steps_per_epoch, config.evals_per_epoch))
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    memory = _MemoryMeter(device)
    history: list[dict] = []
    step = examples = 0
    compute = evaluating = 0.0
    losses: list[float] = []

    def evaluate(epoch: int) -> bool:
        """Evaluate, record, and ask ``on_eval`` whether to stop."""
        nonlocal evaluating
        t1 = time.perf_counter()
        metrics = {k: float(v) for k, v in task.evaluate(model, config.batch_size).items()}
        model.train()
        evaluating += time.perf_counter() - t1
        memory.sample()
        index = len(history)
        history.append({"step": step, "epoch": epoch, "eval_index": index,
                        "train_loss": sum(losses) / max(1, len(losses)),
                        "elapsed": time.perf_counter() - start, **metrics})
        losses.clear()
        return bool(on_eval is not None and on_eval(step, index, metrics))

    stopped = False
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        model.train()
        for epoch in range(config.epochs):
            for in_epoch, batch in enumerate(task.train_batches(config.batch_size, config.seed, epoch), 1):
                t0 = time.perf_counter()
                batch = task.to_device(batch, device)
                loss = task.loss(model, batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteLossError(step + 1, value)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                step += 1
                examples += _batch_size(batch)
                losses.append(value)
                compute += time.perf_counter() - t0
                memory.sample()
                if in_epoch in within or step >= planned:
                    stopped = evaluate(epoch)
                if stopped or step >= planned:
                    break
            else:  # the task yielded fewer batches than planned: still end the epoch with an evaluation
                if losses:
                    stopped = evaluate(epoch)
            if stopped or step >= planned:
                break
    model.eval()
    seconds = time.perf_counter() - start
    return TrainResult(
        steps=step, planned_steps=planned, seconds=seconds, examples=examples,
        throughput=examples / compute if compute > 0 else 0.0,
        peak_memory_bytes=memory.peak(), history=history,
        final_metrics={k: v for k, v in history[-1].items() if k not in _HISTORY_KEYS} if history else {},
        stopped_early=stopped, compute_seconds=compute, eval_seconds=evaluating,
    )


def warm_up() -> None:
    """Pay torch's one-off lazy imports of the optimizer machinery (about a second) now, so the
    first trial of a process is not charged for them. Called by :func:`lora_tune.tasks.build_task`."""
    layer = torch.nn.Linear(1, 1)
    torch.optim.AdamW(layer.parameters(), lr=1e-3)


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _batch_size(batch: Any) -> int:
    """Examples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return 1
    for item in items:
        size = _batch_size(item) if isinstance(item, (torch.Tensor, dict, list, tuple)) else 0
        if size:
            return size
    return 1


class _MemoryMeter:
    """Peak memory growth during training: CUDA ``max_memory_allocated``, else resident set size."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
            self.base = self._rss()
            self.lifetime_before = _max_rss()
            # RSS misses memory that reuses pages freed earlier in the process; the C heap's
            # own count of bytes in use (glibc) does not.
            self.heap_base = _heap_in_use()
            self.heap_max = self.heap_base
        self.max = self.base

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm", "rb") as fh:
                return int(fh.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return _max_rss()

    def sample(self) -> None:
        if not self.cuda:
            rss = self._rss()
            if rss > self.max:
                self.max = rss
            if self.heap_base is not None:
                self.heap_max = max(self.heap_max, _heap_in_use() or 0)

    def peak(self) -> int:
        """Growth over the start. On CPU, samples taken between steps miss transient peaks, so
        when the process's lifetime peak RSS rose during training that peak is used instead."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        lifetime = _max_rss()
        top = max(self.max, lifetime) if lifetime > self.lifetime_before else self.max
        heap = self.heap_max - self.heap_base if self.heap_base is not None else 0
        return max(0, int(top - self.base), int(heap))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _load_mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def _heap_in_use() -> int | None:
    """Bytes the C heap has handed out (small blocks + mmapped ones), or None off glibc."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def _max_rss() -> int:
    """The process's peak resident set size in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
