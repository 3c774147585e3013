"""A storage wrapper for many workers: retries transient errors and enforces a trial budget.

``ResilientStorage`` sits in front of Optuna's cached RDB storage or a journal storage:

* every call is retried with exponential backoff when the database connection fails
  (server restart, network blip, SQLite "database is locked"), for up to ``retry_seconds``;
  writes that may have been committed before the connection broke are made idempotent;
* with :meth:`set_budget`, a study's ``n_trials`` is a global budget: starting a trial
  (a new one, or a queued WAITING one) happens under a per-study lock shared by every
  worker (a PostgreSQL advisory lock, MySQL ``GET_LOCK``, or a file lock next to a SQLite
  or journal file), after counting the trials that use the budget. Once the budget is used,
  :class:`BudgetReached` is raised from ``create_new_trial`` and nothing is written.

A trial uses the budget when it is RUNNING, COMPLETE, PRUNED or FAIL, except a FAIL trial
that was re-queued by the stale-trial retry callback (its retry uses the budget instead).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Container, Iterator, Sequence
from typing import Any, Callable

import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from lora_tune.study._rdb_fast import is_transient

_logger = logging.getLogger("lora_tune.storage")

CLAIM_KEY = "lora_tune:claim"  # trial system attr: the token of the worker's create call
WORKER_KEY = "lora_tune:worker"  # trial system attr: hostname:pid of the worker running it
RETRY_KEY = "failed_trial"  # set by Optuna's RetryHeartbeatStaleTrialCallback on a retry
_USING_BUDGET = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def budget_used(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count against ``n_trials``: started ones, a failed-and-retried trial once."""
    return sum(1 for t in trials if t.state in _USING_BUDGET) - sum(1 for t in trials if RETRY_KEY in t.system_attrs)
_LOCK_NAMESPACE = 0x4C6F5241  # "LoRA": first key of the PostgreSQL advisory lock


class BudgetReached(Exception):
    """The study's global trial budget is used up: no trial was started."""

    def __init__(self, study_id: int, used: int, budget: int):
        self.study_id, self.used, self.budget = study_id, used, budget
        super().__init__(f"trial budget reached: {used} of {budget} trials started or finished")


