"""``LoraTuneLightningCallback``: Optuna pruning and lora-tune's trial measurements for
``lightning.pytorch`` training."""
from __future__ import annotations

import optuna

from lora_tune.study.integrations.trial_binding import TrialBinding, trial_pruning
from lora_tune.train.callbacks import Report
from lora_tune.train.lightning_callback import ReportingLightningCallback


class LoraTuneLightningCallback(TrialBinding, ReportingLightningCallback):
    """Report every validation to an Optuna trial, stop training when its pruner says so, and
    record what lora-tune's own trials record: the ``lightning.pytorch`` twin of
    :class:`~lora_tune.study.integrations.transformers_pruning.LoraTuneCallback`.

    ``monitor`` is the key of ``trainer.callback_metrics`` to report (what the module logged with
    ``self.log``, e.g. ``"val_loss"``); a missing one raises
    :class:`~lora_tune.errors.ConfigError` listing those logged. After each validation during
    ``fit`` (not the sanity check) the value goes to ``trial.report(value, eval_index)``, then
    ``trial.should_prune()`` decides; on a prune ``trainer.should_stop`` is set (under DDP on
    every rank, from rank 0's decision) and :meth:`raise_if_pruned`, called after
    ``trainer.fit``, raises ``optuna.TrialPruned``. ``report`` replaces the trial as in
    ``LoraTuneCallback``.
    """

    def __init__(self, trial: optuna.trial.BaseTrial | None = None, monitor: str | None = "val_loss", *,
                 report: Report | None = None, direction: str | None = None):
        self.trial = trial
        super().__init__(pruning=trial_pruning(trial, monitor, report, direction, metric_field="monitor"))
