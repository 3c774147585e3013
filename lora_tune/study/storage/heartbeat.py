"""Heartbeats of running trials, and noticing the trials whose worker is gone.

While a worker runs a trial, a thread rewrites the trial's ``lora_tune:heartbeat`` system
attribute every ``study.heartbeat_interval`` seconds (default 30) - an ordinary attribute
write through Optuna's storage API, so it works the same on a database, a journal file and
through a storage proxy. Every worker watches the RUNNING trials of the study: a trial whose
heartbeat value has not changed for ``study.grace_period`` seconds (default 3 intervals) *as
seen by this worker's own clock* is stale - no clocks of different machines are compared.
Its worker is presumed dead; the trial is failed and its parameters re-queued, at most
``study.failed_trial_retries`` times (default 2). A worker on the same machine is judged at
once by its process id (:mod:`lora_tune.study.run.workers`).

A worker that was only slow (its heartbeats did not arrive within the grace period) finds
its trial failed when it reports or finishes: it drops that result and goes on; the retry
runs the same parameters. The retry itself is Optuna's ``RetryHeartbeatStaleTrialCallback``.

**Why not Optuna's own heartbeat on a database.** ``RDBStorage`` has one
(``heartbeat_interval``, ``grace_period``, ``heartbeat_stale_trial_callback``): a thread that
``Study.optimize`` starts around the objective writes a ``trial_heartbeats`` row, and
``fail_stale_trials`` fails RUNNING trials whose row is older than the grace period. lora-tune
keeps this one implementation for every storage instead, because passing the settings through
would break what it promises:

* *A worker dying at any moment is noticed.* In a budgeted study the budget layer writes a trial's
  first heartbeat in the same call that starts it (:mod:`lora_tune.study.storage.budget`). Optuna writes its first
  one only when the objective starts, after ``ask`` and the sampler's ``before_trial`` (where a
  grid trial may wait for lower ones), and never judges a RUNNING trial that has no row. Such a
  trial would keep its slot of the exact budget forever, and the workers waiting for the last
  trials of the budget would wait forever.
* *One study, any mix of workers.* Workers may reach one database directly and through a storage
  proxy at the same time. Optuna's proxy protocol has no heartbeat call (``GrpcStorageProxy``, like
  ``JournalStorage``, is no ``BaseHeartbeat``), so direct workers on Optuna's heartbeat and proxy
  workers on this one would each miss the other's dead workers, unless both heartbeats ran.
* *The settings are the study's.* ``study.heartbeat_interval`` and ``study.grace_period`` are read
  from the stored study after the storage is opened, and one storage may serve several studies
  (a storage proxy does); Optuna's are fixed per ``RDBStorage`` when it is built.
* *The trial says why it failed.* ``fail_reason`` is written before the trial is failed; Optuna
  fails it first and hands its callback a finished trial, which takes no more attributes.

``tests/storage/test_heartbeat.py`` pins the Optuna behaviour the first two points rest on.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lora_tune.study import _optuna_private as private
from lora_tune.study.storage.marks import HEARTBEAT_KEY, WORKER_KEY, worker_id

_logger = logging.getLogger("lora_tune.workers")

DEFAULT_INTERVAL = 30
DEFAULT_FAILED_TRIAL_RETRIES = 2


@dataclasses.dataclass(frozen=True)
class HeartbeatSettings:
    """``study.heartbeat_interval``, ``study.grace_period`` and ``study.failed_trial_retries``."""

    interval: float = DEFAULT_INTERVAL
    grace_period: float | None = None
    failed_trial_retries: int = DEFAULT_FAILED_TRIAL_RETRIES

    @property
    def grace(self) -> float:
        return self.grace_period if self.grace_period is not None else 3 * self.interval

    @classmethod
    def from_study(cls, user_attrs: Mapping[str, Any]) -> HeartbeatSettings:
        """The settings of the study file stored in the study (defaults where it has none)."""
        spec = user_attrs.get("spec")
        section = spec.get("study") if isinstance(spec, dict) else None
        section = section if isinstance(section, dict) else {}
        retries = section.get("failed_trial_retries")
        return cls(
            interval=float(section.get("heartbeat_interval") or DEFAULT_INTERVAL),
            grace_period=float(section["grace_period"]) if section.get("grace_period") else None,
            failed_trial_retries=DEFAULT_FAILED_TRIAL_RETRIES if retries is None else int(retries),
        )


class StaleWatch:
    """Remembers, per RUNNING trial, its heartbeat value and since when this process sees it."""

    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic):
        self.grace, self.clock = grace, clock
        self._seen: dict[int, tuple[Any, float]] = {}
        self._lock = threading.Lock()

    def stale(self, running: Iterable[FrozenTrial], exclude: Iterable[int] = ()) -> list[FrozenTrial]:
        """The trials among ``running`` whose heartbeat has not changed for ``grace`` seconds.

        Only trials started by lora-tune (with a heartbeat attribute) are judged; ``exclude``:
        trial ids this process runs itself.
        """
        now, skip, found = self.clock(), set(exclude), []
        with self._lock:
            current = {}
            for trial in running:
                if trial.state != TrialState.RUNNING or HEARTBEAT_KEY not in trial.system_attrs:
                    continue
                tid, beat = private.trial_id(trial), trial.system_attrs[HEARTBEAT_KEY]
                value, since = self._seen.get(tid, (beat, now))
                current[tid] = (beat, since if value == beat else now)
                if tid not in skip and now - current[tid][1] >= self.grace:
                    found.append(trial)
            self._seen = current
        return found


class TrialHeartbeat:
    """``with TrialHeartbeat(storage, trial_id, interval, on_beat):`` - a thread that records
    this worker on the trial and beats every ``interval`` seconds until the block ends.

    ``on_beat()`` runs after each beat (the worker looks for stale trials of others then).
    ``marked``: the storage already wrote this worker and a first heartbeat when it started the
    trial (a budgeted study, opened by this process), so the first beat is skipped.
    ``lost`` is set when the trial turned out to be finished by someone else.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, interval: float,
                 on_beat: Callable[[], Any] | None = None, marked: bool = False):
        self.storage, self.trial_id, self.interval, self.on_beat = storage, trial_id, interval, on_beat
        self.marked = marked  # the storage already recorded this worker and a first heartbeat
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lora-tune-heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> TrialHeartbeat:
        if not self.marked:
            self.beat(first=True)  # before the objective runs: a worker that dies now is noticed
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def beat(self, first: bool = False) -> None:
        try:
            if first:
                self.storage.set_trial_system_attr(self.trial_id, WORKER_KEY, worker_id())
            self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_KEY, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            self.lost = True
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
                if self.on_beat is not None and not self._stop.is_set():
                    self.on_beat()
            except Exception as exc:  # noqa: BLE001 - a heartbeat thread must not die
                _logger.warning("heartbeat of trial id %s: %s", self.trial_id, exc)