class ResilientStorage(BaseStorage, BaseHeartbeat):
    """Optuna storage proxy; see the module docstring. ``rdb`` is the RDBStorage, if any."""

    def __init__(self, inner: BaseStorage, *, url: str, rdb: Any = None, retry_seconds: float = 120.0):
        self.inner = inner
        self.url = url
        self.rdb = rdb
        self.retry_seconds = retry_seconds
        self.retries = 0  # transient errors survived, for reports and tests
        self._budgets: dict[int, int] = {}
        self._thread_lock = threading.RLock()
        self.fast = None  # single-statement trial writes (PostgreSQL, SQLite)
        if rdb is not None:
            from lora_tune.study import _rdb_fast

            if _rdb_fast.supports(rdb.engine):
                self.fast = _rdb_fast.FastTrialWrites(rdb.engine)
                _rdb_fast.FastTrialReads(rdb, self.fast).install()
        # trials this process runs, kept up to date by its own writes: reading one back
        # (Optuna does so ~3 times a trial) costs no query
        self._own: dict[int, FrozenTrial] = {}

    # ----------------------------------------------------------------- retries
    def _retry(self, fn: Callable[[], Any], what: str, on_retry: Callable[[], Any] | None = None) -> Any:
        from lora_tune.study.storage import mask_secrets

        deadline = time.monotonic() + self.retry_seconds
        delay, attempt = 0.2, 0
        while True:
            try:
                if attempt and on_retry is not None:
                    done, value = on_retry()
                    if done:
                        return value
                return fn()
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                attempt += 1
                self.retries += 1
                _logger.warning(
                    "storage %s: %s failed (%s); retry %d in %.1f s", mask_secrets(self.url), what,
                    mask_secrets(str(exc).splitlines()[0] if str(exc) else type(exc).__name__),
                    attempt, delay,
                )
                if self.rdb is not None:
                    with contextlib.suppress(Exception):
                        self.rdb.scoped_session.remove()
                if self.fast is not None:
                    self.fast.reset()
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.inner, name)
        return self._retry(lambda: method(*args, **kwargs), name)

    # ------------------------------------------------------------------ budget
    def set_budget(self, study_id: int, n_trials: int | None) -> None:
        """Make ``n_trials`` the global budget of the study (``None``: no budget)."""
        if n_trials is None:
            self._budgets.pop(study_id, None)
        else:
            self._budgets[study_id] = int(n_trials)

    def budget_used(self, study_id: int) -> int:
        """Trials using the budget now (RUNNING, COMPLETE, PRUNED, FAIL not re-queued)."""
        return self._retry(lambda: self._count_used(study_id, None), "count trials")

    def budget_done(self, study_id: int) -> int:
        """Finished trials that use the budget (no RUNNING ones)."""
        trials = self._call("get_all_trials", study_id, deepcopy=False)
        retried = sum(1 for t in trials if RETRY_KEY in t.system_attrs)
        finished = sum(1 for t in trials if t.state.is_finished())
        return finished - retried

    def _count_used(self, study_id: int, conn: Any) -> int:
        if self.rdb is None:
            return budget_used(self.inner.get_all_trials(study_id, deepcopy=False))
        import sqlalchemy as sa
        from optuna.storages._rdb import models

        t = models.TrialModel.__table__
        a = models.TrialSystemAttributeModel.__table__
        used = sa.select(sa.func.count()).select_from(t).where(
            t.c.study_id == study_id, t.c.state.in_(_USING_BUDGET)
        ).scalar_subquery()
        retried = sa.select(sa.func.count()).select_from(a.join(t, a.c.trial_id == t.c.trial_id)).where(
            t.c.study_id == study_id, a.c.key == RETRY_KEY
        ).scalar_subquery()
        query = sa.select(used - retried)
        if conn is not None:
            return int(conn.execute(query).scalar_one())
        with self.rdb.engine.connect() as own:
            return int(own.execute(query).scalar_one())

    @contextlib.contextmanager
    def study_lock(self, study_id: int, exclusive: bool = True) -> Iterator[Any]:
        """Hold the study's cross-process lock (when ``exclusive``) inside one transaction.

        Yields a connection (RDB; committed on success) or None (journal).
        """
        with self._thread_lock:
            if self.rdb is None:
                path = _journal_lock_path(self.url) if exclusive else None
                with _file_lock(path) if path else contextlib.nullcontext():
                    yield None
                return
            import sqlalchemy as sa

            engine = self.rdb.engine
            dialect = engine.dialect.name
            database = engine.url.database
            file_lock = exclusive and dialect == "sqlite" and database and database != ":memory:"
            with _file_lock(database + ".lora-tune.lock") if file_lock else contextlib.nullcontext():
                with engine.connect() as conn:
                    name = f"lora_tune_study_{study_id}"
                    if exclusive and dialect == "postgresql":
                        # transaction-scoped: released on commit, rollback or a dead connection
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:a, :b)"),
                                     {"a": _LOCK_NAMESPACE, "b": int(study_id)})
                    elif exclusive and dialect in ("mysql", "mariadb"):
                        conn.execute(sa.text("SELECT GET_LOCK(:n, 600)"), {"n": name})
                    # other servers: no cross-process lock known, exact within this process only
                    try:
                        yield conn
                        conn.commit()
                    finally:
                        conn.rollback()
                        if exclusive and dialect in ("mysql", "mariadb"):
                            conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": name})
                            conn.commit()

    def _claim(self, study_id: int, start: Callable[[Any], Any], refuse: Callable[[int, int], Any]) -> Any:
        """Run ``start(conn)`` if the study's budget allows one more trial (under the lock)."""
        budget = self._budgets.get(study_id)
        with self.study_lock(study_id, exclusive=budget is not None) as conn:
            if budget is not None:
                used = self._count_used(study_id, conn)
                if used >= budget:
                    return refuse(used, budget)
            return start(conn)

    # ------------------------------------------------------- study operations
    def create_new_study(self, directions: Sequence[Any], study_name: str | None = None) -> int:
        return self._call("create_new_study", directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self._call("delete_study", study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        # a study file may name its storage with a password; the dashboard shows study attrs
        self._call("set_study_user_attr", study_id, key, _masked(value))

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._call("set_study_system_attr", study_id, key, _masked(value))

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._call("get_study_id_from_name", study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._call("get_study_name_from_id", study_id)

    def get_study_directions(self, study_id: int) -> list[Any]:
        return self._call("get_study_directions", study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call("get_study_user_attrs", study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._call("get_study_system_attrs", study_id)

    def get_all_studies(self) -> list[Any]:
        return self._call("get_all_studies")

    # ------------------------------------------------------- trial operations
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is not None:  # enqueued / added trials do not start anything
            return self._call("create_new_trial", study_id, template_trial)
        token = uuid.uuid4().hex
        system_attrs = {CLAIM_KEY: token, WORKER_KEY: worker_id()}

        def refuse(used: int, budget: int) -> Any:
            raise BudgetReached(study_id, used, budget)

        def start(conn: Any) -> int:
            if self.fast is not None:
                trial = self.fast.create_trial(conn, study_id, system_attrs,
                                               heartbeat=self.get_heartbeat_interval() is not None)
                self._own = {k: v for k, v in self._own.items() if not v.state.is_finished()}
                self._own[trial._trial_id] = trial
                return trial._trial_id
            trial_id = self.inner.create_new_trial(study_id, self._running_template(system_attrs))
            self._first_heartbeat(trial_id)
            return trial_id

        return self._retry(
            lambda: self._claim(study_id, start, refuse), "create trial",
            on_retry=lambda: self._find_claimed(study_id, token),
        )

    def _running_template(self, system_attrs: dict[str, Any]) -> FrozenTrial:
        return FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, values=None,
            datetime_start=datetime.datetime.now(), datetime_complete=None, params={},
            distributions={}, user_attrs={}, system_attrs=dict(system_attrs),
            intermediate_values={}, trial_id=-1,
        )

    def _find_claimed(self, study_id: int, token: str) -> tuple[bool, Any]:
        """After a lost connection: did our create commit? Then return that trial."""
        for trial in self.inner.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.system_attrs.get(CLAIM_KEY) == token:
                return True, trial._trial_id
        return False, None

    def _first_heartbeat(self, trial_id: int) -> None:
        # A worker killed before Optuna's heartbeat thread starts would leave a RUNNING
        # trial that never becomes stale; record one heartbeat at once.
        if self.get_heartbeat_interval() is not None:
            self.inner.record_heartbeat(trial_id)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: Any) -> None:
        if self.fast is None:
            return self._call("set_trial_param", trial_id, param_name, param_value_internal, distribution)
        self._retry(lambda: self.fast.set_param(trial_id, param_name, param_value_internal, distribution),
                    "set_trial_param")
        own = self._own.get(trial_id)
        if own is not None:
            own.params[param_name] = distribution.to_external_repr(param_value_internal)
            own.distributions[param_name] = distribution

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._call("get_trial_id_from_study_id_trial_number", study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self._call("get_trial_number_from_id", trial_id)

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        return self._call("get_trial_param", trial_id, param_name)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        def already_done() -> tuple[bool, Any]:
            # the previous attempt may have committed before the connection dropped
            trial = self.inner.get_trial(trial_id)
            return (trial.state == state and state.is_finished(), True)

        if state == TrialState.RUNNING:  # popping a WAITING trial starts it: budget applies
            study_id = self._study_of_trial(trial_id)

            def start(conn: Any) -> bool:
                ok = self.inner.set_trial_state_values(trial_id, state=state, values=values)
                if ok:
                    self._first_heartbeat(trial_id)
                    self.inner.set_trial_system_attr(trial_id, WORKER_KEY, worker_id())
                return ok

            return self._retry(lambda: self._claim(study_id, start, lambda used, budget: False),
                               "start queued trial")
        own = self._own.get(trial_id)
        try:
            if self.fast is not None and own is not None and state.is_finished():
                end = self._retry(lambda: self.fast.finish(trial_id, state, values), "finish trial",
                                  on_retry=already_done)
                own.state = state
                own.values = list(values) if values is not None else None
                own.datetime_complete = end if isinstance(end, datetime.datetime) else datetime.datetime.now()
                return True
            return self._retry(lambda: self.inner.set_trial_state_values(trial_id, state=state, values=values),
                               "finish trial", on_retry=already_done)
        except optuna.exceptions.UpdateFinishedTrialError:
            # another worker failed this trial as stale (our heartbeats did not reach the
            # database in time) and re-queued its parameters: drop this result, keep working
            self._own.pop(trial_id, None)
            _logger.warning("trial %s was already finished by another worker; result not stored", trial_id)
            return False

    def _study_of_trial(self, trial_id: int) -> int:
        if self.rdb is not None:
            from optuna.storages._rdb import models
            import sqlalchemy as sa

            t = models.TrialModel.__table__
            with self.rdb.engine.connect() as conn:
                return int(conn.execute(sa.select(t.c.study_id).where(t.c.trial_id == trial_id)).scalar_one())
        for study in self.inner.get_all_studies():
            if any(t._trial_id == trial_id for t in self.inner.get_all_trials(study._study_id, deepcopy=False)):
                return study._study_id
        raise KeyError(trial_id)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        if self.fast is None:
            return self._call("set_trial_intermediate_value", trial_id, step, intermediate_value)
        self._retry(lambda: self.fast.set_intermediate(trial_id, step, intermediate_value), "report")
        own = self._own.get(trial_id)
        if own is not None:
            own.intermediate_values[step] = intermediate_value

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(trial_id, key, value, system=False)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._set_attr(trial_id, key, value, system=True)

    def _set_attr(self, trial_id: int, key: str, value: Any, system: bool) -> None:
        name = "set_trial_system_attr" if system else "set_trial_user_attr"
        if self.fast is None:
            return self._call(name, trial_id, key, value)
        self._retry(lambda: self.fast.set_attr(trial_id, key, value, system), name)
        own = self._own.get(trial_id)
        if own is not None:
            (own.system_attrs if system else own.user_attrs)[key] = json.loads(json.dumps(value))

    def get_trial(self, trial_id: int) -> FrozenTrial:
        own = self._own.get(trial_id)
        if own is not None:
            return copy.deepcopy(own)
        return self._call("get_trial", trial_id)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if self.fast is not None and states is not None and tuple(states) == (TrialState.WAITING,):
            # asked before every trial (Optuna's queue); almost always empty: one cheap query
            if not self._retry(lambda: self.fast.has_waiting(study_id), "queued trials"):
                return []
        return self._call("get_all_trials", study_id, deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: Any = None) -> int:
        return self._call("get_n_trials", study_id, state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._call("get_best_trial", study_id)

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self._call("get_trial_params", trial_id)

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._call("get_trial_user_attrs", trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self._call("get_trial_system_attrs", trial_id)

    def remove_session(self) -> None:
        self.inner.remove_session()

    def close(self) -> None:
        """Close this process's connections (the storage stays usable: they reopen on demand)."""
        if self.fast is not None:
            self.fast.close()
        if self.rdb is not None:
            self.rdb.remove_session()
            self.rdb.engine.dispose()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.inner.check_trial_is_updatable(trial_id, trial_state)

    # --------------------------------------------------------------- heartbeat
    def record_heartbeat(self, trial_id: int) -> None:
        # runs in Optuna's heartbeat thread: an exception there would stop the heartbeats
        # and get a healthy trial failed as stale, so keep trying.
        if self.fast is not None:
            self._retry(lambda: self.fast.record_heartbeat(trial_id), "record_heartbeat")
        else:
            self._call("record_heartbeat", trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self._call("_get_stale_trial_ids", study_id)

    def get_heartbeat_interval(self) -> int | None:
        return self.rdb.heartbeat_interval if self.rdb is not None else None

    def get_heartbeat_stale_trial_callback(self) -> Any:
        return self.rdb.heartbeat_stale_trial_callback if self.rdb is not None else None


def _masked(value: Any) -> Any:
    """``value`` with every password inside its strings replaced by ``***``."""
    from lora_tune.study.storage import mask_secrets

    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked(v) for v in value]
    return value


def worker_id() -> str:
    """``hostname:pid`` of this process, as recorded on the trials it runs.

    ``$LORA_TUNE_WORKER_HOST`` replaces the host name (e.g. a pod name that is not the
    container's host name); only workers of the same host judge each other's pids.
    """
    return f"{os.environ.get('LORA_TUNE_WORKER_HOST') or socket.gethostname()}:{os.getpid()}"


def _journal_lock_path(url: str) -> str | None:
    from lora_tune.study.storage import is_journal_url, journal_path

    return journal_path(url) + ".lora-tune.lock" if is_journal_url(url) else None


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock between processes of one machine (released if the process dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: the in-process thread lock is all there is
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
