"""Real `lora-tune worker` processes on a real PostgreSQL server: budget, crashes, restarts."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lora_tune.study.storage.marks import WORKER_KEY
from tests.waiting import wait_for
from workerlib import by_state, finish, make_study, reload, start_workers

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def _clean(results):
    for code, output in results:
        assert code == 0, output
        assert "Traceback" not in output and "Error" not in output, output


def test_workers_share_one_budget_exactly(postgres_url):
    make_study(postgres_url, "budget", 20, sleep=0.02, steps=3)
    results = finish(start_workers(postgres_url, "budget", 5))
    _clean(results)
    trials, _ = reload(postgres_url, "budget")
    assert by_state(trials) == {"COMPLETE": 20}
    assert sorted(t.number for t in trials) == list(range(20))
    assert all(len(t.intermediate_values) == 3 for t in trials)


def test_sixteen_workers_zero_errors(postgres_url):
    make_study(postgres_url, "sixteen", 32, sleep=0.05, steps=2)
    results = finish(start_workers(postgres_url, "sixteen", 16), timeout=180)
    _clean(results)
    trials, _ = reload(postgres_url, "sixteen")
    assert by_state(trials) == {"COMPLETE": 32}
    workers = {t.system_attrs[WORKER_KEY] for t in trials}
    assert len(workers) >= 8  # the work really was shared


@pytest.mark.parametrize("victim_host", ["same-host", "other-host"])
def test_sigkill_mid_trial_is_retried_with_same_params(postgres_url, victim_host):
    """Same host: the survivors see the dead pid. Other host: only the heartbeat tells."""
    n = 8
    name = f"killed-{victim_host}"
    study = make_study(postgres_url, name, n, sleep=0.25, steps=6, heartbeat_interval=1,
                       grace_period=2, failed_trial_retries=2)
    workers = start_workers(postgres_url, name, 2)
    remote = {"LORA_TUNE_WORKER_HOST": "elsewhere"} if victim_host == "other-host" else {}
    workers += start_workers(postgres_url, name, 1, **remote)
    pids = {w.pid: w for w in workers}
    victim_pids = {workers[-1].pid}

    def running_mid_trial():
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            host_pid = trial.system_attrs.get(WORKER_KEY, "")
            pid = int(host_pid.rsplit(":", 1)[1]) if host_pid else -1
            if pid in victim_pids and len(trial.intermediate_values) >= 1:
                return trial, pid
        return None

    victim_trial, victim_pid = wait_for(running_mid_trial, 60, "a trial in progress")
    os.kill(victim_pid, signal.SIGKILL)
    others = [w for w in workers if w.pid != victim_pid]
    _clean(finish(others))
    pids[victim_pid].wait()

    trials, _ = reload(postgres_url, name)
    killed = next(t for t in trials if t.number == victim_trial.number)
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert retries[0].system_attrs[WORKER_KEY] != killed.system_attrs[WORKER_KEY]
    assert by_state(trials) == {"COMPLETE": n, "FAIL": 1}
    if victim_host == "other-host":
        assert killed.system_attrs[WORKER_KEY].startswith("elsewhere:")


def _pg_ctlcluster() -> list[str]:
    tool = shutil.which("pg_ctlcluster")
    versions = sorted(os.listdir("/etc/postgresql")) if Path("/etc/postgresql").is_dir() else []
    if tool is None or not versions:
        pytest.skip("restarting PostgreSQL needs pg_ctlcluster (Debian postgresql-common) on this host")
    return [tool, "--skip-systemctl-redirect", versions[-1], "main", "restart"]


def test_postgres_restart_does_not_kill_workers(postgres_url):
    command = _pg_ctlcluster()
    n = 16
    study = make_study(postgres_url, "restart", n, sleep=0.15, steps=5)
    workers = start_workers(postgres_url, "restart", 4)
    wait_for(lambda: len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 3,
              60, "first trials")
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    results = finish(workers)
    for code, output in results:
        assert code == 0, output
    trials, _ = reload(postgres_url, "restart")
    assert by_state(trials) == {"COMPLETE": n}
    assert sorted(t.number for t in trials) == list(range(n))
    # the restart really hit the workers: at least one of them logged a retried call
    assert any("retry" in output for _, output in results), [o for _, o in results]


def test_grid_points_never_evaluated_twice(postgres_url):
    search_space = {"x": [0.0, 1.0, 2.0], "y": [0, 1, 2, 3]}
    sampler = optuna.samplers.GridSampler(search_space, seed=0)
    # three queued off-grid trials take trial numbers 0-2, so the grid sampler has to pick
    # points itself (its random choice is where parallel workers collide)
    study = make_study(postgres_url, "grid", 15, sampler=sampler, sleep=0.05,
                       sampler_options={"type": "grid", "search_space": search_space})
    for x in (5.0, 6.0, 7.0):
        study.enqueue_trial({"x": x, "y": 9})
    results = finish(start_workers(postgres_url, "grid", 4, objective="grid_objective"))
    _clean(results)
    trials, _ = reload(postgres_url, "grid")
    assert by_state(trials) == {"COMPLETE": 15}
    points = [(t.params["x"], t.params["y"]) for t in trials if "grid_id" in t.system_attrs]
    assert len(points) == 12 and len(set(points)) == 12
