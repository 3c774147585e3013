"""The study's exact global trial budget: its ``n_trials``, stored in the study so that every
process reads the same number; slots are counted by :mod:`lora_tune.study.trial.record`.

:class:`BudgetedStorage` starts a trial of a budgeted study (a new or a queued one) only under
the study's lock (:mod:`.locks`), after counting, with lora-tune's start marks (:mod:`.marks`)
written in the same call, so that a worker dying at any point leaves a trial the others retry.
When the budget is used up ``create_new_trial`` raises :class:`BudgetReached` and writes nothing.
A start whose answer was lost is found by its token on the thread's next start, not repeated.
"""
from __future__ import annotations

import contextlib
import datetime
import re
import threading
import uuid
from collections.abc import Container, Iterator, Mapping, Sequence
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from lora_tune.study import _optuna_private as private
from lora_tune.study.trial.record import budget_done, budget_used
from lora_tune.study.storage.locks import StudyLocks
from lora_tune.study.storage.marks import RETRY_KEY, START_KEY, start_marks
from lora_tune.study.storage.wrapper import StorageWrapper

__all__ = ["BudgetReached", "BudgetedStorage", "budget_done", "budget_used", "study_budget"]

_MESSAGE = "trial budget reached: {used} of {budget} trials started or finished"
_PARSE = re.compile(r"trial budget reached: (\d+) of (\d+) trials")


class BudgetReached(Exception):
    """The study's global trial budget is used up: no trial was started."""

    def __init__(self, study_id: int, used: int, budget: int):
        self.study_id, self.used, self.budget = study_id, used, budget
        super().__init__(_MESSAGE.format(used=used, budget=budget))

    @classmethod
    def parse(cls, study_id: int, text: str) -> BudgetReached | None:
        """The BudgetReached whose message is inside ``text`` (e.g. a storage proxy's error)."""
        found = _PARSE.search(text)
        return cls(study_id, int(found[1]), int(found[2])) if found else None


def study_budget(user_attrs: Mapping[str, Any]) -> int | None:
    """The study's ``n_trials`` from its user attributes (stored study file, else ``n_trials``)."""
    spec = user_attrs.get("spec")
    if isinstance(spec, dict) and isinstance(spec.get("study"), dict):
        value = spec["study"].get("n_trials")
        if value is not None:
            return int(value)
    value = user_attrs.get("n_trials")
    return int(value) if value is not None else None


class BudgetedStorage(StorageWrapper):
    """Starts trials of budgeted studies under the study lock, after counting. ``worker``: recorded
    on the trials it starts; None in a storage proxy, whose clients record their own."""

    def __init__(self, inner: BaseStorage, locks: StudyLocks, worker: str | None):
        super().__init__(inner)
        self.locks = locks
        self.worker = worker
        self._study_of: dict[int, int] = {}  # trial id -> study id, from the trials read
        # thread id -> (study id, token) of its start whose answer was lost (see the module)
        self._pending: dict[int, tuple[int, str]] = {}

    def budget(self, study_id: int) -> int | None:
        return study_budget(self.inner.get_study_user_attrs(study_id))

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        budget = None if template_trial is not None else self.budget(study_id)
        if budget is None:
            return self._known(study_id, self.inner.create_new_trial(study_id, template_trial))
        # read before taking the lock: under it, Optuna's cache reads only what changed
        self.inner.get_all_trials(study_id, deepcopy=False)
        with self.locks.hold(study_id):
            trials = self.inner.get_all_trials(study_id, deepcopy=False)
            started = self._already_started(study_id, trials)
            self._pending.pop(threading.get_ident(), None)  # every trial was looked at
            if started is not None:
                return self._known(study_id, private.trial_id(started))
            used = budget_used(trials)
            if used >= budget:
                raise BudgetReached(study_id, used, budget)
            with self._starting(study_id) as token:
                return self._known(study_id, self.inner.create_new_trial(study_id, self._running(token)))

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        if state != TrialState.RUNNING:
            return self.inner.set_trial_state_values(trial_id, state, values)
        study_id = self._study_of.get(trial_id)
        if study_id is None:
            study_id = self._find_study(trial_id)
        if self.budget(study_id) is None:
            return self.inner.set_trial_state_values(trial_id, state, values)
        with self.locks.hold(study_id):  # popping a queued trial starts it: the budget applies
            trial = self.inner.get_trial(trial_id)
            if trial.state == TrialState.RUNNING and self._already_started(study_id, [trial]):
                return True  # this thread's lost attempt started it
            if trial.state != TrialState.WAITING:
                return self.inner.set_trial_state_values(trial_id, state, values)  # Optuna's answer
            budget = self.budget(study_id)
            used = budget_used(self.inner.get_all_trials(study_id, deepcopy=False))
            if RETRY_KEY not in trial.system_attrs and budget is not None and used >= budget:
                return False  # (a queued retry has its slot: never refused)
            with self._starting(study_id) as token:
                for key, value in start_marks(self.worker, token).items():  # before it runs
                    self.inner.set_trial_system_attr(trial_id, key, value)
                return self.inner.set_trial_state_values(trial_id, state, values)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        trials = self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        for trial in trials:
            self._study_of[private.trial_id(trial)] = study_id
        return trials

    @contextlib.contextmanager
    def _starting(self, study_id: int) -> Iterator[str]:
        """A fresh start token, remembered for this thread until the start returns."""
        token = uuid.uuid4().hex
        self._pending[threading.get_ident()] = (study_id, token)
        yield token
        del self._pending[threading.get_ident()]  # answered (not reached on an error)

    def _already_started(self, study_id: int, trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
        """The trial among ``trials`` that this thread's last, unanswered start created."""
        pending = self._pending.get(threading.get_ident())
        if pending is None or pending[0] != study_id:
            return None
        found = next((t for t in trials if t.system_attrs.get(START_KEY) == pending[1]), None)
        if found is not None:
            del self._pending[threading.get_ident()]
        return found

    def _known(self, study_id: int, trial_id: int) -> int:
        self._study_of[trial_id] = study_id
        return trial_id

    def _find_study(self, trial_id: int) -> int:
        for study in self.inner.get_all_studies():
            for trial in self.inner.get_all_trials(private.frozen_study_id(study), deepcopy=False):
                self._study_of[private.trial_id(trial)] = private.frozen_study_id(study)
        if trial_id not in self._study_of:
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        return self._study_of[trial_id]

    def _running(self, token: str) -> FrozenTrial:
        return FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, values=None,
            datetime_start=datetime.datetime.now(), datetime_complete=None, params={},
            distributions={}, user_attrs={}, system_attrs=start_marks(self.worker, token),
            intermediate_values={}, trial_id=-1,
        )
