"""The study commands through click (CliRunner) and one real `lora-tune run` subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lora_tune.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]

TOY = {
    "study": {"name": "cli-toy", "n_trials": 5, "sampler": {"type": "tpe", "seed": 0},
              "pruner": {"type": "median", "options": {"n_startup_trials": 2}}},
    "task": {"type": "python", "factory": "tests.study.toy_task:make_task"},
    "search_space": {"rank": {"choices": [2, 4, 8]}, "alpha": {"ratio": [1, 2]},
                     "targets": {"choices": ["attention-qv", "all-linear"]},
                     "learning_rate": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
    "train": {"epochs": 2, "batch_size": 64, "evals_per_epoch": 2, "device": "cpu", "threads": 1},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_validate_ok_and_lists_what_is_searched(cli_dir):
    result = _invoke("validate", str(_write(cli_dir / "s.yaml", TOY)))
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "maximize accuracy" in result.output
    assert "searches: rank, alpha_ratio, targets, learning_rate" in result.output
    assert not list(cli_dir.glob("*.db"))  # validation writes no storage


def test_validate_reports_every_error_with_exit_2(cli_dir):
    bad = dict(TOY, study={"name": "x", "n_trials": 0, "sampler": {"type": "nope"}},
               search_space={"rank": {"type": "int", "low": 0, "high": 4}, "bogus": 1})
    result = _invoke("validate", str(_write(cli_dir / "bad.yaml", bad)))
    assert result.exit_code == 2
    for fragment in ("4 error(s)", "study.n_trials: must be ≥ 1", "study.sampler.type:",
                     "search_space.rank.low: must be an integer ≥ 1", "search_space.bogus: unknown parameter"):
        assert fragment in result.output


def test_validate_checks_targets_and_device_against_the_model(cli_dir):
    bad = dict(TOY, search_space=dict(TOY["search_space"],
                                      targets={"choices": ["attention-qv", "atention", ["no.such"]]}),
               train=dict(TOY["train"], device="tpu"))
    result = _invoke("study", "create", str(_write(cli_dir / "bad.yaml", bad)))
    assert result.exit_code == 2
    for fragment in ("3 error(s)", "train.device: got 'tpu'", "search_space.targets: 'atention' does not fit",
                     "search_space.targets: ['no.such'] does not fit"):
        assert fragment in result.output
    assert [p.name for p in cli_dir.iterdir()] == ["bad.yaml"]  # nothing stored


def test_create_with_an_invalid_file_writes_nothing(cli_dir):
    bad = dict(TOY, search_space={"rank": {"choices": [4, 16]}})  # the baseline's rank 8 is missing
    result = _invoke("study", "create", str(_write(cli_dir / "bad.yaml", bad)))
    assert result.exit_code == 2 and "search_space.rank" in result.output and "study.baseline: false" in result.output
    assert [p.name for p in cli_dir.iterdir()] == ["bad.yaml"]  # no database, no lock file


def test_create_optimize_list_show(cli_dir):
    path = _write(cli_dir / "s.yaml", TOY)
    url = f"sqlite:///{cli_dir / 'x.db'}"
    created = _invoke("study", "create", str(path), "--storage", url, "--name", "first")
    assert created.exit_code == 0, created.output
    assert "study 'first' ready" in created.output and "(1 trial(s) so far)" in created.output
    again = _invoke("study", "create", str(path), "--storage", url, "--name", "first")
    assert again.exit_code == 2 and "--resume" in again.output
    opt = _invoke("study", "optimize", "first", "--storage", url, "--n-trials", "2", "--study-file", str(path))
    assert opt.exit_code == 0, opt.output
    assert "this process ran 2 trial(s)" in opt.output and "--n-trials reached" in opt.output
    assert "trial   0 complete" in opt.output and "[baseline]" in opt.output
    listed = _invoke("study", "list", "--storage", url)
    assert listed.exit_code == 0 and "first" in listed.output and "2/5" in listed.output
    shown = _invoke("study", "show", "first", "--storage", url)
    assert shown.exit_code == 0, shown.output
    assert "best trial #" in shown.output and "baseline trial #0" in shown.output and "top 10 trials" in shown.output


def test_unknown_study_lists_the_studies_and_exits_2(cli_dir):
    url = f"sqlite:///{cli_dir / 'x.db'}"
    assert _invoke("study", "create", str(_write(cli_dir / "s.yaml", TOY)), "--storage", url).exit_code == 0
    result = _invoke("study", "optimize", "nope", "--storage", url)
    assert result.exit_code == 2 and "study 'nope' not found" in result.output and "cli-toy" in result.output
    missing = _invoke("study", "show", "nope", "--storage", f"sqlite:///{cli_dir / 'none.db'}")
    assert missing.exit_code == 2 and not (cli_dir / "none.db").exists()


def test_storage_falls_back_to_the_environment(cli_dir, monkeypatch):
    monkeypatch.setenv("LORA_TUNE_STORAGE", f"sqlite:///{cli_dir / 'from-cli_dir.db'}")
    assert _invoke("study", "create", str(_write(cli_dir / "s.yaml", TOY))).exit_code == 0
    assert (cli_dir / "from-cli_dir.db").exists() and not (cli_dir / "lora_tune.db").exists()
    assert "cli-toy" in _invoke("study", "list").output


@pytest.mark.slow
def test_run_end_to_end_in_a_real_process(cli_dir):
    """`lora-tune run` creates, optimizes, prints best vs baseline; a second run resumes."""
    path = _write(cli_dir / "s.yaml", dict(TOY, study=dict(TOY["study"], storage="sqlite:///e2e.db")))
    environ = dict(os.environ, PYTHONPATH=str(ROOT))
    environ.pop("LORA_TUNE_STORAGE", None)
    start = time.monotonic()
    first = subprocess.run([sys.executable, "-m", "lora_tune.cli.main", "run", str(path)], cwd=cli_dir,
                           env=environ, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert first.returncode == 0, first.stdout + first.stderr
    assert elapsed < 60
    out = first.stdout
    assert "this process ran 5 trial(s)" in out and "trial budget is used" in out
    assert "cli-toy: 5/5 trials finished" in out and "best trial #" in out and "baseline trial #0" in out
    assert "gain" in out
    second = subprocess.run([sys.executable, "-m", "lora_tune.cli.main", "run", str(path)], cwd=cli_dir,
                            env=environ, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "this process ran 0 trial(s)" in second.stdout


def test_multi_objective_run_prints_the_pareto_front(cli_dir):
    multi = dict(TOY, study=dict(TOY["study"], name="multi", n_trials=3, metric=["accuracy", "trainable_params"],
                                 directions=["maximize", "minimize"], sampler={"type": "nsga2", "seed": 0}))
    result = _invoke("run", str(_write(cli_dir / "m.yaml", multi)), "--storage", f"sqlite:///{cli_dir / 'm.db'}")
    assert result.exit_code == 0, result.output
    assert "pruning is disabled for multi-objective studies" in result.output
    assert "Pareto front (" in result.output and "baseline trial #0: accuracy" in result.output
    baseline = next(line for line in result.output.splitlines() if line.startswith("baseline trial #0"))
    assert baseline.endswith("trainable_params 1075")  # rank 8 on 4 q/v layers (4*2*16*8) + the head (51)


def test_failing_trials_exit_1_with_their_reason(cli_dir):
    failing = dict(TOY, study=dict(TOY["study"], name="fails", n_trials=4, max_consecutive_failures=2),
                   task={"type": "python", "factory": "tests.study.toy_task:make_task",
                         "args": {"fail_in": "evaluate"}})
    result = _invoke("run", str(_write(cli_dir / "f.yaml", failing)), "--storage", f"sqlite:///{cli_dir / 'f.db'}")
    assert result.exit_code == 1
    assert "ValueError: toy task: evaluate exploded" in result.output
    assert "too many failed trials in a row" in result.output


def test_read_commands_leave_a_foreign_sqlite_file_alone(cli_dir):
    import sqlite3

    with sqlite3.connect(cli_dir / "other.db") as conn:
        conn.execute("CREATE TABLE mine (a)")
    url = f"sqlite:///{cli_dir / 'other.db'}"
    listed = _invoke("study", "list", "--storage", url)
    assert listed.exit_code == 2 and "holds no Optuna study tables" in listed.output
    shown = _invoke("study", "show", "x", "--storage", url)
    assert shown.exit_code == 2
    with sqlite3.connect(cli_dir / "other.db") as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("mine",)]


def test_validate_checks_the_storage_url_with_the_other_errors(cli_dir):
    bad = dict(TOY, study={**TOY["study"], "storage": "notadb://somewhere/x"})
    result = _invoke("validate", str(_write(cli_dir / "bad.yaml", bad)))
    assert result.exit_code == 2, result.output
    assert "study.storage" in result.output and "notadb://somewhere/x" in result.output
    assert "postgresql+psycopg://" in result.output  # what is allowed
    created = _invoke("study", "create", str(cli_dir / "bad.yaml"))
    assert created.exit_code == 2  # the same refusal as study create
    both = dict(bad, search_space={**TOY["search_space"], "bogus": 1})
    result = _invoke("validate", str(_write(cli_dir / "both.yaml", both)))
    assert result.exit_code == 2 and "study.storage" in result.output and "search_space.bogus" in result.output


def test_list_and_show_count_the_budget_alike(cli_dir):
    """A failed trial whose retry is queued: one budget slot, not done, in list and show alike."""
    import optuna

    from lora_tune.study.storage.opening import dispose_storage, open_storage
    from lora_tune.study.run.workers import requeue_trials

    url = f"sqlite:///{cli_dir / 'x.db'}"
    assert _invoke("study", "create", str(_write(cli_dir / "s.yaml", TOY)), "--storage", url).exit_code == 0
    assert _invoke("study", "optimize", "cli-toy", "--storage", url, "--n-trials", "2",
                   "--allow-code", "tests.study.*").exit_code == 0
    storage = open_storage(url)
    study = optuna.load_study(study_name="cli-toy", storage=storage)
    lost = study.ask()  # a worker that dies: failed, and its parameters queued again
    assert requeue_trials(study, [lost._trial_id], max_retry=2) == [lost.number]
    dispose_storage(storage)
    listed = _invoke("study", "list", "--storage", url)
    shown = _invoke("study", "show", "cli-toy", "--storage", url)
    assert listed.exit_code == 0 and shown.exit_code == 0, listed.output + shown.output
    assert "2/5" in listed.output and "4/5" not in listed.output
    assert "2/5 trials finished" in shown.output
