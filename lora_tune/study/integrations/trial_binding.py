"""What the pruning callbacks (``LoraTuneCallback``, ``LoraTuneLightningCallback``) add to the
Optuna-free reporting callbacks of :mod:`lora_tune.train`: a trial that each evaluation is
reported to, and that gets the run's measurements as lora-tune's own trials record them.
"""
from __future__ import annotations

import math
from typing import Any

import optuna

from lora_tune.errors import ConfigError
from lora_tune.study.trial import record
from lora_tune.train.callbacks import CallbackSummary, Pruning, Report, metric_key

__all__ = ["TrialBinding", "pruned_after_training", "trial_pruning", "trial_reporter"]


def pruned_after_training(trial: optuna.trial.BaseTrial | None, eval_index: int, steps: int, planned: int) -> bool:
    """Whether a prune decided at evaluation ``eval_index`` came when all ``planned`` steps were
    trained: then it would save nothing, so the trial completes (recording ``prune_ignored``)."""
    if not planned or steps < planned:
        return False
    if trial is not None:
        trial.set_user_attr(record.PRUNE_IGNORED, f"the pruner said prune at its last evaluation {eval_index}")
    return True


def trial_reporter(trial: optuna.trial.BaseTrial, metric: str) -> Report:
    """A :data:`~lora_tune.train.callbacks.Report` of ``metric`` to ``trial`` that returns the
    pruner's answer (a non-finite value is not reported, as in lora-tune's own trials)."""

    def report(step: int, eval_index: int, metrics: dict) -> bool:
        value = float(metrics[metric_key(metric, metrics)])
        if not math.isfinite(value):
            return False
        trial.report(value, eval_index)
        return bool(trial.should_prune())

    return report


def trial_pruning(trial: optuna.trial.BaseTrial | None, metric: str | None, report: Report | None,
                  direction: str | None, metric_field: str = "metric") -> Pruning:
    """The :class:`~lora_tune.train.callbacks.Pruning` of a callback given a ``trial`` or a ``report``."""
    if trial is not None and report is not None:
        raise ConfigError("report", report, "None when a trial is given",
                          "Pass either trial= (report to it) or report= (decide yourself), not both.")
    if metric is None and trial is not None:
        raise ConfigError(metric_field, None, "the name of the metric to report to the trial")
    if direction is not None and direction.lower() not in ("minimize", "maximize"):
        raise ConfigError("direction", direction, "'minimize', 'maximize' or None")
    if trial is not None:
        _check_trial(trial, direction)
        report = trial_reporter(trial, metric)
    return Pruning(metric, report, metric_field)


def _check_trial(trial: Any, direction: str | None) -> None:
    """A trial Optuna can prune, of a study optimizing in ``direction`` (when given)."""
    if type(trial).__name__ == "TorchDistributedTrial":
        raise ConfigError("trial", type(trial).__name__, "a plain Optuna trial on rank 0 (None on other ranks)",
                          "The callback already broadcasts rank 0's decision; a TorchDistributedTrial's "
                          "collective calls would wait for ranks that never make them.")
    study = getattr(trial, "study", None)
    if study is None:  # FixedTrial and the like
        return
    directions = [d.name.lower() for d in study.directions]
    if len(directions) > 1:
        raise ConfigError("trial", f"a trial of a study with directions {directions}",
                          "a trial of a single-objective study",
                          "Optuna cannot prune multi-objective trials; pass report=... or no trial.")
    if direction is not None and direction.lower() != directions[0]:
        raise ConfigError("direction", direction, f"the study's direction, {directions[0]!r}",
                          f"Study {study.study_name!r} {directions[0]}s its objective; monitor a metric "
                          "that goes the same way, or create the study with the other direction.")


class TrialBinding:
    """What the trial-bound callbacks add to their reporting base class; subclasses set
    ``trial`` and build their ``pruning`` with :func:`trial_pruning`."""

    trial: optuna.trial.BaseTrial | None
    pruning: Pruning
    summary: CallbackSummary | None = None  # set by the reporting base class once training ended

    def raise_if_pruned(self) -> None:
        """Raise ``optuna.TrialPruned`` when pruned (on every rank), unless
        :func:`pruned_after_training`."""
        at = self.pruning.pruned_at
        if at is None:
            return
        summary = self.summary
        if summary is not None and pruned_after_training(self.trial if self.pruning.main else None, at.eval_index,
                                                         summary.steps, summary.planned_steps):
            return
        raise optuna.TrialPruned(f"pruned after evaluation {at.eval_index} (step {at.step})")

    def finished(self, summary: CallbackSummary) -> None:
        """Write the summary to the trial as user attributes (rank 0 only; no trial: nothing)."""
        if self.trial is not None and self.pruning.main:
            attrs = {record.TRAINABLE_PARAMS: int(summary.trainable_params), **record.run_attrs(summary)}
            for key, value in attrs.items():
                self.trial.set_user_attr(key, value)

