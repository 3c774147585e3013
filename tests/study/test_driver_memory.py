"""The study driver keeps no task and no model that it does not train with.

Each test runs in a fresh interpreter: what leaked depended on which frame first imported an
Optuna module. ``optuna.artifacts`` keeps the ImportError of a missing ``boto3`` /
``google.api_core`` with its traceback, whose frames lead (``f_back``) to the frame that first
imported it, with its locals: ``create_study`` and its task, and so the task's model, in the
driver for the whole study (``lora_tune.study._optuna_private.drop_import_tracebacks``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

# create_study with the task built for the checks, from a function that returns; then nothing of it lives
CREATE = r"""
import gc, json, sys, weakref
from lora_tune.study.run.runner import create_study
from tests.study.conftest import make_spec
from tests.study.toy_task import ToyTask

fresh = "optuna.artifacts" not in sys.modules
refs = []

class Tracked(ToyTask):
    def build_model(self):
        model = super().build_model()  # the models the checks build (targets, layers, coverage)
        refs.append(weakref.ref(model))
        return model

def create(url):
    task = Tracked()
    refs.extend([weakref.ref(task), weakref.ref(task._base)])  # the task and its full-precision model
    create_study(make_spec(train={"isolation": "process"}), url, task=task)

create(sys.argv[1])
gc.collect()
print(json.dumps({"fresh": fresh, "imported": "optuna.artifacts" in sys.modules, "refs": len(refs),
                  "alive": [type(r()).__name__ for r in refs if r() is not None]}))
"""

# `lora-tune run` with isolation: process; what the driver still holds when each trial starts
RUN = r"""
import gc, json, sys, weakref
from click.testing import CliRunner
import lora_tune.study.trial.objective as objective
from lora_tune.cli.main import cli
from tests.study import toy_task

fresh = "optuna.artifacts" not in sys.modules
refs, alive = [], []

class Tracked(toy_task.ToyTask):
    def __init__(self, **options):
        super().__init__(**options)
        refs.extend([weakref.ref(self), weakref.ref(self._base)])

    def build_model(self):
        model = super().build_model()
        refs.append(weakref.ref(model))
        return model

toy_task.make_task = Tracked  # the study file's factory, in this process (a trial's child builds its own)
run_in_child = objective.run_in_child

def starting(plan, hooks, *args, **kwargs):
    gc.collect()
    alive.append([type(r()).__name__ for r in refs if r() is not None])
    return run_in_child(plan, hooks, *args, **kwargs)

objective.run_in_child = starting
result = CliRunner().invoke(cli, ["run", sys.argv[1], "--storage", sys.argv[2]], catch_exceptions=False)
print(json.dumps({"fresh": fresh, "exit": result.exit_code, "output": result.output, "refs": len(refs),
                  "alive": alive}))
"""


def _python(script: str, *args: str, cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), LORA_TUNE_ARTIFACTS=str(cwd / "artifacts"))
    env.pop("LORA_TUNE_STORAGE", None)
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_create_study_keeps_no_task_and_no_model_in_a_fresh_process(tmp_path):
    out = _python(CREATE, f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    assert out["fresh"] and out["imported"]  # create_study imported optuna.artifacts, holding the task
    assert out["refs"] >= 3  # the task, its base model and the models built for the checks
    assert out["alive"] == []


def test_run_holds_no_model_when_its_trials_start_with_process_isolation(tmp_path):
    study = {
        "study": {"name": "lean", "n_trials": 1, "sampler": {"type": "random", "seed": 0},
                  "pruner": {"type": "none"}, "baseline": False},
        "task": {"type": "python", "factory": "tests.study.toy_task:make_task"},
        "search_space": {"rank": {"choices": [2, 4]}, "targets": {"choices": ["attention-qv", "all-linear"]},
                         "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
        "train": {"epochs": 1, "batch_size": 64, "evals_per_epoch": 1, "device": "cpu", "threads": 1,
                  "isolation": "process"},
    }
    path = tmp_path / "lean.yaml"
    path.write_text(yaml.safe_dump(study))
    out = _python(RUN, str(path), f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    assert out["exit"] == 0, out["output"]
    assert out["fresh"] and "lean: 1/1 trials finished (1 complete" in out["output"]
    assert out["refs"] >= 3  # the task of `run`, its base model and the models built for the checks
    assert out["alive"] == [[]]  # one trial started, and the driver held none of them then
