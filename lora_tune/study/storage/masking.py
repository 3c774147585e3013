"""No password in a study attribute (the stored study file is shown by dashboards and reports)."""
from __future__ import annotations

from typing import Any

from lora_tune.study.storage.urls import mask_secrets
from lora_tune.study.storage.wrapper import StorageWrapper


def masked(value: Any) -> Any:
    """``value`` with every password inside its strings replaced by ``***``."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(v) for v in value]
    return value


class MaskingStorage(StorageWrapper):
    """Masks passwords in study user and system attributes on their way in."""

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_user_attr(study_id, key, masked(value))

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_system_attr(study_id, key, masked(value))
