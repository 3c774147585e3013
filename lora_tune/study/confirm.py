"""Confirmed winners and the compute a study used.

LoRA objectives are noisy: the same config at another seed often moves the metric by more than
the gap between neighbouring configs, so "best of N" is optimistic. With ``study.confirm:
{top: k, seeds: s}`` :func:`confirm_top` re-runs the k best distinct configs with s more seeds
each, after the budget. Each run is stored as a finished trial with user attributes
``confirm_of`` (the trial it repeats) and ``seed``; they do not use the trial budget (they are
created with ``study.add_trial``), but they count in :func:`compute_used`. A nested-rank result
is confirmed by training its parent's config again and reading its rank off that run.

:func:`config_groups` gathers each config's runs (the original trial and its confirmations)
with their mean and standard deviation; ``export`` takes the best mean, and the summary says
when the best config's gain over the baseline is within the noise.
"""
from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FixedTrial, FrozenTrial, TrialState

from lora_tune.study.nested import NESTED_KEY, RANK_VALUES_KEY, RUN_ONLY_ATTRS
from lora_tune.study.objective import CONFIRM_KEY, SEED_KEY, Objective, TrialFailed

SHARED_KEY = "confirm_shared"  # user attr of a confirmation run that read another run's training


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


@dataclass(frozen=True)
class Compute:
    """Compute in full-trial equivalents (a trial that ran all its planned steps is 1)."""

    used: float  # what the trials ran
    results: int  # configs scored (trials, plus nested-rank results that cost no training)
    confirm: float  # the part spent on confirmation runs

    @property
    def saved(self) -> float:
        """The share of compute that pruning and nesting saved against training every result fully."""
        return 1.0 - self.used / self.results if self.results else 0.0


def confirm_top(study: optuna.Study, objective: Objective, top: int, seeds: int) -> list[FrozenTrial]:
    """Re-run the ``top`` best distinct configs with ``seeds`` new seeds each (skipping runs that
    exist already, so it is safe to call again); returns the runs it added.

    A nested-rank result was scored by truncating its parent's training, so it is confirmed the
    same way: its parent's config is trained again with the new seed (nested, as the parent
    was) and its rank's metric is read off that run. One such run serves every chosen result
    of the same parent; the runs that read it are marked ``confirm_shared`` and cost nothing."""
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
    done = {(t.user_attrs[CONFIRM_KEY], t.user_attrs[SEED_KEY]) for t in trials.values() if CONFIRM_KEY in t.user_attrs}
    base_seed = objective.spec.train.seed
    added: list[FrozenTrial] = []
    runs: dict[tuple[int, int], tuple[FixedTrial, TrialState, float | None]] = {}  # (trained trial, seed)
    for trial in chosen:
        trained = trials.get(trial.user_attrs.get(NESTED_KEY), trial)  # the trial whose training scored it
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
    baseline = bool(trained.user_attrs.get("is_baseline"))
    if baseline:
        fixed.set_user_attr("is_baseline", True)
    fixed.set_user_attr(CONFIRM_KEY, number)
    fixed.set_user_attr(SEED_KEY, seed)
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
    attrs = {**fixed.user_attrs, CONFIRM_KEY: original.number, "is_baseline": False}
    if original is not trained:  # a nested rank: its metric in the run, its own config
        attrs.pop("metric_values", None)  # the trained rank's
        rank = (original.user_attrs.get("fidelity") or {}).get("rank")
        values = (fixed.user_attrs.get(RANK_VALUES_KEY) or {}).get(str(rank)) or []
        value = float(values[0]) if state == TrialState.COMPLETE and values else None
        state = TrialState.COMPLETE if value is not None else TrialState.FAIL
        for key in ("lora_config", "trainable_params", "adapter_bytes", "target_modules"):
            if key in original.user_attrs:
                attrs[key] = original.user_attrs[key]
        attrs["fidelity"] = {**(original.user_attrs.get("fidelity") or {}), **(fixed.user_attrs.get("fidelity") or {})}
    if shared:  # the run's time and memory belong to the record that trained it
        attrs = {k: v for k, v in attrs.items() if k not in RUN_ONLY_ATTRS}
        attrs[SHARED_KEY] = True
    distributions = {name: _holding(d, original.params[name]) for name, d in original.distributions.items()}
    frozen = optuna.trial.create_trial(
        state=state, value=value, params=dict(original.params), distributions=distributions, user_attrs=attrs)
    study.add_trial(frozen)
    return frozen


