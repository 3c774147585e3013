"""A lock per study across processes: a PostgreSQL advisory lock, MySQL's ``GET_LOCK``, or an
``flock`` beside an SQLite or journal file. Threads first take an in-process lock, so that at
most one of them waits on the database (a storage proxy's pool is not tied up by waiters).
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from lora_tune.study.storage.retry import is_transient
from lora_tune.study.storage.urls import is_journal_url, journal_path, storage_kind

_NAMESPACE = 0x4C6F5241  # "LoRA": first key of the PostgreSQL advisory lock
_THREAD_LOCKS: dict[tuple[str, int], threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


class StudyLocks:
    """``with locks.hold(study_id):`` - exclusive across processes and threads. ``rdb``: the
    ``RDBStorage`` of a database URL, whose engine holds the lock (kept so this pickles)."""

    def __init__(self, url: str, rdb: Any = None):
        self.url = url
        self.rdb = rdb
        kind = storage_kind(url)
        self.file = None
        if is_journal_url(url):
            self.file = journal_path(url) + ".lora-tune.lock"
        elif kind == "sqlite":
            from sqlalchemy.engine import make_url

            self.file = os.path.abspath(make_url(url).database or "") + ".lora-tune.lock"

    @contextlib.contextmanager
    def hold(self, study_id: int) -> Iterator[None]:
        with _thread_lock(self.url, study_id):
            if self.file is not None:
                with _file_lock(self.file):
                    yield
            elif self.rdb is not None and self.rdb.engine.dialect.name in ("postgresql", "mysql", "mariadb"):
                with _database_lock(self.rdb.engine, study_id):
                    yield
            else:  # in memory, or a server without a known lock: exact within this process
                yield


def _thread_lock(url: str, study_id: int) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault((url, study_id), threading.Lock())


@contextlib.contextmanager
def _database_lock(engine: Any, study_id: int) -> Iterator[None]:
    import sqlalchemy as sa

    dialect = engine.dialect.name
    conn = engine.connect()
    try:
        if dialect == "postgresql":
            # transaction-scoped: released on commit, rollback or a dead connection
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": _NAMESPACE, "b": int(study_id)})
            try:
                yield
            finally:
                _release(conn.rollback)
            return
        name = f"lora_tune_study_{study_id}"
        conn.execute(sa.text("SELECT GET_LOCK(:n, 600)"), {"n": name})
        try:
            yield
        finally:
            _release(lambda: (conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": name}), conn.commit()))
    finally:
        _release(conn.close)


def _release(step: Any) -> None:
    """Run a step of giving a lock back; a lost connection already gave it back, and raising
    would report as failed a trial start that happened."""
    try:
        step()
    except Exception as exc:
        if not is_transient(exc):
            raise


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
