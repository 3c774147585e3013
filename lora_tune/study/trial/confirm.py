"""Confirmed winners: the best configs trained again with new seeds, since "best of N" of a noisy
objective is optimistic. Each run is a finished trial beside the budget (``confirm_of``, ``seed``);
:func:`config_groups` gives each config's mean and spread, which export and the summary use.
"""
from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FixedTrial, FrozenTrial, TrialState

from lora_tune.study.trial import record
from lora_tune.study.trial.objective import Objective, TrialFailed


@dataclass(frozen=True)
class ConfigGroup:
    """One config's runs: ``trial`` is the original, ``values`` every run's value (original first)."""

    trial: FrozenTrial
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def confirm_top(study: optuna.Study, objective: Objective, top: int, seeds: int) -> list[FrozenTrial]:
    """Re-run the ``top`` best distinct configs with ``seeds`` new seeds each (runs that exist are
    skipped); returns the runs it added.

    A nested-rank result is confirmed as it was scored: its parent's config is trained again and
    the rank read off that run, which serves every chosen result of that parent (``confirm_shared``)."""
    complete = _originals(study)
    if not complete or len(study.directions) != 1:
        return []
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(complete, key=lambda t: t.value, reverse=reverse)
    chosen: list[FrozenTrial] = []
    for trial in ranked:
        if not any(trial.params == other.params for other in chosen):
            chosen.append(trial)
        if len(chosen) == top:
            break
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    done = {(t.user_attrs[record.CONFIRM_OF], t.user_attrs[record.SEED]) for t in trials.values()
            if record.kind_of(t) == record.Kind.CONFIRMATION}
    base_seed = objective.spec.train.seed
    added: list[FrozenTrial] = []
    runs: dict[tuple[int, int], tuple[FixedTrial, TrialState, float | None]] = {}  # (trained trial, seed)
    for trial in chosen:
        trained = trials.get(trial.user_attrs.get(record.NESTED_PARENT), trial)  # the trial whose training scored it
        for k in range(1, seeds + 1):
            seed = base_seed + 1000 * k  # far from the study's own seed; the same for every config
            if (trial.number, seed) in done:
                continue
            shared = (trained.number, seed) in runs
            if not shared:
                runs[(trained.number, seed)] = _train(objective, trained, trial.number, seed)
            added.append(_record(study, trial, trained, *runs[(trained.number, seed)], shared=shared))
    return added


def _train(objective: Objective, trained: FrozenTrial, number: int, seed: int
           ) -> tuple[FixedTrial, TrialState, float | None]:
    """Train ``trained``'s config again with ``seed`` (the baseline plainly, as it was trained,
    even when its rank is the largest nested rank)."""
    fixed = FixedTrial(dict(trained.params))
    baseline = record.kind_of(trained) == record.Kind.BASELINE
    if baseline:
        fixed.set_user_attr(record.IS_BASELINE, True)
    fixed.set_user_attr(record.CONFIRM_OF, number)
    fixed.set_user_attr(record.SEED, seed)
    try:
        with warnings.catch_warnings():
            if baseline:  # its rank 8 under a nested rank's IntDistribution(R, R), as when it ran
                warnings.filterwarnings("ignore", message=r"The value .* of the parameter 'rank' is out of the range")
            return fixed, TrialState.COMPLETE, objective(fixed)
    except (TrialFailed, optuna.TrialPruned):
        return fixed, TrialState.FAIL, None


