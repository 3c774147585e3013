"""Helpers for tests that run real `lora-tune worker` processes on a shared storage."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from lora_tune.study.storage.opening import dispose_storage, open_storage

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def make_study(url: str, name: str, n_trials: int, *, sampler: Any = None, **settings: Any) -> optuna.Study:
    """Create a plain Optuna study whose stored spec gives the budget and heartbeat settings.

    ``settings``: ``sleep``/``steps`` for the test objectives; ``heartbeat_interval``,
    ``grace_period``, ``failed_trial_retries`` go into the stored spec's ``study`` section.
    """
    storage = open_storage(url)
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler)
    section = {"name": name, "n_trials": n_trials}
    for key in ("heartbeat_interval", "grace_period", "failed_trial_retries"):
        if key in settings:
            section[key] = settings.pop(key)
    study.set_user_attr("spec", {"study": section})
    if "sampler_options" in settings:
        study.set_user_attr("sampler", settings.pop("sampler_options"))
    for key, value in settings.items():
        study.set_user_attr(key, value)
    return study


def start_workers(url: str, name: str, count: int, objective: str = "sleep_objective",
                  extra: tuple[str, ...] = (), **env_vars: str) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env_vars)
    command = [sys.executable, "-m", "lora_tune.cli.main", "worker", name, "--storage", url,
               "--objective", f"worker_objectives:{objective}", "--quiet", *extra]
    return [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]


def finish(workers: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    """Wait for every worker; return (exit code, stdout+stderr) of each."""
    deadline = time.monotonic() + timeout
    results = []
    for worker in workers:
        try:
            out, err = worker.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            out, err = worker.communicate()
            results.append((-999, out + err))
            continue
        results.append((worker.returncode, out + err))
    return results


def reload(url: str, name: str) -> tuple[list[optuna.trial.FrozenTrial], Any]:
    """All trials of the study, read through a fresh storage (closed afterwards)."""
    storage = open_storage(url)
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        return trials, None
    finally:
        dispose_storage(storage)


def by_state(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts
