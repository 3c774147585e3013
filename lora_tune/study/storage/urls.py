"""Storage URLs: ``sqlite:///FILE`` (one process), a database server's SQLAlchemy URL,
``journal:PATH`` or ``PATH.log`` (processes of one machine), ``grpc://HOST:PORT`` (a storage
proxy); their kinds, journal paths, gRPC addresses and password masking."""
from __future__ import annotations

import contextlib
import logging
import os
import re

from lora_tune.errors import ConfigError

ENV_STORAGE = "LORA_TUNE_STORAGE"
DEFAULT_STORAGE_URL = "sqlite:///lora_tune.db"
KINDS = ("sqlite", "memory", "journal", "rdb", "grpc")
_RDB_DIALECTS = ("postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")
_ALLOWED = ("sqlite:///FILE, postgresql+psycopg://USER@HOST/DB, mysql+pymysql://USER@HOST/DB, "
            "journal:PATH or grpc://HOST:PORT")

# scheme://user:password@host  ->  scheme://user:***@host, up to the LAST '@' before the host
# (a password may hold an unencoded '@' or '/'; where a query also holds an '@', more is
# masked, never less); key=value forms (libpq DSN, URL query) -> password=***
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.\-]*://[^:/@\s]*):(\S*)@(?=[^@\s/]*(?:[/?#\s]|$))")
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
    """Mask passwords in records of ``loggers`` (default: root, optuna, lora_tune). Idempotent."""
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
    path = url.removeprefix("journal:")
    path = path.removeprefix("//")  # journal:///abs/path -> /abs/path ; journal://rel -> rel
    if not path:
        raise ConfigError("storage", url, "journal:PATH with a file path")
    return path


def grpc_address(url: str) -> tuple[str, int]:
    """``(host, port)`` of a ``grpc://HOST:PORT`` URL (the address of ``lora-tune storage-proxy``)."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in host or "@" in host:
        raise ConfigError(
            "storage", mask_url(url), "grpc://HOST:PORT, e.g. grpc://127.0.0.1:13000",
            "A storage proxy URL needs its host and port: the --port given to "
            "`lora-tune storage-proxy --storage URL --port PORT`",
        )
    number = int(port)
    if not 0 < number < 65536:
        raise ConfigError("storage", mask_url(url), "grpc://HOST:PORT with a port from 1 to 65535")
    return host.strip("[]"), number


def storage_kind(url: str) -> str:
    """``"journal"``, ``"sqlite"``, ``"memory"`` (sqlite in memory), ``"rdb"`` (a database
    server) or ``"grpc"`` (a storage proxy). Raises ConfigError naming what is allowed."""
    if is_journal_url(url):
        return "journal"
    if "://" not in url:
        raise ConfigError("storage", mask_url(url), _ALLOWED, "A bare file name is not a storage URL; "
                          "for an SQLite file write sqlite:///FILE")
    scheme = url.split("://", 1)[0].lower()
    if scheme == "grpc":
        grpc_address(url)
        return "grpc"
    if scheme.startswith("sqlite"):
        rest = url.split("://", 1)[1]
        if rest not in ("", "/", "/:memory:"):
            folder = os.path.dirname(rest[1:]) if rest.startswith("/") else ""
            if folder and not os.path.isdir(folder):
                raise ConfigError("storage", mask_url(url), "an SQLite file in an existing directory",
                                  f"{folder} does not exist")
        return "memory" if rest in ("", "/", "/:memory:") else "sqlite"
    if scheme.split("+", 1)[0] not in _RDB_DIALECTS:
        raise ConfigError("storage", mask_url(url), _ALLOWED)
    return "rdb"


def storage_problem(url: str) -> str | None:
    """Why ``url`` is not a storage URL (the message of :func:`storage_kind`'s error), or None."""
    try:
        storage_kind(url)
    except ConfigError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def supports_processes(url: str) -> bool:
    """Whether several processes may safely share this storage (journal, database server, proxy)."""
    return storage_kind(url) in ("journal", "rdb", "grpc")


def reading_problem(url: str) -> str | None:
    """Why a read-only command must not open ``url`` (opening would create a missing file, or
    Optuna's tables in an SQLite file that has none), or None."""
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
