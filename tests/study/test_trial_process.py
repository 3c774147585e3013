"""The long-lived trial process (``train.isolation: process``): one per task, reused across
trials, replaced only when it dies or reports an error that may have left its base dirty."""
from __future__ import annotations

import os

import optuna
from optuna.trial import TrialState

from lora_tune.study.trial.objective import Objective, TrialFailed
from lora_tune.study.trial.trial_process import close_trial_processes, trial_process_pids
from tests.study.test_isolation import PARAMS, _spec


def _one(objective: Objective, study: optuna.Study) -> optuna.trial.FrozenTrial:
    study.enqueue_trial(PARAMS)
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    return study.trials[-1]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_consecutive_trials_of_a_task_run_in_one_trial_process():
    close_trial_processes()
    study = optuna.create_study(direction="maximize")
    objective = Objective(_spec())
    assert _one(objective, study).state == TrialState.COMPLETE
    first = trial_process_pids()
    assert len(first) == 1
    assert _one(objective, study).state == TrialState.COMPLETE
    assert trial_process_pids() == first  # the same process ran the second trial
    close_trial_processes()
    assert trial_process_pids() == []


def test_an_error_keeps_the_process_and_a_death_replaces_it():
    close_trial_processes()
    study = optuna.create_study(direction="maximize")
    failing = Objective(_spec({"fail_in": "evaluate"}))
    assert _one(failing, study).state == TrialState.FAIL
    kept = trial_process_pids()
    assert len(kept) == 1  # a Python error in a trial leaves its process for the next one
    assert _one(failing, study).state == TrialState.FAIL
    assert trial_process_pids() == kept
    dying = Objective(_spec({"die_at_loss_call": 2}))
    died = _one(dying, study)
    assert died.state == TrialState.FAIL and "killed by SIGKILL" in died.user_attrs["fail_reason"]
    assert len(trial_process_pids()) == 1  # only the failing task's process is left; the dead one is gone
    close_trial_processes()


def test_twenty_trials_in_one_trial_process_do_not_grow_its_memory():
    close_trial_processes()
    study = optuna.create_study(direction="maximize")
    objective = Objective(_spec())
    for _ in range(3):  # warm-up: imports, allocator pools
        _one(objective, study)
    (pid,) = trial_process_pids()
    before = _rss(pid)
    for _ in range(20):
        _one(objective, study)
    assert trial_process_pids() == [pid]
    grown = _rss(pid) - before
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert grown < 16 * 2**20, f"trial process RSS grew by {grown / 2**20:.1f} MiB over 20 trials"
    close_trial_processes()


def test_a_prestarted_trial_process_runs_the_first_trial():
    from lora_tune.study.trial.trial_process import prestart

    close_trial_processes()
    spec = _spec()
    prestart(dict(spec.task))
    (pid,) = trial_process_pids()
    prestart(dict(spec.task))  # one idle process per task is enough
    assert trial_process_pids() == [pid]
    study = optuna.create_study(direction="maximize")
    assert _one(Objective(spec), study).state == TrialState.COMPLETE
    assert trial_process_pids() == [pid]
    close_trial_processes()


def test_a_task_that_fails_to_build_while_prestarting_fails_the_first_trial_with_its_reason():
    from lora_tune.study.trial.trial_process import prestart

    close_trial_processes()
    spec = _spec({"fail_in": "init"})
    prestart(dict(spec.task))
    study = optuna.create_study(direction="maximize")
    trial = _one(Objective(spec), study)
    assert trial.state == TrialState.FAIL and "toy task: init exploded" in trial.user_attrs["fail_reason"]
    close_trial_processes()


def test_cuda_out_of_memory_fails_the_trial_and_the_next_trial_gets_a_fresh_process():
    close_trial_processes()
    study = optuna.create_study(direction="maximize")
    healthy = Objective(_spec())
    assert _one(healthy, study).state == TrialState.COMPLETE
    (healthy_pid,) = trial_process_pids()
    oom = Objective(_spec({"cuda_oom": True}))
    trial = _one(oom, study)
    assert trial.state == TrialState.FAIL and "out of memory" in trial.user_attrs["fail_reason"]
    assert trial_process_pids() == [healthy_pid]  # the one that ran out of CUDA memory exited, not kept
    assert _one(oom, study).state == TrialState.FAIL  # in a fresh process again
    assert trial_process_pids() == [healthy_pid]
    close_trial_processes()
