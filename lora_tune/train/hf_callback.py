"""``ReportingCallback``: :mod:`lora_tune.train.callbacks` on a ``transformers.TrainerCallback``'s
events (the only module here that imports transformers)."""
from __future__ import annotations

from typing import Any
from collections.abc import Callable

import torch

from lora_tune.train.callbacks import Pruning, Report, ReportingBase, RunMeter

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the Trainer callbacks need transformers: pip install 'lora-tune[hf]'") from exc


class ReportingCallback(ReportingBase, TrainerCallback):
    """After each evaluation during ``trainer.train()``, ``report(global_step, eval_index,
    metrics)`` decides whether to stop; ``metric`` may go with or without the ``eval_`` prefix.
    Tokens are those of every training forward pass (a forward pre-hook on the model).
    """

    def __init__(self, metric: str | None = "eval_loss", *, report: Report | None = None,
                 pruning: Pruning | None = None):
        super().__init__(pruning if pruning is not None else Pruning(metric, report))
        self._hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        meter = self._start(model, _device(model, args))
        self._remove_hook()
        if model is not None:
            self._hook = model.register_forward_pre_hook(_counter(meter), with_kwargs=True)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._meter is not None:
            self._meter.step_begin()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._meter is not None:
            self._meter.step_end()

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any) -> None:
        if self._meter is None:  # not inside train()
            return
        if self.pruning.evaluated(state.global_step, metrics or {}):
            control.should_training_stop = True
        self._meter.memory.sample()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._remove_hook()
        self._end(state.global_step, state.max_steps)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _counter(meter: RunMeter) -> Callable[..., None]:
    """A forward pre-hook counting the batch of each forward pass inside an optimizer step (the
    Trainer calls ``model(**inputs)``; evaluation runs outside steps and is not counted)."""

    def count(module: Any, args: tuple, kwargs: dict) -> None:
        if not (meter.in_step and module.training):
            return
        if not kwargs and args and isinstance(args[0], torch.Tensor):
            kwargs = {"input_ids": args[0]}
        meter.batch(kwargs)

    return count


def _device(model: Any, args: Any) -> torch.device:
    """The device the model trains on: its first parameter's, else the Trainer's."""
    if model is not None:
        for param in model.parameters():
            return param.device
    return torch.device(getattr(args, "device", "cpu"))
