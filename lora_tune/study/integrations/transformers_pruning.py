"""``LoraTuneCallback``: Optuna pruning and lora-tune's trial measurements for any
``transformers.Trainer`` (and trainers built on it, such as TRL's ``SFTTrainer``)."""
from __future__ import annotations

import optuna

from lora_tune.study.integrations.trial_binding import TrialBinding, trial_pruning
from lora_tune.train.callbacks import Report
from lora_tune.train.hf_callback import ReportingCallback


class LoraTuneCallback(TrialBinding, ReportingCallback):
    """Report every evaluation during ``train()`` to an Optuna trial as ``trial.report(value,
    eval_index)``, stop training when its pruner says so, and record what lora-tune's own trials
    record; call :meth:`raise_if_pruned` after ``trainer.train()``.

    ``trial``: under DDP the trial on rank 0 (None on the others). ``metric``: the evaluation
    metric's key, with or without ``eval_``. ``report``: instead of a trial,
    ``report(global_step, eval_index, metrics) -> bool`` (stop?). ``direction``: checked against
    the trial's study.
    """

    def __init__(self, trial: optuna.trial.BaseTrial | None = None, metric: str | None = "eval_loss", *,
                 report: Report | None = None, direction: str | None = None):
        self.trial = trial
        super().__init__(pruning=trial_pruning(trial, metric, report, direction))
