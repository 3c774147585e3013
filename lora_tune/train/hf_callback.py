"""A transformers ``TrainerCallback`` that hands every evaluation to a ``report`` function and
stops training when it says so; it knows nothing of Optuna (the study layer binds it to a trial).

``report(step, eval_index, metrics) -> bool`` is called after each evaluation with the trainer's
global step, the 0-based number of the evaluation and the metrics dict ``Trainer.evaluate``
returned; ``True`` stops training (``control.should_training_stop``). The callback also keeps a
:class:`TrainingSummary` of the run. This module imports transformers: import it only where
transformers is installed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from transformers import TrainerCallback

from lora_tune.errors import ConfigError
from lora_tune.train.memory import MemoryMeter, peak_total_bytes

Report = Callable[[int, int, dict], bool]


@dataclass
class TrainingSummary:
    """What a Trainer run did, under the names lora-tune's trials record."""

    trainable_params: int = 0
    train_steps: int = 0
    planned_steps: int = 0
    train_seconds: float = 0.0
    train_tokens: int = 0
    tokens_per_second: float = 0.0
    throughput: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_total_bytes: int = 0


def metric_value(metrics: Mapping[str, Any], metric: str) -> float:
    """``metrics[metric]`` as a float; ConfigError listing what the trainer returned otherwise."""
    if metric not in metrics:
        raise ConfigError("metric", metric, "a metric the trainer's evaluate() returns: "
                          + ", ".join(sorted(str(k) for k in metrics)))
    return float(metrics[metric])


class EvaluationReporter(TrainerCallback):
    """See the module docstring. ``metric`` must be among each evaluation's metrics (a missing
    one is a ConfigError listing those returned). Tokens are counted by the trainer
    (``include_num_input_tokens_seen="non_padding"``, which :meth:`on_init_end` turns on)."""

    def __init__(self, report: Report, metric: str = "eval_loss"):
        self.report = report
        self.metric = metric
        self.history: list[dict] = []
        self.stopped = False
        self.summary = TrainingSummary()
        self._meter: MemoryMeter | None = None
        self._start = 0.0
        self._tokens_before = 0

    # -- events ----------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        if getattr(args, "include_num_input_tokens_seen", "no") in ("no", False):
            args.include_num_input_tokens_seen = "non_padding"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "include_num_input_tokens_seen", "no") in ("no", False):
            args.include_num_input_tokens_seen = "non_padding"
        if model is not None:
            self.summary.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._meter = MemoryMeter(args.device if isinstance(args.device, torch.device) else torch.device("cpu"))
        self._tokens_before = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._meter is not None:
            self._meter.sample()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = dict(metrics or {})
        metric_value(metrics, self.metric)
        index = len(self.history)
        self.history.append({"step": state.global_step, "epoch": state.epoch, "eval_index": index,
                             "elapsed": time.perf_counter() - self._start, **metrics})
        if self.report(state.global_step, index, metrics):
            self.stopped = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        s = self.summary
        s.train_steps, s.planned_steps = int(state.global_step), int(state.max_steps)
        s.train_seconds = time.perf_counter() - self._start
        s.train_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self._tokens_before
        s.tokens_per_second = s.train_tokens / s.train_seconds if s.train_seconds > 0 else 0.0
        examples = s.train_steps * args.train_batch_size * args.gradient_accumulation_steps
        s.throughput = examples / s.train_seconds if s.train_seconds > 0 else 0.0
        if self._meter is not None:
            s.peak_memory_bytes = self._meter.peak()
            s.peak_memory_total_bytes = peak_total_bytes(self._meter.device)

    def final(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The final evaluation's metrics as floats (``metric`` checked)."""
        metric_value(metrics, self.metric)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
