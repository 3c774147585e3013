"""The real thing end to end: `lora-tune study create` + several `lora-tune worker` processes
running LoRA trials (the toy task of tests/study) on PostgreSQL, with a password in the URL."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
import yaml

from workerlib import REPO, by_state, reload

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PASSWORD = "s3cret-Pw-never-printed"  # the test server trusts local users: any password works


def _run(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("LORA_TUNE_STORAGE", None)
    return subprocess.Popen([sys.executable, "-m", "lora_tune.cli.main", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_lora_workers_share_the_budget_and_never_print_the_password(postgres_url, tmp_path):
    url = sa.engine.make_url(postgres_url).set(password=PASSWORD).render_as_string(hide_password=False)
    study_file = tmp_path / "toy.yaml"
    study_file.write_text(yaml.safe_dump({
        "study": {"name": "toy-e2e", "n_trials": 6, "baseline": True,
                  "sampler": {"type": "tpe", "seed": 0}, "pruner": {"type": "none"}},
        "task": {"type": "python", "factory": "tests.study.toy_task:make_task"},
        "search_space": {"rank": {"choices": [2, 4, 8]}, "alpha": {"ratio": [1, 2]},
                         "targets": {"choices": ["attention-qv", "all-linear"]},
                         "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
        "train": {"epochs": 1, "batch_size": 64, "evals_per_epoch": 2, "device": "cpu"},
    }))
    create = _run(["study", "create", str(study_file), "--storage", url])
    outputs = [create.communicate(timeout=120)]
    assert create.returncode == 0, outputs
    workers = [_run(["worker", "toy-e2e", "--storage", url, "--study-file", str(study_file)]) for _ in range(3)]
    for worker in workers:
        outputs.append(worker.communicate(timeout=300))
        assert worker.returncode == 0, outputs[-1]

    text = "\n".join(out + err for out, err in outputs)
    assert PASSWORD not in text
    assert ":***@" in text  # the URL is shown, masked
    trials, _ = reload(url, "toy-e2e")
    assert by_state(trials) == {"COMPLETE": 6}
    assert sorted(t.number for t in trials) == list(range(6))
    assert sum(1 for t in trials if t.user_attrs.get("is_baseline")) == 1
    assert len({t.system_attrs["lora_tune:worker"] for t in trials}) >= 2
    assert all(t.user_attrs.get("trainable_params", 0) > 0 for t in trials)
