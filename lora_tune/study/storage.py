"""Storage URLs, opening storages that survive many workers, and password masking.

One URL names where a study lives:

* ``sqlite:///path.db`` (the default, ``sqlite:///lora_tune.db``): one process only;
* any other SQLAlchemy URL, e.g. ``postgresql+psycopg://user@host/db``: many workers;
* ``journal:PATH`` or a path ending in ``.log``: Optuna's journal file, safe for several
  processes on one machine.

:func:`open_storage` wraps the Optuna storage in :class:`ResilientStorage`, which retries
transient connection errors with backoff (a database restart does not kill a worker) and
enforces the study's global trial budget exactly (see :mod:`lora_tune.study.workers`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from typing import Any

import optuna

from lora_tune.errors import ConfigError, StorageError
from lora_tune.study._resilient import ResilientStorage

ENV_STORAGE = "LORA_TUNE_STORAGE"
DEFAULT_STORAGE_URL = "sqlite:///lora_tune.db"
DEFAULT_HEARTBEAT_INTERVAL = 30  # seconds between heartbeats of a running trial
DEFAULT_FAILED_TRIAL_RETRIES = 2
POOL_SIZE = 2  # connections kept per worker process (trial + heartbeat thread)
MAX_OVERFLOW = 3  # extra connections a worker may open under load (budget lock, reports)

__all__ = [
    "DEFAULT_STORAGE_URL", "ENV_STORAGE", "ResilientStorage", "configure_heartbeat",
    "dispose_storage", "is_journal_url", "journal_path", "mask_secrets", "mask_url",
    "open_storage", "resolve_storage_url", "storage_kind", "supports_processes",
]

# scheme://user:password@  ->  scheme://user:***@   (a password cannot hold '@' or spaces
# unencoded); key=value forms (libpq DSN, URL query) -> password=***
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.\-]*://[^:/@\s]*):([^@\s]+)@")
_KV_PASSWORD = re.compile(r"(?i)\b(password|passwd|pwd)=([^&\s;'\"]+)")


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    >>> mask_url("postgresql+psycopg://user:secret@host/db")
    'postgresql+psycopg://user:***@host/db'
    """
    return mask_secrets(url)


def mask_secrets(text: str) -> str:
    """Mask every password inside free text (URLs and ``password=`` pairs)."""
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    return _KV_PASSWORD.sub(r"\1=***", text)


class MaskingFilter(logging.Filter):
    """A logging filter that masks passwords in messages and their arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def install_log_masking(*loggers: logging.Logger) -> None:
    """Mask passwords in records passing through the handlers of the given loggers.

    Defaults to the root, ``optuna`` and ``lora_tune`` loggers. Idempotent.
    """
    targets = loggers or (logging.getLogger(), logging.getLogger("optuna"), logging.getLogger("lora_tune"))
    for logger in targets:
        for handler in logger.handlers:
            if not any(isinstance(f, MaskingFilter) for f in handler.filters):
                handler.addFilter(MaskingFilter())
        if not any(isinstance(f, MaskingFilter) for f in logger.filters):
            logger.addFilter(MaskingFilter())


def resolve_storage_url(cli_value: str | None, spec_value: str | None) -> str:
    """Pick the storage URL: ``--storage``, then ``$LORA_TUNE_STORAGE``, then the study file."""
    for value in (cli_value, os.environ.get(ENV_STORAGE), spec_value):
        if value is not None and value.strip():
            return value.strip()
    return DEFAULT_STORAGE_URL


def is_journal_url(url: str) -> bool:
    return url.startswith("journal:") or (("://" not in url) and url.endswith(".log"))


def journal_path(url: str) -> str:
    """The file of a journal URL (``journal:PATH``, ``journal:///abs/PATH`` or ``PATH.log``)."""
    if not is_journal_url(url):
        raise ConfigError("storage", mask_url(url), "a journal URL: journal:PATH or a path ending in .log")
    path = url[len("journal:"):] if url.startswith("journal:") else url
    if path.startswith("//"):
        path = path[2:]  # journal:///abs/path -> /abs/path ; journal://rel -> rel
    if not path:
        raise ConfigError("storage", url, "journal:PATH with a file path")
    return path


def storage_kind(url: str) -> str:
    """``"journal"``, ``"sqlite"``, ``"memory"`` (sqlite in memory) or ``"rdb"`` (a server)."""
    if is_journal_url(url):
        return "journal"
    if "://" not in url:
        raise ConfigError(
            "storage", mask_url(url),
            "an SQLAlchemy URL (sqlite:///file.db, postgresql+psycopg://user@host/db), "
            "journal:PATH or a path ending in .log",
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme.startswith("sqlite"):
        rest = url.split("://", 1)[1]
        if rest not in ("", "/", "/:memory:"):
            folder = os.path.dirname(rest[1:]) if rest.startswith("/") else ""
            if folder and not os.path.isdir(folder):
                raise ConfigError("storage", mask_url(url), "an SQLite file in an existing directory",
                                  f"{folder} does not exist")
        return "memory" if rest in ("", "/", "/:memory:") else "sqlite"
    if scheme.split("+", 1)[0] not in _RDB_DIALECTS:
        raise ConfigError("storage", mask_url(url), "sqlite:///FILE, postgresql+psycopg://USER@HOST/DB, "
                          "mysql+pymysql://USER@HOST/DB or journal:PATH")
    return "rdb"


_RDB_DIALECTS = ("postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")


def reading_problem(url: str) -> str | None:
    """Why a read-only command (list, show, report, export) must not open ``url``, or None.

    Opening a file-backed storage creates it, and on an SQLite file creates Optuna's tables:
    a missing file, or an SQLite file that holds no Optuna tables, is refused instead."""
    kind = storage_kind(url)
    if kind == "journal":
        path = journal_path(url)
        return None if os.path.isfile(path) else f"{os.path.abspath(path)} does not exist"
    if kind != "sqlite":
        return None
    from sqlalchemy.engine import make_url

    path = make_url(url).database or ""
    if not os.path.isfile(path):
        return f"{os.path.abspath(path)} does not exist"
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'").fetchone()
    except sqlite3.DatabaseError as exc:
        return f"{os.path.abspath(path)} is not an SQLite database ({exc})"
    return None if found else f"{os.path.abspath(path)} holds no Optuna study tables"


def supports_processes(url: str) -> bool:
    """Whether several processes may safely share this storage (journal file or a DB server)."""
    return storage_kind(url) in ("journal", "rdb")


def _engine_kwargs(url: str, kind: str) -> dict[str, Any]:
    if kind in ("sqlite", "memory"):
        # a writer holding the lock makes others wait instead of failing at once
        return {"connect_args": {"timeout": 60}}
    kwargs: dict[str, Any] = {
        "pool_pre_ping": True,  # a connection killed by a server restart is replaced, not used
        "pool_size": POOL_SIZE,
        "max_overflow": MAX_OVERFLOW,
        "pool_timeout": 60,
        "pool_recycle": 1800,
    }
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10, "application_name": "lora-tune"}
    return kwargs


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    failed_trial_retries: int = DEFAULT_FAILED_TRIAL_RETRIES,
    retry_seconds: float = 120.0,
) -> ResilientStorage:
    """Open the storage at ``url`` ready for many workers.

    RDB storages (SQLite, PostgreSQL, MySQL) get heartbeats (``heartbeat_interval`` seconds,
    default 30; a trial without a heartbeat for ``grace_period`` seconds, default 3 intervals,
    is failed by the next worker asking for a trial) and stale trials are retried with the
    same parameters up to ``failed_trial_retries`` times. Transient connection errors are
    retried with exponential backoff for up to ``retry_seconds``.
    """
    kind = storage_kind(url)
    if heartbeat_interval is not None and heartbeat_interval <= 0:
        raise ConfigError("study.heartbeat_interval", heartbeat_interval, "a positive number of seconds")
    if grace_period is not None and grace_period <= 0:
        raise ConfigError("study.grace_period", grace_period, "a positive number of seconds")
    if failed_trial_retries < 0:
        raise ConfigError("study.failed_trial_retries", failed_trial_retries, "an integer >= 0")
    try:
        if kind == "journal":
            return ResilientStorage(_open_journal(journal_path(url)), url=url, retry_seconds=retry_seconds)
        interval = heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            rdb = optuna.storages.RDBStorage(
                url,
                engine_kwargs=_engine_kwargs(url, kind),
                heartbeat_interval=interval,
                grace_period=grace_period or 3 * interval,
                heartbeat_stale_trial_callback=_retry_callback(failed_trial_retries),
            )
        if kind == "sqlite":
            _sqlite_wal(rdb.engine)
        return ResilientStorage(
            optuna.storages._CachedStorage(rdb), url=url, rdb=rdb, retry_seconds=retry_seconds
        )
    except ConfigError:
        raise
    except Exception as exc:  # driver missing, server down, bad credentials...
        raise StorageError(f"cannot open storage {mask_url(url)}: {mask_secrets(str(exc))}") from None


