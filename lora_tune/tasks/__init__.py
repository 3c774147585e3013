"""Built-in tasks: ``digits``, ``text-classification``, ``causal-lm``, ``sft``, ``trainer`` and ``python``.

``build_task(spec)`` turns the study file's ``task:`` mapping into a :class:`Task`;
``validate_task_spec(spec)`` lists every problem as ``(path, message)`` without building anything
heavy (files are checked for existence, models are not loaded).
"""
from __future__ import annotations

import importlib
from typing import Any
from collections.abc import Mapping

from lora_tune.tasks.base import Problems, Task, raise_problems

_MODULES = {
    "digits": "lora_tune.tasks.digits",
    "text-classification": "lora_tune.tasks.text_classification",
    "causal-lm": "lora_tune.tasks.causal_lm",
    "sft": "lora_tune.tasks.sft",
    "trainer": "lora_tune.tasks.trainer",
    "python": "lora_tune.tasks.python_factory",
}
TASK_TYPES = tuple(_MODULES)

__all__ = ["TASK_TYPES", "Task", "build_task", "validate_task_spec"]


def _module(task_type: str) -> Any:
    return importlib.import_module(task_module_name(task_type))


def task_module_name(task_type: str) -> str:
    """The module that implements a built-in task type."""
    return _MODULES[task_type]


def validate_task_spec(spec: Mapping) -> Problems:
    """Every problem of a ``task:`` mapping as ``(path, message)``; ``[]`` when it is valid."""
    if not isinstance(spec, Mapping):
        return [("task", f"must be a mapping with a 'type' key, got {type(spec).__name__}")]
    task_type = spec.get("type")
    if task_type is None:
        return [("task.type", "is required; one of " + ", ".join(TASK_TYPES))]
    if task_type not in TASK_TYPES:
        return [("task.type", f"unknown task type {task_type!r}; allowed: " + ", ".join(TASK_TYPES))]
    return _module(task_type).validate_spec(spec)


def build_task(spec: Mapping) -> Task:
    """Build the task; raises :class:`lora_tune.errors.ConfigError` naming the bad field."""
    raise_problems(validate_task_spec(spec), spec)
    task = _module(spec["type"]).build(dict(spec))
    from lora_tune.train import warm_up

    warm_up()
    return task
