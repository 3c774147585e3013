"""Opening a study for reading by name, with the clear error users need when it is not there."""
from __future__ import annotations

import warnings
from typing import Any

import optuna

from lora_tune.errors import ConfigError, StudyNotFoundError


def open_storage_for_reading(storage_url: str) -> Any:
    """The storage behind ``storage_url``, refused where opening it would create a file or tables."""
    from lora_tune.study.storage.opening import mask_url, open_storage, reading_problem

    problem = reading_problem(storage_url)
    if problem:
        raise ConfigError("--storage", mask_url(storage_url), "an existing lora-tune (Optuna) storage",
                          f"{problem}. Pass --storage or set $LORA_TUNE_STORAGE.")
    return open_storage(storage_url)


def study_names(storage: Any) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())


def open_study(name: str, storage_url: str, storage: Any = None) -> optuna.Study:
    """Load study ``name``; an unknown name raises ``StudyNotFoundError`` listing the studies."""
    from lora_tune.study.storage.opening import mask_url

    storage = storage if storage is not None else open_storage_for_reading(storage_url)
    names = study_names(storage)
    if name not in names:
        raise StudyNotFoundError(name, mask_url(storage_url), names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.load_study(study_name=name, storage=storage)
