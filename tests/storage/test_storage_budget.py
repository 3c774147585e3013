"""In-process checks of the worker loop: exact budget, stale trials, SIGTERM, lost connections."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState
from tcp_proxy import OutageProxy
from workerlib import HERE, REPO, by_state, make_study, reload

from lora_tune.study.storage import opening as st
from lora_tune.study.run.samplers import OrderedGridSampler
from lora_tune.study.storage.budget import BudgetReached, study_budget
from lora_tune.study.storage.retry import is_transient
from lora_tune.study.storage.wrapper import StorageWrapper
from lora_tune.study.run.workers import run_worker

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")


def quick(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.report(x, 0)
    return x


def test_budget_is_exact_with_threads(tmp_path):
    url = f"sqlite:///{tmp_path / 'threads.db'}"
    make_study(url, "threads", 13)
    storage = st.open_storage(url)
    stats = []

    def work() -> None:
        study = optuna.load_study(study_name="threads", storage=storage)
        stats.append(run_worker(study, quick))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    st.dispose_storage(storage)
    trials, _ = reload(url, "threads")
    assert by_state(trials) == {"COMPLETE": 13}
    assert sum(s.trials for s in stats) == 13 and all(s.budget_reached for s in stats)


def test_budget_reached_writes_nothing(tmp_path):
    url = f"journal:{tmp_path / 'j.log'}"
    study = make_study(url, "full", 2)
    assert study_budget(study.user_attrs) == 2
    run_worker(study, quick)
    with pytest.raises(BudgetReached, match="2 of 2"):
        study.ask()
    assert len(study.get_trials()) == 2


def _abandoned_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """A trial whose worker vanished: started, params set, never finished, no more heartbeats."""
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.report(0.5, 0)
    return study._storage.get_trial(trial._trial_id)


@pytest.mark.parametrize("retries, expected", [(2, {"COMPLETE": 3, "FAIL": 1}), (0, {"COMPLETE": 2, "FAIL": 1})])
def test_stale_trial_is_failed_and_retried_with_same_params(tmp_path, retries, expected):
    url = f"sqlite:///{tmp_path / 'stale.db'}"
    study = make_study(url, "stale", 3, heartbeat_interval=1, grace_period=1, failed_trial_retries=retries)
    lost = _abandoned_trial(study)
    stats = run_worker(study, quick)
    trials = study.get_trials()
    assert by_state(trials) == expected
    assert trials[lost.number].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retried) == (1 if retries else 0)
    if retried:
        assert retried[0].params == lost.params and retried[0].state == TrialState.COMPLETE
    assert stats.budget_reached
    st.dispose_storage(study._storage)


def test_worker_waits_for_running_trials_of_others(tmp_path):
    """Budget used but a trial still runs elsewhere: the worker waits, and runs its retry."""
    url = f"sqlite:///{tmp_path / 'wait.db'}"
    study = make_study(url, "wait", 2, heartbeat_interval=1, grace_period=2)
    lost = _abandoned_trial(study)  # a worker "elsewhere" that will die
    start = time.monotonic()
    stats = run_worker(study, quick, poll_interval=0.2)
    assert time.monotonic() - start >= 1.5  # it waited for the stale trial to be detected
    trials = study.get_trials()
    assert by_state(trials) == {"COMPLETE": 2, "FAIL": 1}
    assert any(t.system_attrs.get("failed_trial") == lost.number for t in trials)
    assert stats.trials == 2
    st.dispose_storage(study._storage)


def test_a_plain_grid_sampler_is_run_as_an_ordered_one_with_the_same_grid(tmp_path):
    space = {"x": [0.0, 0.5, 1.0], "y": [1, 2]}
    plain = optuna.samplers.GridSampler(space, seed=4)
    study = make_study(f"journal:{tmp_path / 'grid.log'}", "grid", 6, sampler=plain)
    stats = run_worker(study, lambda t: t.suggest_float("x", 0, 1) + t.suggest_int("y", 1, 2))
    assert isinstance(study.sampler, OrderedGridSampler) and stats.trials == 6
    reference = optuna.create_study(sampler=optuna.samplers.GridSampler(space, seed=4))
    reference.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_int("y", 1, 2), n_trials=6)
    assert [t.params for t in study.get_trials()] == [t.params for t in reference.trials]  # same grid, same order


@pytest.mark.slow
def test_sigterm_fails_trial_and_requeues_its_params(tmp_path):
    url = f"sqlite:///{tmp_path / 'term.db'}"
    study = make_study(url, "term", 3, sleep=0.3, steps=10)
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    worker = subprocess.Popen(
        [sys.executable, "-m", "lora_tune.cli.main", "worker", "term", "--storage", url,
         "--objective", "worker_objectives:sleep_objective"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running and running[0].intermediate_values:
            break
        time.sleep(0.1)
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=30)
    assert worker.returncode == 130, out + err
    assert "re-queued trial(s) [0]" in out
    trials, _ = reload(url, "term")
    assert by_state(trials) == {"FAIL": 1, "WAITING": 1}
    assert trials[1].params == trials[0].params and trials[1].system_attrs["failed_trial"] == 0


@pytest.mark.postgres
def test_lost_connection_is_retried_not_fatal(postgres_url):
    """A real outage between worker and server: calls wait and succeed, nothing is lost."""
    import sqlalchemy as sa

    base = sa.engine.make_url(postgres_url)
    proxy = OutageProxy((base.host or "127.0.0.1", base.port or 5432))
    url = proxy.url(postgres_url)
    try:
        study = make_study(url, "outage", 3)
        storage = study._storage
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        proxy.cut()
        threading.Timer(1.5, proxy.restore).start()
        start = time.monotonic()
        for step in range(3):
            trial.report(float(step), step)  # during the outage: retried until the link is back
        study.tell(trial, 1.0)
        assert time.monotonic() - start >= 1.0
        assert storage.retries >= 1
        stats = run_worker(study, quick)
        assert stats.trials == 2
        trials, _ = reload(postgres_url, "outage")
        assert by_state(trials) == {"COMPLETE": 3}
        assert trials[0].intermediate_values == {0: 0.0, 1: 1.0, 2: 2.0}
        st.dispose_storage(storage)
    finally:
        proxy.close()


def test_transient_classification(tmp_path):
    import sqlalchemy as sa

    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:1/x", connect_args={"connect_timeout": 2})
    with pytest.raises(sa.exc.OperationalError) as refused:
        engine.connect()
    assert is_transient(refused.value)
    sqlite = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with sqlite.connect() as conn, pytest.raises(sa.exc.DBAPIError) as syntax:
        conn.execute(sa.text("SELEC 1"))
    assert not is_transient(syntax.value)
    locked = sa.exc.OperationalError("UPDATE", {}, __import__("sqlite3").OperationalError("database is locked"))
    assert is_transient(locked)
    assert not is_transient(ValueError("x"))


def test_requeue_is_bounded_by_max_retry(tmp_path):
    from lora_tune.study.run.workers import requeue_trials

    study = make_study(f"sqlite:///{tmp_path / 'rq.db'}", "rq", 10)
    first = _abandoned_trial(study)
    assert requeue_trials(study, [first._trial_id], max_retry=1) == [first.number]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == first.params
    second = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
        study._study_id, waiting[0].number))
    # the retry is started and lost too: with max_retry=1 it is only failed
    study._storage.set_trial_state_values(second._trial_id, TrialState.RUNNING)
    assert requeue_trials(study, [second._trial_id], max_retry=1) == []
    states = by_state(study.get_trials())
    assert states == {"FAIL": 2}
    assert requeue_trials(study, [first._trial_id], max_retry=5) == []  # failed by someone else: left alone
    assert requeue_trials(study, [first._trial_id], max_retry=5, failed_by_us=True) == [first.number]
    st.dispose_storage(study._storage)


def test_budget_counts_one_slot_per_original_trial():
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from lora_tune.study.storage.budget import budget_done, budget_used

    dist = {"x": FloatDistribution(0, 1)}

    def trial(state, **system_attrs):
        values = {"value": 1.0} if state == TrialState.COMPLETE else {}
        return create_trial(state=state, params={"x": 0.5}, distributions=dist, system_attrs=system_attrs, **values)

    failed, done = trial(TrialState.FAIL), trial(TrialState.COMPLETE)
    queued_retry = trial(TrialState.WAITING, failed_trial=0)
    assert (budget_used([failed, done, queued_retry]), budget_done([failed, done, queued_retry])) == (2, 1)
    running_retry = trial(TrialState.RUNNING, failed_trial=0)
    assert (budget_used([failed, done, running_retry]), budget_done([failed, done, running_retry])) == (2, 1)
    finished_retry = trial(TrialState.COMPLETE, failed_trial=0)
    assert (budget_used([failed, done, finished_retry]), budget_done([failed, done, finished_retry])) == (2, 2)
    enqueued = trial(TrialState.WAITING)  # e.g. the baseline, not started yet
    assert (budget_used([done, enqueued]), budget_done([done, enqueued])) == (1, 1)


def test_started_trials_carry_marks_only_in_budgeted_studies(tmp_path):
    """lora-tune's one deliberate difference from Optuna's storage contract, and its limits."""
    from lora_tune.study.storage.marks import HEARTBEAT_KEY, WORKER_KEY, worker_id

    storage = st.open_storage(f"sqlite:///{tmp_path / 'marks.db'}")
    plain = optuna.create_study(study_name="plain", storage=storage)
    assert plain.ask() and plain.trials[0].system_attrs == {}  # Optuna's behaviour: nothing added
    budgeted = optuna.create_study(study_name="budgeted", storage=storage)
    budgeted.set_user_attr("n_trials", 3)
    budgeted.ask()
    marks = budgeted.trials[0].system_attrs
    assert marks[WORKER_KEY] == worker_id() and isinstance(marks[HEARTBEAT_KEY], float)
    budgeted.enqueue_trial({"x": 0.5})  # a template trial: as given
    assert set(budgeted.trials[1].system_attrs) == {"fixed_params"}
    budgeted.ask()  # popping the queued trial starts it: marked before it runs
    assert {WORKER_KEY, HEARTBEAT_KEY} <= set(budgeted.trials[1].system_attrs)
    st.dispose_storage(storage)


def test_queued_retry_runs_in_its_own_slot(tmp_path):
    """A re-queued trial keeps the budget slot of the trial it retries: a new trial cannot take it."""
    from lora_tune.study.run.workers import requeue_trials

    study = make_study(f"sqlite:///{tmp_path / 'slot.db'}", "slot", 2)
    lost = _abandoned_trial(study)
    study.tell(study.ask(), 1.0)
    assert requeue_trials(study, [lost._trial_id], max_retry=2) == [lost.number]
    retry = study.ask()  # Optuna pops the queued retry first; the budget lets it start
    assert retry.params == lost.params
    with pytest.raises(BudgetReached):
        study.ask()
    st.dispose_storage(study._storage)


def test_trial_failed_by_another_worker_is_dropped_and_its_retry_runs(tmp_path):
    """The worker side of stale trials: a worker that was only slow finds its trial failed and
    re-queued by another one; it drops that result, logs it, and the retry runs the parameters."""
    from lora_tune.study.run.workers import requeue_trials

    url = f"sqlite:///{tmp_path / 'slow.db'}"
    study = make_study(url, "slow", 2)
    other = optuna.load_study(study_name="slow", storage=study._storage)
    seen = []

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        seen.append((trial.number, x))
        if trial.number == 0:  # meanwhile another worker judged this trial stale
            requeue_trials(other, [trial._trial_id], max_retry=2, reason="no heartbeat")
            trial.report(x, 0)  # Optuna refuses: the trial is finished
        return x

    stats = run_worker(study, objective)
    assert stats.lost == [0] and stats.budget_reached
    trials = study.get_trials()
    assert by_state(trials) == {"FAIL": 1, "COMPLETE": 2}
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.params["x"] == seen[0][1] and retry.state == TrialState.COMPLETE
    st.dispose_storage(study._storage)


def test_stale_watch_judges_by_its_own_clock():
    from optuna.trial import create_trial

    from lora_tune.study.storage.heartbeat import StaleWatch
    from lora_tune.study.storage.marks import HEARTBEAT_KEY

    now = [100.0]
    watch = StaleWatch(grace=10, clock=lambda: now[0])

    def running(trial_id: int, beat: float | None):
        trial = create_trial(state=TrialState.RUNNING, system_attrs={} if beat is None else {HEARTBEAT_KEY: beat})
        trial._trial_id = trial_id
        return trial

    assert watch.stale([running(1, 5.0), running(2, 1e9), running(3, None)]) == []  # first sighting
    now[0] = 109.0
    assert watch.stale([running(1, 5.0), running(2, 1e9 + 30)]) == []
    now[0] = 111.0
    stale = watch.stale([running(1, 5.0), running(2, 1e9 + 30), running(3, None)])
    assert [t._trial_id for t in stale] == [1]  # 2 beat meanwhile; 3 is not a lora-tune trial
    assert watch.stale([running(1, 5.0)], exclude=[1]) == []


class _AnswerLost(StorageWrapper):
    """A storage layer whose first start (new trial or popped queued trial) is applied, then
    raises the error a database restart gives: the commit happened, the answer never came."""

    lost = 0

    def _lose(self, value):
        if self.lost == 0:
            self.lost += 1
            raise ConnectionError("server closed the connection unexpectedly")
        return value

    def create_new_trial(self, study_id, template_trial=None):
        created = self.inner.create_new_trial(study_id, template_trial)
        starts = template_trial is None or template_trial.state == TrialState.RUNNING
        return self._lose(created) if starts else created  # (not an enqueue)

    def set_trial_state_values(self, trial_id, state, values=None):
        applied = self.inner.set_trial_state_values(trial_id, state, values)
        return self._lose(applied) if state == TrialState.RUNNING else applied


@pytest.mark.parametrize("start", ["new", "queued"])
def test_start_whose_answer_was_lost_is_not_started_twice(tmp_path, start):
    """A retried start finds the trial its lost attempt created: no orphan RUNNING trial
    holds a budget slot (what a PostgreSQL restart mid-start used to leave)."""
    from lora_tune.study.storage.budget import BudgetedStorage
    from lora_tune.study.storage.locks import StudyLocks
    from lora_tune.study.storage.marks import START_KEY
    from lora_tune.study.storage.retry import RetryingStorage

    url = f"sqlite:///{tmp_path / 'lost.db'}"
    rdb = optuna.storages.RDBStorage(url)
    lossy = _AnswerLost(rdb)
    storage = RetryingStorage(BudgetedStorage(lossy, StudyLocks(url, rdb), "host:1"), url=url, retry_seconds=10)
    study = optuna.create_study(study_name="lost", storage=storage)
    study.set_user_attr("n_trials", 2)
    if start == "queued":
        study.enqueue_trial({"x": 0.25})
    trial = study.ask()
    assert lossy.lost == 1 and storage.retries == 1  # the answer really was lost, and retried
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.RUNNING]
    assert trial.number == trials[0].number and START_KEY in trials[0].system_attrs
    if start == "queued":
        assert trial.suggest_float("x", 0.0, 1.0) == 0.25
    study.tell(trial, 1.0)
    study.tell(study.ask(), 2.0)  # the budget's other slot
    with pytest.raises(BudgetReached, match="2 of 2"):
        study.ask()
    assert by_state(study.get_trials(deepcopy=False)) == {"COMPLETE": 2}