def _sqlite_wal(engine: Any) -> None:
    """SQLite in WAL mode: readers (a dashboard) do not block the writer, and a commit costs
    one sync of the log instead of several (synchronous=NORMAL is safe in WAL mode: a power
    cut may lose the last commits, never corrupt the file)."""
    import sqlalchemy as sa

    def pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sa.event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections opened while creating the tables get the pragmas too


def _open_journal(path: str) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # the open-lock (O_EXCL lock file) works on local disks and NFSv3+, unlike symlinks on some mounts
    backend = JournalFileBackend(path, lock_obj=JournalFileOpenLock(path))
    return optuna.storages.JournalStorage(backend)


def _retry_callback(max_retry: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def configure_heartbeat(
    storage: optuna.storages.BaseStorage,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    failed_trial_retries: int | None = None,
) -> None:
    """Change heartbeat settings of an opened storage (e.g. from the study file's values).

    Does nothing for storages without heartbeats (journal files).
    """
    rdb = getattr(storage, "rdb", None)
    if rdb is None:
        return
    if heartbeat_interval is not None:
        if heartbeat_interval <= 0:
            raise ConfigError("study.heartbeat_interval", heartbeat_interval, "a positive number of seconds")
        rdb.heartbeat_interval = int(heartbeat_interval)
        if grace_period is None:
            rdb.grace_period = 3 * int(heartbeat_interval)
    if grace_period is not None:
        if grace_period <= 0:
            raise ConfigError("study.grace_period", grace_period, "a positive number of seconds")
        rdb.grace_period = int(grace_period)
    if failed_trial_retries is not None:
        if failed_trial_retries < 0:
            raise ConfigError("study.failed_trial_retries", failed_trial_retries, "an integer >= 0")
        rdb.heartbeat_stale_trial_callback = _retry_callback(int(failed_trial_retries))
        rdb.failed_trial_callback = rdb.heartbeat_stale_trial_callback


def dispose_storage(storage: Any) -> None:
    """Close every connection ``storage`` holds (safe to call twice, on any storage)."""
    if isinstance(storage, ResilientStorage):
        storage.close()
        return
    rdb = storage if isinstance(storage, optuna.storages.RDBStorage) else getattr(storage, "_backend", None)
    if isinstance(rdb, optuna.storages.RDBStorage):
        try:
            rdb.remove_session()
        finally:
            rdb.engine.dispose()
