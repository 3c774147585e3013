"""The Optuna samplers a study may name, and the one sampler factory (no torch: plain
``lora-tune worker --objective`` workers start fast)."""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lora_tune.errors import ConfigError
from lora_tune.study import _optuna_private as private

_logger = logging.getLogger("lora_tune.workers")


class OrderedGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler, with grid points chosen in trial-number order: no point twice, no lock.

    Two of Optuna's trials picking at once can pick the same unvisited point; here a trial picks
    only once every lower-numbered trial has (waiting at most ``wait_limit`` seconds for one whose
    worker died), which needs only reads, so it works through a storage proxy too.
    """

    def __init__(self, search_space: Mapping[str, Sequence[Any]], seed: int | None = None, *,
                 wait_limit: float = 30.0):
        super().__init__(search_space, seed)
        self.wait_limit = wait_limit

    @classmethod
    def like(cls, sampler: optuna.samplers.GridSampler, wait_limit: float = 30.0) -> OrderedGridSampler:
        """An OrderedGridSampler with ``sampler``'s grid, in its shuffled order, and its random state."""
        ordered = cls.__new__(cls)
        private.copy_grid_state(sampler, ordered)
        ordered.wait_limit = wait_limit
        return ordered

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not _grid_assigned(trial):
            _wait_for_lower_picks(study, trial, self.wait_limit)
        super().before_trial(study, trial)


def _grid_assigned(trial: FrozenTrial) -> bool:
    """Whether ``trial`` has its point already: picked, or given (a retry, an enqueued trial)."""
    return private.GRID_ID_KEY in trial.system_attrs or private.FIXED_PARAMS_KEY in trial.system_attrs


def _wait_for_lower_picks(study: optuna.Study, trial: FrozenTrial, limit: float) -> None:
    storage, deadline, pause = private.study_storage(study), time.monotonic() + limit, 0.01
    while True:
        running = storage.get_all_trials(private.study_id(study), deepcopy=False, states=(TrialState.RUNNING,))
        if not any(t.number < trial.number and not _grid_assigned(t) for t in running):
            return
        if time.monotonic() > deadline:
            _logger.warning("trial %d: an earlier trial has not chosen its grid point for %.0f s; choosing anyway",
                            trial.number, limit)
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


SAMPLERS: dict[str, Callable[[], type]] = {
    "tpe": lambda: optuna.samplers.TPESampler,
    "random": lambda: optuna.samplers.RandomSampler,
    "grid": lambda: OrderedGridSampler,
    "cmaes": lambda: optuna.samplers.CmaEsSampler,
    "gp": lambda: optuna.samplers.GPSampler,
    "nsga2": lambda: optuna.samplers.NSGAIISampler,
}


def make_sampler(kind: str, seed: int | None, options: Mapping[str, Any]) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``kind`` with ``options`` (bad ones raise the sampler's TypeError/ValueError)."""
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
    """Load a plain Optuna study (no stored study file) with its ``sampler`` user attribute's sampler."""
    from lora_tune.errors import StudyNotFoundError
    from lora_tune.study.storage.opening import dispose_storage, mask_url, open_storage

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