def _holding(distribution: BaseDistribution, value: object) -> BaseDistribution:
    """``distribution``, or the one value it does not hold. An enqueued baseline keeps its rank 8
    under a nested rank's ``IntDistribution(R, R)`` (it trains rank 8 plainly); Optuna stores
    that, but ``create_trial`` refuses it, so its confirmation records the rank as nested results
    do: a distribution of that value alone."""
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
            if t.values is not None and len(t.values) == 1 and CONFIRM_KEY not in t.user_attrs]


def config_groups(study: optuna.Study) -> list[ConfigGroup]:
    """Every original trial with the values of its confirmation runs, best mean first (none for
    a multi-objective study)."""
    if len(study.directions) != 1:
        return []
    runs: dict[int, list[float]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if CONFIRM_KEY in t.user_attrs and t.value is not None:
            runs.setdefault(int(t.user_attrs[CONFIRM_KEY]), []).append(float(t.value))
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


def compute_used(study: optuna.Study) -> Compute:
    """Full-trial equivalents of every finished trial (pruned ones count their share of steps;
    nested-rank results cost nothing of their own, nor do confirmation runs that read another
    run's training; confirmation runs count in full)."""
    used = confirm = 0.0
    results = 0
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        results += 1
        if NESTED_KEY in t.user_attrs or SHARED_KEY in t.user_attrs:
            continue
        share = trial_compute(t)
        used += share
        if CONFIRM_KEY in t.user_attrs:
            confirm += share
    return Compute(used, results, confirm)


def trial_compute(trial: FrozenTrial) -> float:
    """Full-trial equivalents one trial trained (its share of planned steps, times its data fraction)."""
    steps, planned = trial.user_attrs.get("train_steps"), trial.user_attrs.get("planned_steps")
    if isinstance(steps, (int, float)) and isinstance(planned, (int, float)) and planned > 0:
        share = min(1.0, steps / planned)
    else:  # failed before training, or pruned as infeasible: no training compute
        share = 0.0 if trial.state != TrialState.COMPLETE else 1.0
    fraction = (trial.user_attrs.get("fidelity") or {}).get("data_fraction", 1.0)
    return share * float(fraction) if isinstance(fraction, (int, float)) and math.isfinite(fraction) else share


def describe(study: optuna.Study, baseline: FrozenTrial | None) -> list[str]:
    """Lines for the end-of-run summary: compute used and saved, confirmed winners."""
    c = compute_used(study)
    lines = [f"compute: {c.used:.1f} full-trial equivalents for {c.results} results "
             f"({c.saved:.0%} saved by pruning, nesting and data fractions"
             + (f"; {c.confirm:.1f} of it on confirmation runs)" if c.confirm else ")")]
    best = best_confirmed(study)
    if best is not None:
        lines.append(f"best confirmed config: trial #{best.trial.number}, mean {best.mean:.4f} ± {best.std:.4f} "
                     f"over {len(best.values)} seeds")
        if baseline is not None and baseline.value is not None:
            if within_noise(best, baseline.value):
                lines.append(f"the gain over the baseline ({baseline.value:.4f}) is within the noise "
                             f"(2 × {best.std:.4f}): it may not be real")
            else:
                lines.append(f"the gain over the baseline ({baseline.value:.4f}) is {abs(best.mean - baseline.value):.4f}, "
                             f"more than 2 standard deviations of the best config")
    return lines


__all__ = ["Compute", "ConfigGroup", "best_confirmed", "compute_used", "config_groups", "confirm_top", "describe",
           "trial_compute", "within_noise"]
