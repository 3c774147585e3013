"""Nested ranks in a study: a trial trains the largest listed rank R with nested rank dropout
(:mod:`lora_tune.lora.nested`) and is R's result; :func:`record_nested_ranks` adds each smaller
rank r as a finished trial of its own (``study.add_trial``: parameter ``rank`` = r, the parent's
state, r's values and intermediate values, ``nested_parent``, the parent's record without its
time and memory), so that samplers, pruners, reports and export see it as any other result. A
best rank's truncated adapter is stored on the running parent (Optuna attaches artifacts to
running trials only) under the result's number.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial, TrialState

from lora_tune.lora.nested import NestedRanks, split_rank_metrics, truncated
from lora_tune.study.trial import record
_logger = logging.getLogger(__name__)


def rank_config(config: Any, nested: NestedRanks, r: int) -> Any:
    """The LoraConfig of rank r's adapter: the trial's, with rank r and its alpha."""
    return dataclasses.replace(config, rank=r, alpha=nested.alpha_of(r))


def record_nested_ranks(trial: optuna.trial.BaseTrial, objective: Any, nested: NestedRanks | None,
                        outcome: Any, value: float | list[float] | None) -> list[FrozenTrial]:
    """Record a nested trial's smaller ranks as trials of their own, once the parent's result is
    recorded (``value``: None when it was pruned); the trials added (none for a ``FixedTrial``)."""
    if nested is None or outcome.result is None:
        return []
    result = outcome.result
    full, final = split_rank_metrics(result.final_metrics)
    trial.set_user_attr(record.METRIC_VALUES, record.metric_values(full))
    trial.set_user_attr(record.NESTED_RANKS, list(nested.ranks))
    archives = dict(getattr(outcome, "rank_archives", None) or {})
    try:
        if not isinstance(trial, optuna.Trial):  # e.g. a confirmation run: it keeps each rank's values
            trial.set_user_attr(record.NESTED_RANK_VALUES, {str(r): _rank_values(objective, final.get(r, {}))[0]
                                                  for r in nested.smaller})
            return []
        added = [_add_rank(trial, objective, nested, outcome, r, final.get(r, {}), value is None)
                 for r in nested.smaller]
        if value is not None:
            _save_best_ranks(trial, nested, outcome, value, added, archives)
        return added
    finally:
        for path in archives.values():
            with contextlib.suppress(OSError):
                os.unlink(path)


def _add_rank(trial: optuna.Trial, objective: Any, nested: NestedRanks, outcome: Any, r: int,
              metrics: dict[str, float], pruned: bool) -> FrozenTrial:
    result = outcome.result
    values, metrics, trainable, adapter_bytes = _rank_values(objective, metrics)
    names = objective.metrics
    state = TrialState.PRUNED if pruned else TrialState.COMPLETE
    attrs = {k: v for k, v in trial.user_attrs.items() if k not in record.RUN_ONLY}
    attrs.update({
        record.NESTED_PARENT: trial.number,
        record.FIDELITY: record.fidelity_of(trial)._replace(rank=r, trained_rank=nested.top).to_attr(),
        record.LORA_CONFIG: rank_config(outcome.config, nested, r).to_dict(),
        record.TRAINABLE_PARAMS: trainable, record.ADAPTER_BYTES: adapter_bytes,
        record.METRIC_VALUES: record.metric_values(metrics),
    })
    if not pruned and (not values or not all(math.isfinite(v) for v in values)):
        state, values = TrialState.FAIL, []
        attrs[record.FAIL_REASON] = f"rank {r}: metric {names} is {values or 'missing'} after {result.steps} steps"
    intermediate = {}
    if objective.prune:  # the parent reported its metric after every evaluation; so does each rank
        for index, row in enumerate(result.history):
            row_metrics = split_rank_metrics(row)[1].get(r)
            if row_metrics and names[0] in row_metrics and math.isfinite(row_metrics[names[0]]):
                intermediate[index] = float(row_metrics[names[0]])
    limit = objective.spec.constraints.max_trainable_params
    frozen = optuna.trial.create_trial(
        state=state, values=values if state == TrialState.COMPLETE else None,
        params={**trial.params, "rank": r}, distributions={**trial.distributions, "rank": IntDistribution(r, r)},
        user_attrs=attrs, intermediate_values=intermediate,
        constraints={"max_trainable_params": float(trainable - limit)} if limit is not None else None)
    trial.study.add_trial(frozen)
    return frozen


def _rank_values(objective: Any, metrics: dict[str, float]) -> tuple[list[float], dict[str, float], int, int]:
    """One rank's objective values (empty when it has no metrics), its other metrics, its
    trainable parameters and adapter bytes."""
    metrics = dict(metrics)
    trainable = int(metrics.pop(record.TRAINABLE_PARAMS, 0))
    adapter_bytes = int(metrics.pop(record.ADAPTER_BYTES, 0))
    values = [record.objective_value(name, metrics, trainable) for name in objective.metrics] if metrics else []
    return values, metrics, trainable, adapter_bytes


def _save_best_ranks(trial: optuna.Trial, nested: NestedRanks, outcome: Any, value: Any,
                     added: list[FrozenTrial], archives: dict[int, str]) -> None:
    """Store the truncated adapter of each rank that is the best result so far."""
    from lora_tune.errors import LoraTuneError
    from lora_tune.study.trial.artifacts import beaten_by, is_best_so_far, save_best_adapter

    study = trial.study
    stored = {record.fidelity_of(t).rank: t for t in study.get_trials(deepcopy=False)
              if t.user_attrs.get(record.NESTED_PARENT) == trial.number and t.state == TrialState.COMPLETE}
    parent = [value] if isinstance(value, (int, float)) else list(value)
    for r, t in stored.items():
        if not is_best_so_far(study, t.values, exclude_number=t.number) or beaten_by(study, t.values, parent):
            continue
        config = rank_config(outcome.config, nested, r)
        try:
            if r in archives:  # trained in a child process, which wrote each rank's adapter
                save_best_adapter(t, None, t.values, config=config, archive=archives[r], force=True, attach_to=trial)
            elif outcome.model is not None:
                with truncated(outcome.model, nested, r):
                    save_best_adapter(t, outcome.model, t.values, config=config, force=True, attach_to=trial)
        except (OSError, LoraTuneError) as exc:
            trial.set_user_attr(record.ARTIFACT_ERROR, f"rank {r}: {str(exc).strip()[:500]}")
            _logger.warning("trial %d: adapter of nested rank %d not saved: %s", trial.number, r, exc)


def write_rank_archives(model: Any, nested: NestedRanks, config: Any, folder: Path) -> dict[int, str]:
    """Each smaller rank's truncated adapter zipped in ``folder`` (by a trial's child process)."""
    from lora_tune.study.trial.artifacts import write_adapter_archive

    out = {}
    for r in nested.smaller:
        path = Path(folder) / f"adapter-rank{r}.zip"
        with truncated(model, nested, r):
            write_adapter_archive(model, path, config=rank_config(config, nested, r))
        out[r] = str(path)
    return out


# -- checks against the task's model ----------------------------------------------------------------

def nested_problems(space: Any, task: Any, model: Any = None) -> list[tuple[str, str]]:
    """Problems of ``search_space.rank.nested`` that only the task can tell: its own trainer, or a
    rank above min(in, out) of every target of a targets choice. ``model``: the task's, if built."""
    from lora_tune import LoraConfig
    from lora_tune.errors import ConfigError
    from lora_tune.lora.inject import resolve
    from lora_tune.tasks.base import structure_of

    p = space["rank"]
    if p is None or p.kind != "nested":
        return []
    path = "search_space.rank.nested"
    if getattr(task, "train_adapted", None) is not None:
        return [(path, f"the {getattr(task, 'name', 'task')!r} task trains with its own trainer; nested ranks "
                 "need lora-tune's training loop (use `choices: [...]` for rank)")]
    model = model if model is not None else structure_of(task)
    problems = []
    for choice in space.values_of("targets") or ["all-linear"]:
        targets = choice.split("|") if isinstance(choice, str) and "|" in choice else choice
        try:
            found, _ = resolve(model, LoraConfig(targets=targets))
        except ConfigError:
            continue  # reported as a problem of search_space.targets
        limit = max((d for d in (_min_dim(t.module) for t in found) if d), default=None)
        if limit is None:  # no plain weight to measure (e.g. expert stacks): nothing to check
            continue
        over = [r for r in p.choices if r > limit]
        if over:
            i = p.choices.index(over[0])
            problems.append((f"{path}[{i}]", f"rank {over[0]} is above min(in, out) of every target of "
                             f"targets {choice!r} (at most {limit}); list ranks up to {limit}"))
    return problems


def _min_dim(module: Any) -> int:
    """min(in, out) of a target module's weight: what bounds the rank of its update."""
    weight = getattr(module, "weight", None)
    if weight is None:
        weight = getattr(module, "in_proj_weight", None)
    if weight is None or weight.dim() < 2:
        return 0
    return int(min(weight.shape[0], weight[0].numel()))
