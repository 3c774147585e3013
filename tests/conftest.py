"""Shared fixtures.

``postgres_url``: a fresh PostgreSQL database for this test session, created from the URL in
``LORA_TUNE_TEST_POSTGRES_URL`` (e.g. ``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
and dropped at the end. Without that variable, tests using it are skipped with a message
saying how to enable them; with it set, an unreachable server is an error, not a skip.
"""
from __future__ import annotations

import os
import uuid

import pytest

POSTGRES_ENV = "LORA_TUNE_TEST_POSTGRES_URL"


def _admin_engine(url: str):
    import sqlalchemy as sa

    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of an empty database, created for this session and dropped after it."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(
            f"PostgreSQL tests need a server: set {POSTGRES_ENV}="
            "postgresql+psycopg://USER@HOST:5432/DB (a user allowed to CREATE DATABASE)"
        )
    import sqlalchemy as sa

    name = f"lora_tune_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = _admin_engine(base)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"{POSTGRES_ENV} is set but the server cannot be used: {exc.orig}")
    url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train fastest on one intra-op thread (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
