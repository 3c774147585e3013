"""Heartbeats of running trials, and failing the trials whose worker is gone.

A thread rewrites a running trial's ``lora_tune:heartbeat`` every ``study.heartbeat_interval``
seconds; a trial whose value has not changed for ``study.grace_period`` seconds *by this worker's
own clock* is failed and re-queued (Optuna's ``RetryHeartbeatStaleTrialCallback``) at most
``study.failed_trial_retries`` times. Not Optuna's ``RDBStorage`` heartbeat, because that one
starts beating only when the objective starts (a budgeted trial is marked in the call that
starts it), does not exist behind a storage proxy or a journal, is fixed per storage rather
than per study, and fails a trial before its ``fail_reason`` can be written.
``tests/storage/test_heartbeat.py`` pins the Optuna behaviour this rests on.
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
        """The lora-tune trials among ``running`` (but ``exclude``, trial ids) whose heartbeat
        has not changed for ``grace`` seconds."""
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
    """``with TrialHeartbeat(...):`` - records this worker on the trial and beats every
    ``interval`` seconds until the block ends, calling ``on_beat()`` after each beat.

    ``marked``: the storage already wrote the first beat when it started the trial.
    ``lost``: the trial turned out to be finished by someone else.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, interval: float,
                 on_beat: Callable[[], Any] | None = None, marked: bool = False):
        self.storage, self.trial_id, self.interval, self.on_beat = storage, trial_id, interval, on_beat
        self.marked = marked
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
