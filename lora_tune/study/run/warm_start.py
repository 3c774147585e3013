"""Warm starts: enqueue configs known to be good before the sampler starts guessing: the best
trials of an earlier study (``lora-tune run --warm-start``; targets resolved again on this model)
or :data:`PRIOR` (``study.warm_start: defaults``), projected onto this study's space, each once.

The prior's learning rates: with a learning-rate probe (``study.lr_probe``) they are stated in what
transfers between tasks, the probe's rate and the adapter's effective scale (:func:`probe_prior`),
and a config whose rate at its scale would pass the probe's edge is dropped
(:mod:`lora_tune.study.run.lr_probe`); without one, multiples of the typical rate of the task's kind
of model (:func:`prior`).
"""
from __future__ import annotations

import math
from typing import Any
from collections.abc import Callable, Iterable, Mapping

import optuna
from optuna.trial import TrialState

from lora_tune.errors import ConfigError
from lora_tune.study.trial import record
from lora_tune.study.schema.space import Param, SearchSpace, encode_choice


# QLoRA's recipe and two neighbours: (config, learning rate as a multiple of the model kind's typical
# one; with a probe, of the probe's rate at the probe adapter's scale)
PRIOR: tuple[tuple[dict[str, Any], float], ...] = (
    ({"rank": 16, "alpha": 32.0, "targets": "all-linear", "dropout": 0.05}, 1.0),
    ({"rank": 8, "alpha": 16.0, "targets": "attention", "dropout": 0.0}, 2.0),
    ({"rank": 32, "alpha": 64.0, "targets": "all-linear", "dropout": 0.05}, 0.5),
)


def prior(model_kind: str) -> list[dict[str, Any]]:
    """The :data:`PRIOR` configs with learning rates for ``model_kind``."""
    from lora_tune.study.schema.templates import TYPICAL_LEARNING_RATE

    if model_kind not in TYPICAL_LEARNING_RATE:
        raise ConfigError("model_kind", model_kind, ", ".join(TYPICAL_LEARNING_RATE))
    typical = TYPICAL_LEARNING_RATE[model_kind]
    return [{**config, "learning_rate": typical * factor} for config, factor in PRIOR]


def probe_prior(rate: float, scale: float) -> list[dict[str, Any]]:
    """The :data:`PRIOR` configs with learning rates from a probe whose adapter had effective scale
    ``scale`` and found ``rate``: each config's multiple of ``rate``, divided by its scale over the
    probe's (an adapter with twice the scale moves its weights twice as far per step: half the rate)."""
    return [{**config, "learning_rate": rate * factor * scale / config_scale(config)} for config, factor in PRIOR]


def config_scale(settings: Mapping[str, Any]) -> float:
    """The effective scale of ``settings`` (alpha / rank, alpha / sqrt(rank) with rsLoRA), LoraConfig's
    defaults for what they leave out."""
    from lora_tune.lora.config import scale_for
    from lora_tune.study.schema.space import LORA_DEFAULTS

    rank = settings.get("rank") or LORA_DEFAULTS["rank"]
    alpha = settings.get("alpha") or LORA_DEFAULTS["alpha"]
    return scale_for(int(rank), float(alpha), bool(settings.get("rslora", LORA_DEFAULTS["rslora"])))


def configs_from_study(source: optuna.Study, top: int = 5) -> list[dict[str, Any]]:
    """The setting values (``rank``, ``alpha``, ``targets``, ... as the config has them) of the
    ``top`` best complete trials of ``source``; ConfigError when it has none."""
    complete = [t for t in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values is not None and len(t.values) == 1]
    if not complete:
        raise ConfigError("--warm-start", source.study_name,
                          "a study with at least one complete single-objective trial")
    reverse = source.direction == optuna.study.StudyDirection.MAXIMIZE
    best = sorted(complete, key=lambda t: t.value, reverse=reverse)[:top]
    return [settings_of(t) for t in best]


