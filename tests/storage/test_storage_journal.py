"""Several processes on one machine: journal storage, `--jobs N`, and SQLite refused."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from optuna.trial import TrialState

from lora_tune.study.storage.marks import WORKER_KEY
from workerlib import HERE, REPO, by_state, finish, make_study, reload, start_workers

pytestmark = pytest.mark.slow


def test_eight_journal_workers_zero_errors(tmp_path):
    url = f"journal:{tmp_path / 'study.log'}"
    make_study(url, "eight", 32, sleep=0.05, steps=2)
    results = finish(start_workers(url, "eight", 8), timeout=180)
    for code, output in results:
        assert code == 0, output
        assert "Traceback" not in output and "Error" not in output, output
    trials, _ = reload(url, "eight")
    assert by_state(trials) == {"COMPLETE": 32}
    assert sorted(t.number for t in trials) == list(range(32))
    assert len({t.system_attrs[WORKER_KEY] for t in trials}) >= 4


def _jobs(url: str, name: str, jobs: int, objective: str = "sleep_objective", **env_vars: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env_vars)
    return subprocess.Popen(
        [sys.executable, "-m", "lora_tune.cli.main", "worker", name, "--storage", url, "--jobs", str(jobs),
         "--objective", f"worker_objectives:{objective}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_jobs_recovers_a_killed_child(tmp_path):
    """Journal files have no heartbeats: the --jobs parent re-queues a dead child's trial."""
    url = f"journal:{tmp_path / 'jobs.log'}"
    n = 6
    study = make_study(url, "jobs", n, sleep=0.2, steps=10)
    parent = _jobs(url, "jobs", 3)
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # early in its run (>= 1.6 s of it left): still running when the kill arrives, even on a busy machine
            if 0 < len(trial.intermediate_values) <= 2 and WORKER_KEY in trial.system_attrs:
                victim = trial
                break
        time.sleep(0.1)
    assert victim is not None, "no trial started"
    os.kill(int(victim.system_attrs[WORKER_KEY].rsplit(":", 1)[1]), signal.SIGKILL)
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 1, out + err  # one child failed, and the parent says so
    assert "re-queued trial(s) [" in err
    trials, _ = reload(url, "jobs")
    assert by_state(trials) == {"COMPLETE": n, "FAIL": 1}
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params


def test_jobs_refuses_plain_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'one.db'}"
    make_study(url, "one", 4)
    process = _jobs(url, "one", 4)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "--jobs" in err and "journal:" in err and "postgresql" in err and "database is locked" in err
    trials, _ = reload(url, "one")
    assert trials == []  # nothing ran


def test_second_sqlite_worker_process_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'single.db'}"
    study = make_study(url, "single", 4, sleep=0.2, steps=5)
    first = start_workers(url, "single", 1)[0]
    deadline = time.monotonic() + 30
    while not study.get_trials(deepcopy=False) and time.monotonic() < deadline:
        time.sleep(0.1)
    second = start_workers(url, "single", 1)[0]
    out, err = second.communicate(timeout=60)
    assert second.returncode == 2, out + err
    assert f"Process {first.pid} is already running trials" in err and "journal:" in err
    (code, output), = finish([first])
    assert code == 0, output
    trials, _ = reload(url, "single")
    assert by_state(trials) == {"COMPLETE": 4}


def test_jobs_spread_over_visible_gpus(tmp_path):
    url = f"journal:{tmp_path / 'gpus.log'}"
    make_study(url, "gpus", 8, sleep=0.3)
    parent = _jobs(url, "gpus", 2, objective="gpu_objective", CUDA_VISIBLE_DEVICES="3,5")
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 0, out + err
    trials, _ = reload(url, "gpus")
    assert by_state(trials) == {"COMPLETE": 8}
    by_worker = {}
    for trial in trials:
        by_worker.setdefault(trial.system_attrs[WORKER_KEY], set()).add(trial.user_attrs["cuda_visible_devices"])
    assert all(len(gpus) == 1 for gpus in by_worker.values())  # one GPU per worker process
    assert set().union(*by_worker.values()) <= {"3", "5"}
    assert len(by_worker) == 1 or set().union(*by_worker.values()) == {"3", "5"}


def test_visible_gpus_parsing():
    from lora_tune.study.run.workers import visible_gpus

    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0, 2,3"}) == ["0", "2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_sigterm_to_jobs_parent_stops_children_and_requeues(tmp_path):
    url = f"journal:{tmp_path / 'term.log'}"
    study = make_study(url, "term", 20, sleep=0.3, steps=10)
    parent = _jobs(url, "term", 2)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if len(running) == 2 and all(t.intermediate_values for t in running):
            break
        time.sleep(0.1)
    parent.send_signal(signal.SIGTERM)
    out, err = parent.communicate(timeout=60)
    assert parent.returncode == 130, out + err
    trials, _ = reload(url, "term")
    states = by_state(trials)
    assert "RUNNING" not in states
    assert states["FAIL"] == 2 and states["WAITING"] == 2  # both interrupted trials queued again
    failed = {t.number: t.params for t in trials if t.state == TrialState.FAIL}
    for waiting in (t for t in trials if t.state == TrialState.WAITING):
        assert waiting.params == failed[waiting.system_attrs["failed_trial"]]


def test_next_worker_recovers_a_killed_standalone_worker(tmp_path):
    """No heartbeats in a journal file: a worker on the same machine sees the dead pid."""
    url = f"journal:{tmp_path / 'alone.log'}"
    study = make_study(url, "alone", 3, sleep=0.2, steps=10)
    first = start_workers(url, "alone", 1)[0]
    deadline = time.monotonic() + 30
    victim = None
    while victim is None and time.monotonic() < deadline:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        victim = next((t for t in running if t.intermediate_values), None)
        time.sleep(0.05)
    assert victim is not None
    first.kill()
    first.wait()
    (code, output), = finish(start_workers(url, "alone", 1))
    assert code == 0, output
    trials, _ = reload(url, "alone")
    assert by_state(trials) == {"COMPLETE": 3, "FAIL": 1}
    assert trials[victim.number].user_attrs["fail_reason"].endswith(f":{first.pid} exited mid-trial")
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.params == victim.params and retry.state == TrialState.COMPLETE
