"""A worker imports a stored study's code only where its operator allowed it (issue 16).

End to end with real `lora-tune` processes on a real SQLite storage: the stored spec is
rewritten through the storage, as anyone who can write the database (or reach a storage
proxy) could, to name a factory whose import would write a marker file. The worker refuses
with exit 2 before importing anything; allowed code still runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from lora_tune.errors import ConfigError
from lora_tune.tasks.allow_code import Allowance, CodeNotAllowed, code_refs

REPO = Path(__file__).resolve().parents[2]
TOY = "tests.study.toy_task:make_task"


def _lora_tune(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("LORA_TUNE_STORAGE", "LORA_TUNE_ALLOW_CODE")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "lora_tune.cli.main", *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=300)


def _rewrite_stored_task(url: str, name: str, **changes: object) -> None:
    """What an attacker with write access to the storage does: plain Optuna, no lora-tune."""
    storage = optuna.storages.RDBStorage(url)
    study_id = storage.get_study_id_from_name(name)
    spec = storage.get_study_user_attrs(study_id)["spec"]
    spec["task"].update(changes)
    storage.set_study_user_attr(study_id, "spec", spec)
    storage.engine.dispose()


@pytest.fixture()
def stored_study(tmp_path):
    study_file = tmp_path / "toy.yaml"
    study_file.write_text(yaml.safe_dump({
        "study": {"name": "toy-code", "n_trials": 4, "baseline": False, "pruner": {"type": "none"},
                  "sampler": {"type": "random", "seed": 0}},
        "task": {"type": "python", "factory": TOY, "args": {"n_train": 64, "n_test": 32}},
        "search_space": {"rank": {"choices": [2, 4]}, "targets": {"choices": ["attention-qv"]}},
        "train": {"epochs": 1, "batch_size": 32, "evals_per_epoch": 1, "device": "cpu"},
    }))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    created = _lora_tune("study", "create", str(study_file), "--storage", url)
    assert created.returncode == 0, created.stderr
    return study_file, url


def _complete(url: str) -> int:
    study = optuna.load_study(study_name="toy-code", storage=url)
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials())


def test_a_worker_never_imports_a_factory_planted_in_the_storage(stored_study, tmp_path):
    study_file, url = stored_study
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('imported')\ndef make(**kw):\n    return None\n")
    _rewrite_stored_task(url, "toy-code", factory=f"{evil}:make")

    tries = [
        ("worker", "toy-code", "--storage", url),
        ("worker", "toy-code", "--storage", url, "--allow-code", "tests.study.*"),
        ("study", "optimize", "toy-code", "--storage", url),
    ]
    for args in tries:
        result = _lora_tune(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert f"{evil}:make" in result.stderr and "--allow-code" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    # the operator's own file does not vouch for a stored spec that was changed after it
    result = _lora_tune("worker", "toy-code", "--storage", url, "--study-file", str(study_file))
    assert result.returncode == 2 and "--study-file" in result.stderr and "task.factory" in result.stderr
    assert not marker.exists()
    assert _complete(url) == 0


def test_allowed_code_runs_by_pattern_environment_or_the_same_study_file(stored_study):
    study_file, url = stored_study
    refused = _lora_tune("worker", "toy-code", "--storage", url, "--n-trials", "1")
    assert refused.returncode == 2 and TOY in refused.stderr, refused.stderr
    assert _complete(url) == 0

    by_pattern = _lora_tune("worker", "toy-code", "--storage", url, "--n-trials", "1",
                            "--allow-code", "tests.study.toy_task:*")
    assert by_pattern.returncode == 0, by_pattern.stderr
    by_env = _lora_tune("worker", "toy-code", "--storage", url, "--n-trials", "1",
                        env={"LORA_TUNE_ALLOW_CODE": "numpy.*, tests.study.*"})
    assert by_env.returncode == 0, by_env.stderr
    by_file = _lora_tune("study", "optimize", "toy-code", "--storage", url, "--n-trials", "1",
                         "--study-file", str(study_file))
    assert by_file.returncode == 0, by_file.stderr
    assert _complete(url) == 3


def test_code_refs_are_every_importable_name_of_the_task_section_but_not_its_args():
    task = {
        "type": "trainer", "factory": "my_train.py:make_trainer", "model_factory": "pkg.models:build",
        "model": "./models/llama", "train_file": "data/train.jsonl", "chat_template": "{{ a }}:{{ b }}",
        "generate": {"metric": "scorers.py:score", "max_new_tokens": 8},
        "args": {"callback": "os:system", "nested": {"x": "subprocess:run"}},
        "metrics": ["eval_loss", "exact_match"],
    }
    assert code_refs(task) == [("task.factory", "my_train.py:make_trainer"),
                               ("task.model_factory", "pkg.models:build"),
                               ("task.generate.metric", "scorers.py:score")]
    assert code_refs({"type": "sft", "generate": {"metric": "exact_match"}, "model": "C:/models"}) == []


def test_an_allowance_matches_whole_references_or_their_module_part():
    allowance = Allowance.from_operator(["pkg.*"], trusted=["my_train.py:make_trainer"],
                                        environ={"LORA_TUNE_ALLOW_CODE": "scorers.py:*"})
    for ref in ("pkg.models:build", "pkg.a.b:c", "my_train.py:make_trainer", "scorers.py:score"):
        assert allowance.allows(ref), ref
    for ref in ("my_train.py:other", "subprocess:run", "pkgx:run", "other/scorers.py:score"):
        assert not allowance.allows(ref), ref
    with pytest.raises(CodeNotAllowed) as info:
        Allowance().check({"type": "python", "factory": "subprocess:run"}, "the stored study 'x'")
    assert isinstance(info.value, ConfigError) and info.value.field == "task.factory"
    assert "--allow-code 'subprocess:run'" in str(info.value) and "Nothing was imported" in str(info.value)
