"""``ReportingLightningCallback``: the ``lightning.pytorch`` twin of
:class:`~lora_tune.train.hf_callback.ReportingCallback` (validations during ``fit`` go to a
``report`` function that decides whether to stop; the run is measured). It knows nothing of
Optuna: the study layer's ``LoraTuneLightningCallback`` binds it to a trial.

The shared logic is in :mod:`lora_tune.train.callbacks`; this module maps Lightning's hooks onto
it and is the only one here that imports lightning.
"""
from __future__ import annotations

import math
from typing import Any

from lora_tune.train.callbacks import CallbackSummary, Pruning, Report, RunMeter

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the Lightning callbacks need lightning: pip install lightning") from exc


class ReportingLightningCallback(Callback):
    """After each validation during ``fit`` (not the sanity check), ``report(global_step,
    eval_index, metrics)`` over ``trainer.callback_metrics`` decides whether to stop
    (``trainer.should_stop``; under DDP from rank 0's decision); ``monitor`` must be among the
    logged metrics, else :class:`~lora_tune.errors.ConfigError` lists them. Tokens are counted
    from each training batch that is a mapping (its ``attention_mask`` sum, else its
    ``input_ids`` size); compute time is the time inside training batches. Lightning's
    ``min_steps``/``min_epochs`` may keep training after a stop; later validations are not
    reported. :meth:`finished` is called with the run's summary.
    """

    def __init__(self, monitor: str | None = "val_loss", *, report: Report | None = None,
                 pruning: Pruning | None = None):
        self.pruning = pruning if pruning is not None else Pruning(monitor, report, metric_field="monitor")
        self.summary: CallbackSummary | None = None
        self._meter: RunMeter | None = None

    @property
    def pruned(self) -> bool:
        return self.pruning.pruned_at is not None

    def finished(self, summary: CallbackSummary) -> None:
        """Called on every rank with the run's summary (subclasses record it)."""

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
        self.finished(self.summary)


def _planned_steps(trainer: Any) -> int:
    """``max_steps`` when set, else Lightning's estimate from epochs and batches (0 if unbounded)."""
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if math.isfinite(estimate) else 0
