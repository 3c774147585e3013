"""``ReportingCallback``: a ``transformers.TrainerCallback`` that hands every evaluation during
training to a ``report(step, eval_index, metrics) -> stop?`` function and measures the run as
:func:`lora_tune.train.fit` does. It knows nothing of Optuna: the study layer's
``LoraTuneCallback`` binds it to a trial, and the ``trainer`` task to its trial body.

The shared logic is in :mod:`lora_tune.train.callbacks`; this module maps the Trainer's events
onto it and is the only one here that imports transformers.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable

import torch

from lora_tune.train.callbacks import CallbackSummary, Pruning, Report, RunMeter

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the Trainer callbacks need transformers: pip install 'lora-tune[hf]'") from exc


class ReportingCallback(TrainerCallback):
    """After each evaluation during ``trainer.train()``, ``report(global_step, eval_index,
    metrics)`` decides whether to stop (``control.should_training_stop``; under DDP rank 0
    decides and every rank stops after the same step); ``metric`` (with or without the Trainer's
    ``eval_`` prefix) must be among the metrics, else :class:`~lora_tune.errors.ConfigError`
    lists those returned. Evaluations outside ``train()`` are not reported. At the end of
    training :attr:`summary` holds a :class:`~lora_tune.train.callbacks.CallbackSummary`, and
    :meth:`finished` is called with it. Tokens are non-padding tokens (``attention_mask`` sums,
    else ``input_ids`` sizes) of every training forward pass, counted by a forward pre-hook on the
    model while an optimizer step runs.
    """

    def __init__(self, metric: str | None = "eval_loss", *, report: Report | None = None,
                 pruning: Pruning | None = None):
        self.pruning = pruning if pruning is not None else Pruning(metric, report)
        self.summary: CallbackSummary | None = None
        self._meter: RunMeter | None = None
        self._hook: Any = None

    @property
    def pruned(self) -> bool:
        return self.pruning.pruned_at is not None

    def finished(self, summary: CallbackSummary) -> None:
        """Called on rank 0 and every other rank with the run's summary (subclasses record it)."""

    # -- Trainer events ---------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.pruning.reset()
        self.summary = None
        self._meter = RunMeter(model, _device(model, args))
        self._remove_hook()
        if model is not None:
            self._hook = model.register_forward_pre_hook(_counter(self._meter), with_kwargs=True)

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
        if self._meter is None:
            return
        self.summary = self._meter.finish(self.pruning, state.global_step, state.max_steps)
        self._meter = None
        self.finished(self.summary)

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