def settings_of(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial's setting values: its LoRA config as recorded, with its sampled training values."""
    lora = dict(trial.user_attrs.get(record.LORA_CONFIG) or {})
    preset = trial.user_attrs.get(record.TARGET_PRESET)
    out = {k: lora[k] for k in ("rank", "alpha", "dropout", "quant_bits", "quant_type", "method", "rslora",
                                "init", "bias", "use_dora") if k in lora}
    out["targets"] = preset if preset else lora.get("targets")
    for name, value in trial.params.items():
        if name not in out and name not in ("alpha_ratio", "targets", "rank", "quant_bits"):
            out[name] = value
    return out


def project(space: SearchSpace, settings: Mapping[str, Any], fits: Any = None) -> dict[str, Any] | None:
    """Trial parameters of ``settings`` in ``space``, numbers clamped into ranges; None when the
    space has no choice for one of its values, or its targets do not ``fits(targets)`` the model."""
    params: dict[str, Any] = {}
    rank = settings.get("rank")
    for p in space.sampled:
        if p.kind == "ratio":
            if rank and settings.get("alpha") is not None:
                params[p.name] = _nearest(p.choices, settings["alpha"] / float(params.get("rank", rank)))
            continue
        if p.key not in settings:
            continue
        value = settings[p.key]
        if p.key == "targets" and fits is not None and not fits(value):
            return None
        encoded = encode_choice(p.key, value)
        if p.kind == "categorical":
            match = next((c for c in p.choices if c == encoded and type(c) is type(encoded)), None)
            if match is None:
                return None  # the space cannot express this config: another choice would not be it
            params[p.name] = match
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            params[p.name] = _clamp(p, value)
    return params or None


def enqueue(study: optuna.Study, configs: Iterable[Mapping[str, Any]], origin: str) -> int:
    """Enqueue each config not already in the study; returns how many were enqueued."""
    seen = [dict(t.params) or dict(t.user_attrs.get(record.ENQUEUED_PARAMS) or {})
            for t in study.get_trials(deepcopy=False)]
    added = 0
    for params in configs:
        if any(_same(params, other) for other in seen):
            continue
        study.enqueue_trial(dict(params), user_attrs={record.WARM_START: origin, record.ENQUEUED_PARAMS: dict(params)})
        seen.append(dict(params))
        added += 1
    return added


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, float) or isinstance(other, float):
            if not (isinstance(other, (int, float)) and math.isclose(float(value), float(other), rel_tol=1e-9)):
                return False
        elif value != other:
            return False
    return True


def _nearest(choices: list[Any], value: float) -> Any:
    return min(choices,
               key=lambda c: abs(math.log(float(c)) - math.log(value)) if c > 0 and value > 0 else abs(c - value))


def _clamp(p: Param, value: float) -> float | int:
    low, high = float(p.low), float(p.high)
    value = min(max(float(value), low), high)
    if p.kind == "int":
        step = int(p.step or 1)
        return int(low + round((value - low) / step) * step)
    if p.step:
        return low + round((value - low) / p.step) * p.step
    return value


def targets_fit(task: Any) -> Any:
    """``fits(targets) -> bool`` on the task's model: a preset or pattern list that matches it."""
    from lora_tune import LoraConfig, find_targets
    from lora_tune.tasks.base import structure_of

    model = structure_of(task)

    def fits(targets: Any) -> bool:
        value = targets.split("|") if isinstance(targets, str) and "|" in targets else targets
        try:
            find_targets(model, LoraConfig(targets=value))
        except (ConfigError, ValueError):
            return False
        return True

    return fits


def warm_start(study: optuna.Study, space: SearchSpace, configs: Iterable[Mapping[str, Any]], task: Any,
               origin: str, keep: Callable[[dict[str, Any]], bool] | None = None) -> int:
    """Project ``configs`` onto ``space`` (targets checked on the task's model; ``task`` None: the
    space's own choices only, checked against the model when the study was created) and enqueue
    the new ones that ``keep(params)`` (when given); returns how many were enqueued."""
    sampled = space["targets"] is not None and space["targets"].sampled
    fits = targets_fit(task) if sampled and task is not None else None
    projected = [p for p in (project(space, c, fits) for c in configs) if p and (keep is None or keep(p))]
    return enqueue(study, projected, origin)
