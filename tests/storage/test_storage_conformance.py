"""Optuna's own storage test suite (``optuna.testing.pytest_storages.StorageTestCase``) on what
``open_storage`` returns, for an SQLite file, a journal file and PostgreSQL.

Other tools read and write lora-tune's studies (optuna-dashboard, plain Optuna processes, the
``optuna`` CLI), so the storage keeps Optuna's promises exactly: no test is overridden or
skipped. lora-tune's one deliberate difference - trials started in a study with a budget carry
lora-tune's start marks - applies only to budgeted studies, which this suite does not create;
it has its own tests in ``test_storage_budget.py`` (``test_started_trials_carry_marks_*``).
PostgreSQL runs whenever ``LORA_TUNE_TEST_POSTGRES_URL`` is set (CI sets it); each test gets an
empty database of its own. The suite also runs through an authenticated storage proxy (a real
gRPC server on 127.0.0.1 requiring a token, with TLS for SQLite behind it), client and server
being what ``lora-tune worker --storage grpc://...`` and ``lora-tune storage-proxy`` use; there,
one test may fail through no fault of lora-tune's and is marked so: the order of a trial's params,
which Optuna's proxy protocol carries as a protobuf map.
"""
from __future__ import annotations

import contextlib

import proxylib
import pytest
from optuna.testing.pytest_storages import StorageTestCase

from lora_tune.study.storage import opening as st
from lora_tune.study.storage.proxy_client import ENV_PROXY_CA, ENV_PROXY_TOKEN

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    return proxylib.self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=["sqlite", "journal", "postgres", "proxy-tls-sqlite", "proxy-postgres"])
def storage(request, tmp_path, monkeypatch):
    if request.param.endswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'conformance.db'}"
    elif request.param == "journal":
        url = f"journal:{tmp_path / 'conformance.log'}"
    else:
        url = request.getfixturevalue("fresh_postgres")
    with contextlib.ExitStack() as stack:
        if request.param.startswith("proxy"):
            if request.node.originalname == "test_get_all_trials_params_order":
                # Optuna's proxy protocol carries a trial's params as a protobuf map, which keeps
                # no order: plain Optuna's proxy loses it the same way (not lora-tune's layers)
                request.applymarker(pytest.mark.xfail(reason="Optuna's gRPC proxy sends params as a map",
                                                      strict=False))
            tls = request.getfixturevalue("tls_pair") if "tls" in request.param else None
            url = stack.enter_context(proxylib.serving(url, proxylib.access(tls=tls)))
            monkeypatch.setenv(ENV_PROXY_TOKEN, proxylib.TOKEN)
            if tls:
                monkeypatch.setenv(ENV_PROXY_CA, str(tls[0]))
            else:
                monkeypatch.delenv(ENV_PROXY_CA, raising=False)
        opened = st.open_storage(url)
        yield opened
        st.dispose_storage(opened)


class TestOpenStorage(StorageTestCase):
    """Every test of Optuna's suite, unchanged."""


def test_the_suite_is_all_there():
    tests = [name for name in dir(StorageTestCase) if name.startswith("test_")]
    assert len(tests) >= 46, tests  # a smaller suite would mean Optuna moved tests elsewhere
