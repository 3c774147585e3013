"""``LoraTuneCallback``: Optuna pruning and lora-tune's trial measurements for any
``transformers.Trainer`` (and trainers built on it, such as TRL's ``SFTTrainer``)."""
from __future__ import annotations

import optuna

from lora_tune.study.integrations.trial_binding import TrialBinding, trial_pruning
from lora_tune.train.callbacks import Report
from lora_tune.train.hf_callback import ReportingCallback


class LoraTuneCallback(TrialBinding, ReportingCallback):
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
    prune, training stops (under DDP every rank stops after the same step) and
    :meth:`raise_if_pruned`, called after ``trainer.train()``, raises ``optuna.TrialPruned`` so
    that the trial ends PRUNED. Evaluations outside ``train()`` (a final ``trainer.evaluate()``)
    are not reported. At the end of training :attr:`summary` holds a
    :class:`~lora_tune.train.callbacks.CallbackSummary` and, with a trial, rank 0 writes it to
    the trial as lora-tune's own trials record a run
    (:func:`lora_tune.study.trial.record.run_attrs`). Tokens are counted as
    :class:`~lora_tune.train.hf_callback.ReportingCallback` says.
    """

    def __init__(self, trial: optuna.trial.BaseTrial | None = None, metric: str | None = "eval_loss", *,
                 report: Report | None = None, direction: str | None = None):
        self.trial = trial
        super().__init__(pruning=trial_pruning(trial, metric, report, direction))
