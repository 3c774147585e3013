"""Helpers for study tests: specs around the toy task (tests/study/toy_task.py)."""
from __future__ import annotations

import copy
from typing import Any

import pytest

from lora_tune.study.schema.spec import StudySpec, validate_spec
from tests.study.toy_task import ToyTask

BASE: dict[str, Any] = {
    "study": {"name": "toy", "n_trials": 4, "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}},
    "task": {"type": "python", "factory": "tests.study.toy_task:make_task"},
    "search_space": {
        "rank": {"choices": [2, 4, 8]},
        "alpha": {"ratio": [1, 2]},
        "targets": {"choices": ["attention-qv", "all-linear", ["fc1", "fc2"]]},
        "quant_bits": {"choices": [None, 8]},
        "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
    },
    "train": {"epochs": 1, "batch_size": 64, "evals_per_epoch": 2, "device": "cpu", "threads": 1},
}


def make_spec(**sections: Any) -> StudySpec:
    """BASE with sections merged in (``study={...}`` updates keys; ``search_space=`` replaces)."""
    raw = copy.deepcopy(BASE)
    for key, value in sections.items():
        if isinstance(value, dict) and key in ("study", "train"):
            raw[key].update(value)
        else:
            raw[key] = value
    return validate_spec(raw)


@pytest.fixture(scope="session")
def toy_task() -> ToyTask:
    return ToyTask()


@pytest.fixture(autouse=True)
def _artifacts_in_tmp(tmp_path, monkeypatch):
    """Studies in memory keep their adapters under the working directory by default; keep the
    tests' ones out of the checkout."""
    monkeypatch.setenv("LORA_TUNE_ARTIFACTS", str(tmp_path / "lora_tune_artifacts"))
