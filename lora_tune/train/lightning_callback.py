"""``ReportingLightningCallback``: :mod:`lora_tune.train.callbacks` on ``lightning.pytorch``'s hooks
(the only module here that imports lightning)."""
from __future__ import annotations

import math
from typing import Any

from lora_tune.train.callbacks import Pruning, Report, ReportingBase

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the Lightning callbacks need lightning: pip install lightning") from exc


class ReportingLightningCallback(ReportingBase, Callback):
    """After each validation during ``fit`` (not the sanity check), ``report(global_step,
    eval_index, metrics)`` over ``trainer.callback_metrics`` decides whether to stop (later
    validations, under Lightning's ``min_steps``/``min_epochs``, are not reported). Tokens are
    counted from each training batch that is a mapping; compute is the time inside batches.
    """

    def __init__(self, monitor: str | None = "val_loss", *, report: Report | None = None,
                 pruning: Pruning | None = None):
        super().__init__(pruning if pruning is not None else Pruning(monitor, report, metric_field="monitor"))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start(pl_module, pl_module.device)

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
        if self._meter is not None:
            self._end(trainer.global_step, _planned_steps(trainer))


def _planned_steps(trainer: Any) -> int:
    """``max_steps`` when set, else Lightning's estimate from epochs and batches (0 if unbounded)."""
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        return int(trainer.max_steps)
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if math.isfinite(estimate) else 0