def _record(study: optuna.Study, original: FrozenTrial, trained: FrozenTrial, fixed: FixedTrial,
            state: TrialState, value: float | None, shared: bool) -> FrozenTrial:
    """Store one confirmation run of ``original`` (``trained`` is the trial whose config was trained)."""
    # a confirmation run is not the baseline itself (reports mark one baseline)
    attrs = {**fixed.user_attrs, record.CONFIRM_OF: original.number, record.IS_BASELINE: False}
    if original is not trained:  # a nested rank: its metric in the run, its own config
        attrs.pop(record.METRIC_VALUES, None)  # the trained rank's
        mine = record.fidelity_of(original)
        values = (fixed.user_attrs.get(record.NESTED_RANK_VALUES) or {}).get(str(mine.rank)) or []
        value = float(values[0]) if state == TrialState.COMPLETE and values else None
        state = TrialState.COMPLETE if value is not None else TrialState.FAIL
        for key in (record.LORA_CONFIG, record.TRAINABLE_PARAMS, record.ADAPTER_BYTES, record.TARGET_MODULES):
            if key in original.user_attrs:
                attrs[key] = original.user_attrs[key]
        attrs[record.FIDELITY] = {**original.user_attrs.get(record.FIDELITY, {}),
                                  **fixed.user_attrs.get(record.FIDELITY, {})}
    if shared:  # the run's time and memory belong to the record that trained it
        attrs = {k: v for k, v in attrs.items() if k not in record.RUN_ONLY}
        attrs[record.CONFIRM_SHARED] = True
    distributions = {name: _holding(d, original.params[name]) for name, d in original.distributions.items()}
    frozen = optuna.trial.create_trial(
        state=state, value=value, params=dict(original.params), distributions=distributions, user_attrs=attrs)
    study.add_trial(frozen)
    return frozen


def _holding(distribution: BaseDistribution, value: object) -> BaseDistribution:
    """``distribution``, or one of ``value`` alone where it does not hold it (the baseline's rank 8
    under a nested ``IntDistribution(R, R)``, which ``create_trial`` refuses)."""
    try:
        if distribution._contains(distribution.to_internal_repr(value)):
            return distribution
    except (ValueError, TypeError):  # a categorical without the value
        pass
    if isinstance(distribution, IntDistribution):
        return IntDistribution(int(value), int(value))
    if isinstance(distribution, FloatDistribution):
        return FloatDistribution(float(value), float(value))
    return CategoricalDistribution([value])


def _originals(study: optuna.Study) -> list[FrozenTrial]:
    """Complete single-objective trials that are neither confirmation runs nor nested results."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values is not None and len(t.values) == 1 and record.kind_of(t) != record.Kind.CONFIRMATION]


def config_groups(study: optuna.Study) -> list[ConfigGroup]:
    """Every original trial with the values of its confirmation runs, best mean first (none for
    a multi-objective study)."""
    if len(study.directions) != 1:
        return []
    runs: dict[int, list[float]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if record.kind_of(t) == record.Kind.CONFIRMATION and t.value is not None:
            runs.setdefault(int(t.user_attrs[record.CONFIRM_OF]), []).append(float(t.value))
    groups = [ConfigGroup(t, (float(t.value), *runs.get(t.number, []))) for t in _originals(study)]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(groups, key=lambda g: (len(g.values) > 1, g.mean if reverse else -g.mean), reverse=True)


def best_confirmed(study: optuna.Study) -> ConfigGroup | None:
    """The confirmed config with the best mean, or None when nothing was confirmed."""
    confirmed = [g for g in config_groups(study) if len(g.values) > 1]
    return confirmed[0] if confirmed else None


def within_noise(best: ConfigGroup, baseline_value: float) -> bool:
    """Whether the baseline lies within two standard deviations of the best config's mean."""
    return abs(best.mean - baseline_value) <= 2 * best.std


def describe(study: optuna.Study, baseline: FrozenTrial | None) -> list[str]:
    """Lines for the end-of-run summary: the confirmed winner and whether its gain is real."""
    lines: list[str] = []
    best = best_confirmed(study)
    if best is not None:
        lines.append(f"best confirmed config: trial #{best.trial.number}, mean {best.mean:.4f} ± {best.std:.4f} "
                     f"over {len(best.values)} seeds")
        if baseline is not None and baseline.value is not None:
            if within_noise(best, baseline.value):
                lines.append(f"the gain over the baseline ({baseline.value:.4f}) is within the noise "
                             f"(2 × {best.std:.4f}): it may not be real")
            else:
                lines.append(f"the gain over the baseline ({baseline.value:.4f}) is "
                             f"{abs(best.mean - baseline.value):.4f}, "
                             f"more than 2 standard deviations of the best config")
    return lines


__all__ = ["ConfigGroup", "best_confirmed", "config_groups", "confirm_top", "describe", "within_noise"]
