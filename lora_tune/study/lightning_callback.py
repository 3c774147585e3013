"""``LoraTuneLightningCallback``: Optuna pruning and lora-tune's trial measurements for
``lightning.pytorch`` training.

The shared logic is in :mod:`lora_tune.study.callbacks`; this module maps Lightning's hooks onto
it and is the only one that imports lightning.
"""
from __future__ import annotations

import math
from typing import Any

import optuna

from lora_tune.study.callbacks import CallbackSummary, Pruning, Report, RunMeter, record

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("LoraTuneLightningCallback needs lightning: pip install lightning") from exc


class LoraTuneLightningCallback(Callback):
    """Report every validation to an Optuna trial, stop training when its pruner says so, and
    record what lora-tune's own trials record: the ``lightning.pytorch`` twin of
    :class:`~lora_tune.study.hf_callback.LoraTuneCallback`.

    ``monitor`` is the key of ``trainer.callback_metrics`` to report (what the module logged with
    ``self.log``, e.g. ``"val_loss"``); a missing one raises
    :class:`~lora_tune.errors.ConfigError` listing those logged. After each validation during
    ``fit`` (not the sanity check) the value goes to ``trial.report(value, eval_index)``, then
    ``trial.should_prune()`` decides; on a prune ``trainer.should_stop`` is set (under DDP on
    every rank, from rank 0's decision) and :meth:`raise_if_pruned`, called after
    ``trainer.fit``, raises ``optuna.TrialPruned``. ``report`` replaces the trial as in
    ``LoraTuneCallback``.

    Tokens are counted from each training batch that is a mapping: its ``attention_mask`` sum,
    else its ``input_ids`` size (0 for other batches); compute time is the time inside training
    batches (forward, backward, optimizer). Lightning's ``min_steps``/``min_epochs`` may keep
    training after a prune; the later validations are not reported.
    """

    def __init__(self, trial: optuna.trial.BaseTrial | None = None, monitor: str | None = "val_loss", *,
                 report: Report | None = None, direction: str | None = None):
        self.pruning = Pruning(trial, monitor, report, direction, metric_field="monitor")
        self.summary: CallbackSummary | None = None
        self._meter: RunMeter | None = None

    @property
    def pruned(self) -> bool:
        return self.pruning.pruned_at is not None

    def raise_if_pruned(self) -> None:
        """Raise ``optuna.TrialPruned`` ("pruned after evaluation i (step s)") when pruned."""
        self.pruning.raise_if_pruned()

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.pruning.reset()
        self.summary = None
        self._meter = RunMeter(pl_module, pl_module.device)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._meter is not None:
            self._meter.batch(batch)
            self._meter.step_begin()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._meter is not None:
            self._meter.step_end()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._meter is None or trainer.sanity_checking:
            return
        if self.pruning.evaluated(trainer.global_step, trainer.callback_metrics):
            trainer.should_stop = True
        self._meter.memory.sample()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._meter is None:
            return
        self.summary = self._meter.finish(self.pruning, trainer.global_step, _planned_steps(trainer))
        self._meter = None
        record(self.pruning, self.summary)


def _planned_steps(trainer: Any) -> int:
    """``max_steps`` when set, else Lightning's estimate from epochs and batches (0 if unbounded)."""
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if math.isfinite(estimate) else 0
