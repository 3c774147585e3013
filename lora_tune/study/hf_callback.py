"""``LoraTuneCallback``: Optuna pruning and lora-tune's trial measurements for any
``transformers.Trainer`` (and trainers built on it, such as TRL's ``SFTTrainer``).

The shared logic is in :mod:`lora_tune.study.callbacks`; this module maps the Trainer's events
onto it and is the only one that imports transformers.
"""
from __future__ import annotations

from typing import Any, Callable

import optuna
import torch

from lora_tune.study.callbacks import CallbackSummary, Pruning, Report, RunMeter, record

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("LoraTuneCallback needs transformers: pip install 'lora-tune[hf]'") from exc


class LoraTuneCallback(TrainerCallback):
    """Report every evaluation to an Optuna trial, stop training when its pruner says so, and
    record what lora-tune's own trials record.

    ``trial``: the Optuna trial (under ``torchrun``/DDP the trial on rank 0; other ranks may pass
    None, and only rank 0 ever talks to the storage). ``metric``: the key of the Trainer's
    evaluation metrics to report, with or without its ``eval_`` prefix; a missing one raises
    :class:`~lora_tune.errors.ConfigError` listing those returned. ``report``: instead of a trial,
    ``report(global_step, eval_index, metrics) -> bool`` (stop?) decides (``metric`` may then be
    None). ``direction``: when given, checked against the trial's study direction.

    After each evaluation during training the value goes to ``trial.report(value, eval_index)``
    (``eval_index`` counts evaluations from 0, the step numbers lora-tune's own trials report;
    the global step is kept in :attr:`summary`), then ``trial.should_prune()`` decides. On a
    prune, training stops (``control.should_training_stop``; under DDP every rank stops after the
    same step) and :meth:`raise_if_pruned`, called after ``trainer.train()``, raises
    ``optuna.TrialPruned`` so that the trial ends PRUNED. Evaluations outside ``train()``
    (a final ``trainer.evaluate()``) are not reported.

    At the end of training :attr:`summary` holds a :class:`~lora_tune.study.callbacks.CallbackSummary`
    and, with a trial, rank 0 writes its :meth:`~CallbackSummary.user_attrs` (``trainable_params``,
    ``peak_memory_bytes``, ``tokens_per_second``, ``train_steps``, ``planned_steps``, ...) to it.
    Tokens are non-padding tokens (``attention_mask`` sums, else ``input_ids`` sizes) of every
    training forward pass, counted by a forward pre-hook on the model while an optimizer step runs.
    """

    def __init__(self, trial: optuna.trial.BaseTrial | None = None, metric: str | None = "eval_loss", *,
                 report: Report | None = None, direction: str | None = None):
        self.pruning = Pruning(trial, metric, report, direction)
        self.summary: CallbackSummary | None = None
        self._meter: RunMeter | None = None
        self._hook: Any = None

    @property
    def pruned(self) -> bool:
        return self.pruning.pruned_at is not None

    def raise_if_pruned(self) -> None:
        """Raise ``optuna.TrialPruned`` ("pruned after evaluation i (step s)") when pruned."""
        self.pruning.raise_if_pruned()

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
        record(self.pruning, self.summary)

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
