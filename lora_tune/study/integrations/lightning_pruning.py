"""``LoraTuneLightningCallback``: Optuna pruning and lora-tune's trial measurements for
``lightning.pytorch`` training."""
from __future__ import annotations

import optuna

from lora_tune.study.integrations.trial_binding import TrialBinding, trial_pruning
from lora_tune.train.callbacks import Report
from lora_tune.train.lightning_callback import ReportingLightningCallback


class LoraTuneLightningCallback(TrialBinding, ReportingLightningCallback):
    """The ``lightning.pytorch`` twin of :class:`~lora_tune.study.integrations.transformers_pruning.LoraTuneCallback`:
    ``monitor`` is the key of ``trainer.callback_metrics`` reported after each validation during
    ``fit``; call :meth:`raise_if_pruned` after ``trainer.fit``.
    """

    def __init__(self, trial: optuna.trial.BaseTrial | None = None, monitor: str | None = "val_loss", *,
                 report: Report | None = None, direction: str | None = None):
        self.trial = trial
        super().__init__(pruning=trial_pruning(trial, monitor, report, direction, metric_field="monitor"))
