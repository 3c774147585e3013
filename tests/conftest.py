"""Shared fixtures.

``postgres_url``: a fresh PostgreSQL database for this test session, created from the URL in
``LORA_TUNE_TEST_POSTGRES_URL`` (e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
and dropped at the end (``fresh_postgres``: one for a single test). Without that variable,
tests using it are skipped with a message saying how to enable them; with it set, an
unreachable server is an error, not a skip.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_ENV = "LORA_TUNE_TEST_POSTGRES_URL"


@contextlib.contextmanager
def _database(base: str, prefix: str) -> Iterator[str]:
    """A new, empty database on the server of ``base`` (its URL), dropped afterwards."""
    import sqlalchemy as sa

    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.fail(f"{POSTGRES_ENV} is set but the server cannot be used: {exc.orig}")
    try:
        yield sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of an empty database, created for this session and dropped after it."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(
            f"PostgreSQL tests need a server: set {POSTGRES_ENV}="
            "postgresql+psycopg://USER@HOST:5432/DB (a user allowed to CREATE DATABASE)"
        )
    with _database(base, "lora_tune_test") as url:
        yield url


@pytest.fixture
def fresh_postgres(postgres_url: str) -> Iterator[str]:
    """URL of an empty database of its own for one test (e.g. for counting its connections)."""
    with _database(postgres_url, "lora_tune_fresh") as url:
        yield url


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train fastest on one intra-op thread (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli_dir(tmp_path, monkeypatch) -> Path:
    """A scratch working directory for command-line runs: no ``LORA_TUNE_STORAGE`` from the
    environment, the repository importable (studies name factories under ``tests``)."""
    monkeypatch.delenv("LORA_TUNE_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    return tmp_path
