"""Light objectives for worker-process tests: they sleep instead of training.

Each reads its settings from the study's user attributes, so a test sets them once when it
creates the study and every `lora-tune worker --objective worker_objectives:NAME` process
sees them (`sleep`: seconds per report step, `steps`: reports per trial).
"""
from __future__ import annotations

import time

import optuna


def sleep_objective(trial: optuna.Trial) -> float:
    attrs = trial.study.user_attrs
    x = trial.suggest_float("x", -10.0, 10.0)
    y = trial.suggest_int("y", 0, 100)
    steps, pause = int(attrs.get("steps", 3)), float(attrs.get("sleep", 0.05))
    for step in range(steps):
        time.sleep(pause)
        trial.report(x * x + step, step)
    return x * x + y


def grid_objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 10.0)
    y = trial.suggest_int("y", 0, 10)
    time.sleep(float(trial.study.user_attrs.get("sleep", 0.05)))
    return x + y


def gpu_objective(trial: optuna.Trial) -> float:
    """Records which GPUs the worker process was given."""
    import os

    trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
    time.sleep(float(trial.study.user_attrs.get("sleep", 0.05)))
    return trial.suggest_float("x", 0.0, 1.0)
