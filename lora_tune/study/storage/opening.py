"""``open_storage``: Optuna's storage for a URL with one layer per concern on top (the table in
docs/architecture.md, "Storage layer"); a ``grpc://`` storage has no budget layer of its own
(the proxy's storage has one)."""
from __future__ import annotations

import os
import warnings
from typing import Any

import optuna
from optuna.storages import BaseStorage

from lora_tune.errors import ConfigError, StorageError
from lora_tune.study import _optuna_private as private
from lora_tune.study.storage.budget import BudgetedStorage
from lora_tune.study.storage.locks import StudyLocks
from lora_tune.study.storage.marks import worker_id
from lora_tune.study.storage.masking import MaskingStorage
from lora_tune.study.storage.retry import RetryingStorage
from lora_tune.study.storage.urls import (
    DEFAULT_STORAGE_URL,
    ENV_STORAGE,
    MaskingFilter,
    install_log_masking,
    is_journal_url,
    journal_path,
    mask_secrets,
    mask_url,
    reading_problem,
    resolve_storage_url,
    storage_kind,
    storage_problem,
    supports_processes,
)
from lora_tune.study.storage.wrapper import StorageWrapper

POOL_SIZE = 2  # connections kept per worker process (trials + heartbeat thread)
MAX_OVERFLOW = 3  # extra connections a worker may open under load (the budget lock, reports)
_DEFAULT = object()

__all__ = [
    "DEFAULT_STORAGE_URL", "ENV_STORAGE", "MaskingFilter", "OpenedStorage", "close_study",
    "dispose_storage", "install_log_masking", "is_journal_url", "journal_path", "mask_secrets",
    "mask_url", "open_storage", "reading_problem", "resolve_storage_url", "storage_kind",
    "storage_problem", "supports_processes",
]


class OpenedStorage(StorageWrapper):
    """What :func:`open_storage` returns: the layers above, its URL and :meth:`close`."""

    def __init__(self, inner: BaseStorage, *, url: str, rdb: Any = None):
        super().__init__(inner)
        self.url = url
        self.kind = storage_kind(url)
        self.rdb = rdb  # the RDBStorage of SQLite/database URLs (its engine), else None

    @property
    def retries(self) -> int:
        """Transient errors this storage survived (for reports and tests)."""
        layer = self.layer(RetryingStorage)
        return layer.retries if layer is not None else 0

    def marks_trials_as(self, worker: str) -> bool:
        """Whether this storage marks the trials it starts in budgeted studies as ``worker``'s."""
        layer = self.layer(BudgetedStorage)
        return layer is not None and layer.worker == worker

    def close(self) -> None:
        """Close this process's connections. Database connections reopen on demand; a storage
        proxy's channel does not (open the storage again)."""
        if self.rdb is not None:
            self.rdb.remove_session()
            self.rdb.engine.dispose()
        bottom = self.innermost()
        if isinstance(bottom, optuna.storages.GrpcStorageProxy):
            bottom.close()  # the gRPC channel: this one is not reopened

    def __repr__(self) -> str:
        return f"OpenedStorage({mask_url(self.url)!r})"


def open_storage(
    url: str,
    *,
    retry_seconds: float = 120.0,
    worker: Any = _DEFAULT,
    pool_size: int = POOL_SIZE,
    max_overflow: int = MAX_OVERFLOW,
    proxy_wait_seconds: float = 10.0,
) -> OpenedStorage:
    """Open the storage at ``url`` ready for many workers.

    ``worker`` is recorded on the trials it starts in budgeted studies (default: this process;
    None in a storage proxy). A ``grpc://`` proxy must answer within ``proxy_wait_seconds``.
    """
    kind = storage_kind(url)
    worker = worker_id() if worker is _DEFAULT else worker
    try:
        rdb = None
        if kind == "grpc":
            from lora_tune.study.storage.proxy_client import open_proxy

            layers: BaseStorage = open_proxy(url, proxy_wait_seconds)
        elif kind == "journal":
            layers = BudgetedStorage(_open_journal(journal_path(url)), StudyLocks(url), worker)
        else:
            rdb = _open_rdb(url, kind, pool_size, max_overflow)
            layers = BudgetedStorage(private.cached_rdb(rdb), StudyLocks(url, rdb), worker)
        layers = MaskingStorage(RetryingStorage(layers, url=url, retry_seconds=retry_seconds))
        return OpenedStorage(layers, url=url, rdb=rdb)
    except (ConfigError, StorageError):
        raise
    except Exception as exc:  # noqa: BLE001 - driver missing, server down, bad credentials...
        raise StorageError(f"cannot open storage {mask_url(url)}: {mask_secrets(str(exc))}") from None


def _open_rdb(url: str, kind: str, pool_size: int, max_overflow: int) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        rdb = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url, kind, pool_size, max_overflow))
    if kind == "sqlite":
        _sqlite_wal(rdb.engine)
    return rdb


def _engine_kwargs(url: str, kind: str, pool_size: int, max_overflow: int) -> dict[str, Any]:
    if kind in ("sqlite", "memory"):
        # a writer holding the lock makes others wait instead of failing at once
        return {"connect_args": {"timeout": 60}}
    kwargs: dict[str, Any] = {
        "pool_pre_ping": True,  # a connection killed by a server restart is replaced, not used
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": 60,
        "pool_recycle": 1800,
    }
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10, "application_name": "lora-tune"}
    return kwargs


def _sqlite_wal(engine: Any) -> None:
    """WAL mode: readers (a dashboard) do not block the writer and a commit syncs once
    (synchronous=NORMAL: a power cut may lose the last commits, never corrupt the file)."""
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


def dispose_storage(storage: Any) -> None:
    """Close every connection ``storage`` holds (safe to call twice, on any storage)."""
    if isinstance(storage, OpenedStorage):
        storage.close()
    elif isinstance(storage, optuna.storages.RDBStorage):
        storage.remove_session()
        storage.engine.dispose()


def close_study(study: optuna.Study) -> None:
    """Close the connections of the storage ``study`` was loaded from."""
    dispose_storage(private.study_storage(study))
