"""Retrying transient storage errors (a database restart, "database is locked", a restarting
proxy) with backoff; a write the lost attempt may have applied is checked, not repeated."""
from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import TrialState

from lora_tune.errors import StorageError
from lora_tune.study.storage.urls import mask_secrets, mask_url
from lora_tune.study.storage.wrapper import StorageWrapper

_logger = logging.getLogger("lora_tune.storage")

# in StorageUnavailable's message: a worker behind a proxy recognises it in the gRPC error
UNAVAILABLE_MARK = "storage unavailable"
_TRANSIENT_GRPC = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")


class StorageUnavailable(StorageError):
    """A storage stayed unreachable for the whole retry period."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a lost/refused connection or a busy database (not bad
    SQL or bad data)."""
    import sqlite3

    import sqlalchemy.exc as sa_exc

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageUnavailable):
            return True
        if grpc_code(current) is not None:
            code = grpc_code(current)
            return code in _TRANSIENT_GRPC or (code == "UNKNOWN" and UNAVAILABLE_MARK in grpc_details(current))
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, (sa_exc.DisconnectionError, sa_exc.TimeoutError, ConnectionError, TimeoutError)):
            return True
        if isinstance(current, sqlite3.OperationalError):
            text = str(current).lower()
            return "locked" in text or "busy" in text
        sqlstate = getattr(current, "sqlstate", None)
        if type(current).__module__.startswith("psycopg") and type(current).__name__ in (
            "OperationalError", "InterfaceError",
        ) or (sqlstate and sqlstate[:2] in ("08", "53", "57", "40")):
            # no SQLSTATE: the connection itself failed; 08 connection, 53 resources
            # (too many clients), 57 server shutdown/startup, 40 deadlock/serialization
            return sqlstate is None or sqlstate[:2] in ("08", "53", "57", "40")
        if isinstance(current, sa_exc.DBAPIError):
            if current.orig is not None and current.orig is not current:
                current = current.orig
                continue
            return isinstance(current, (sa_exc.OperationalError, sa_exc.InterfaceError))
        current = current.__cause__ or current.__context__
    return False


def grpc_code(exc: BaseException) -> str | None:
    """The status name of a gRPC error (``"UNAVAILABLE"``), None for other exceptions."""
    if not type(exc).__module__.startswith("grpc") or not callable(getattr(exc, "code", None)):
        return None
    try:
        return exc.code().name  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not a call error after all
        return None


def grpc_details(exc: BaseException) -> str:
    try:
        return str(exc.details() or "")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        return ""


def first_line(exc: BaseException) -> str:
    """A one-line, password-masked description of ``exc``."""
    details = grpc_details(exc) if grpc_code(exc) else ""
    text = details or str(exc) or type(exc).__name__
    return mask_secrets(text.strip().splitlines()[0] if text.strip() else type(exc).__name__)


class Backoff:
    """Exponential backoff with jitter until a deadline: ``0.2 s, 0.4 s, ... 5 s``."""

    def __init__(self, seconds: float, first: float = 0.2, longest: float = 5.0):
        self.deadline = time.monotonic() + seconds
        self.delay, self.longest, self.attempt = first, longest, 0

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when the deadline would pass."""
        if time.monotonic() + self.delay > self.deadline:
            return None
        self.attempt += 1
        delay, self.delay = self.delay * (0.5 + random.random()), min(self.delay * 2, self.longest)
        return delay


def retry_transient(fn: Callable[[], Any], *, url: str, what: str, seconds: float,
                    already_done: Callable[[], tuple[bool, Any]] | None = None,
                    on_error: Callable[[], None] | None = None, counter: list[int] | None = None) -> Any:
    """Call ``fn`` until it succeeds, retrying transient errors for up to ``seconds``.

    Before each retry ``already_done()`` may say ``(True, value)``: the failed attempt was applied.
    """
    backoff = Backoff(seconds)
    while True:
        try:
            if backoff.attempt and already_done is not None:
                done, value = already_done()
                if done:
                    return value
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = backoff.next_delay()
            if delay is None:
                raise StorageUnavailable(
                    f"{UNAVAILABLE_MARK}: {mask_url(url)} did not answer for {seconds:.0f} s of retries "
                    f"({what}: {first_line(exc)}). Check that the database (or the storage proxy and "
                    "its database) is running and reachable from here, then start the worker again"
                ) from exc
            if counter is not None:
                counter[0] += 1
            _logger.warning("storage %s: %s failed (%s); retry %d in %.1f s", mask_url(url), what,
                            first_line(exc), backoff.attempt, delay)
            if on_error is not None:
                on_error()
            time.sleep(delay)


class RetryingStorage(StorageWrapper):
    """Retries every call that fails with a transient error."""

    def __init__(self, inner: BaseStorage, *, url: str, retry_seconds: float = 120.0):
        super().__init__(inner)
        self.url = url
        self.retry_seconds = retry_seconds
        self._retries = [0]  # transient errors survived, for reports and tests

    @property
    def retries(self) -> int:
        return self._retries[0]

    def _forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.inner, name)
        return self._retry(lambda: method(*args, **kwargs), name)

    def _retry(self, fn: Callable[[], Any], what: str,
               already_done: Callable[[], tuple[bool, Any]] | None = None) -> Any:
        return retry_transient(fn, url=self.url, what=what, seconds=self.retry_seconds,
                               already_done=already_done, on_error=self._drop_connections,
                               counter=self._retries)

    def _drop_connections(self) -> None:
        with contextlib.suppress(Exception):  # the storage is unreachable anyway
            self.inner.remove_session()  # a broken pooled connection is not handed out again

    # writes whose lost attempt may have been applied
    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        def already_done() -> tuple[bool, Any]:
            if not state.is_finished():
                return False, None
            trial = self.inner.get_trial(trial_id)
            same = trial.state == state and (values is None or trial.values == [float(v) for v in values])
            return same, True

        return self._retry(lambda: self.inner.set_trial_state_values(trial_id, state, values),
                           "set_trial_state_values", already_done)

    def create_new_study(self, directions: Sequence[Any], study_name: str | None = None) -> int:
        def already_done() -> tuple[bool, Any]:
            if study_name is None:
                return False, None
            try:
                return True, self.inner.get_study_id_from_name(study_name)
            except KeyError:
                return False, None

        return self._retry(lambda: self.inner.create_new_study(directions, study_name),
                           "create_new_study", already_done)

    def delete_study(self, study_id: int) -> None:
        def already_done() -> tuple[bool, Any]:
            try:
                self.inner.get_study_name_from_id(study_id)
            except KeyError:
                return True, None
            return False, None

        self._retry(lambda: self.inner.delete_study(study_id), "delete_study", already_done)
