"""Every private Optuna name lora-tune relies on, in one place.

Optuna has no public accessor for these; each is used by Optuna's own code and tests the same
way. ``tests/storage/test_optuna_private.py`` exercises each one against the installed
Optuna, so an upgrade that renames or changes one fails there, loudly, instead of somewhere
in a worker.
"""
from __future__ import annotations

from typing import Any

import optuna

# System attributes GridSampler reads and writes on a trial (optuna/samplers/_grid.py), and
# the one ``Study.enqueue_trial`` writes.
GRID_ID_KEY = "grid_id"
GRID_SPACE_KEY = "search_space"
FIXED_PARAMS_KEY = "fixed_params"


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes (``Study._storage``)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage's id of the study (``Study._study_id``)."""
    return study._study_id


def frozen_study_id(study: Any) -> int:
    """The id of a ``FrozenStudy`` from ``get_all_studies`` (``FrozenStudy._study_id``)."""
    return study._study_id


def trial_id(trial: Any) -> int:
    """The storage's id of a ``Trial`` or ``FrozenTrial`` (``_trial_id``)."""
    return trial._trial_id


def stop_requested(study: optuna.Study) -> bool:
    """Whether ``study.stop()`` was called in the current optimize loop (``Study._stop_flag``)."""
    return bool(study._stop_flag)


def cached_rdb(rdb: optuna.storages.RDBStorage) -> optuna.storages.BaseStorage:
    """Optuna's trial cache in front of an RDB storage, what ``optuna.create_study(storage=URL)``
    uses (``optuna.storages._CachedStorage``)."""
    return optuna.storages._CachedStorage(rdb)


def grid_index(sampler: optuna.samplers.GridSampler, params: dict[str, Any]) -> int | None:
    """The index GridSampler gives the grid point ``params`` (None if it is not a grid point),
    with the search space GridSampler records next to it (``_param_names``, ``_all_grids``)."""
    names = sampler._param_names
    if set(params) != set(names):
        return None
    for index, point in enumerate(sampler._all_grids):
        if all(params[n] == v for n, v in zip(names, point)):
            return index
    return None


def grid_space(sampler: optuna.samplers.GridSampler) -> dict[str, list[Any]]:
    """The search space as GridSampler records it on trials (``_search_space``)."""
    return sampler._search_space
