"""The Optuna samplers a study may name, and building one (the one sampler factory).

``runner.build_sampler`` builds the study file's sampler with it; a plain Optuna study run by
``lora-tune worker --objective`` names its sampler in its ``sampler`` user attribute
(:func:`plain_study_sampler`). Importing this module stays light (no torch): plain workers
start fast.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from lora_tune.errors import ConfigError

SAMPLERS: dict[str, Callable[[], type]] = {
    "tpe": lambda: optuna.samplers.TPESampler,
    "random": lambda: optuna.samplers.RandomSampler,
    "grid": lambda: optuna.samplers.GridSampler,
    "cmaes": lambda: optuna.samplers.CmaEsSampler,
    "gp": lambda: optuna.samplers.GPSampler,
    "nsga2": lambda: optuna.samplers.NSGAIISampler,
}


def make_sampler(kind: str, seed: int | None, options: Mapping[str, Any]) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``kind`` (a study file's ``sampler.type``) with ``options``.

    Raises TypeError/ValueError from the sampler for bad options (callers name the field).
    """
    if kind not in SAMPLERS:
        raise ConfigError("sampler type", kind, " | ".join(SAMPLERS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS[kind]()(seed=seed, **options)


def plain_study_sampler(user_attrs: Mapping[str, Any]) -> optuna.samplers.BaseSampler | None:
    """The sampler a plain Optuna study names in its ``sampler`` user attribute, e.g.
    ``{"type": "grid", "search_space": {...}, "seed": 0}`` (None when it names none: TPE)."""
    options = user_attrs.get("sampler")
    if options is None:
        return None
    field = "study user attribute sampler"
    if not isinstance(options, dict) or "type" not in options:
        raise ConfigError(field, options, "{type: " + " | ".join(SAMPLERS) + ", seed: N, ...options}")
    rest = {k: v for k, v in options.items() if k not in ("type", "seed")}
    try:
        return make_sampler(options["type"], options.get("seed"), rest)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(field, options, f"options of Optuna's {options['type']} sampler", str(exc)) from None


def load_plain_study(name: str, storage_url: str) -> optuna.Study:
    """Load a plain Optuna study (no stored study file) for a worker running its own objective;
    its sampler comes from its ``sampler`` user attribute. Unknown name: StudyNotFoundError."""
    from lora_tune.errors import StudyNotFoundError
    from lora_tune.study.storage import dispose_storage, mask_url, open_storage

    storage = open_storage(storage_url)
    try:
        names = optuna.get_all_study_names(storage)
        if name not in names:
            raise StudyNotFoundError(name, mask_url(storage_url), sorted(names))
        sampler = plain_study_sampler(storage.get_study_user_attrs(storage.get_study_id_from_name(name)))
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except BaseException:
        dispose_storage(storage)
        raise
