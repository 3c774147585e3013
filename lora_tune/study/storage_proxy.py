"""``lora-tune storage-proxy``: Optuna's gRPC storage proxy in front of a database.

Workers started with ``--storage grpc://HOST:PORT`` send every storage call to this process,
which serves them with :func:`~lora_tune.study.storage.open_storage` of the database URL
(``optuna.storages.run_grpc_proxy_server``). The database sees this process's pool of at
most ``max_connections`` connections however many workers run, and the exact budget, the
study lock and password masking happen here, in one place. Only Optuna's storage API
crosses the wire: plain Optuna processes may use the same proxy.
"""
from __future__ import annotations

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

import optuna

from lora_tune.errors import ConfigError
from lora_tune.study.storage import dispose_storage, mask_url, open_storage, storage_kind

_logger = logging.getLogger("lora_tune.storage")
DEFAULT_PORT = 13000


def check_proxy_settings(url: str, port: int, threads: int, max_connections: int) -> None:
    """Refuse what the proxy cannot serve, before opening anything (ConfigError, exit 2)."""
    kind = storage_kind(url)
    if kind not in ("rdb", "sqlite"):
        raise ConfigError(
            "--storage", mask_url(url), "a database URL: postgresql+psycopg://USER@HOST/DB, "
            "mysql+pymysql://USER@HOST/DB or sqlite:///FILE",
            "Optuna's storage proxy serves database storages (not journal files, memory or another proxy)",
        )
    if not 0 < port < 65536:
        raise ConfigError("--port", port, "a TCP port from 1 to 65535")
    if threads < 1:
        raise ConfigError("--threads", threads, "an integer >= 1")
    if max_connections < 2:
        raise ConfigError("--max-connections", max_connections,
                          "an integer >= 2 (starting a trial holds the study lock on one connection "
                          "and writes on another)")


def serve(url: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int = 16,
          max_connections: int = 8, retry_seconds: float = 10.0) -> None:
    """Serve the storage at ``url`` on ``host:port`` until interrupted.

    ``threads`` calls are served at once; they share at most ``max_connections`` database
    connections. A database outage is retried for ``retry_seconds`` per call; after that the
    worker gets an error it recognises as transient and retries itself, with backoff.
    """
    check_proxy_settings(url, port, threads, max_connections)
    storage = open_storage(url, worker=None, pool_size=max_connections, max_overflow=0,
                           retry_seconds=retry_seconds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.run_grpc_proxy_server(
                storage, host=host, port=port, thread_pool=ThreadPoolExecutor(max_workers=threads))
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        if "bind" in str(exc).lower():
            raise ConfigError("--port", port, "a free port on this host",
                              f"{host}:{port} is in use or cannot be bound ({exc})") from None
        raise
    finally:
        dispose_storage(storage)
