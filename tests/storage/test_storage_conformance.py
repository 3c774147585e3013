"""Optuna's own storage test suite (``optuna.testing.pytest_storages.StorageTestCase``) on what
``open_storage`` returns, for an SQLite file, a journal file and PostgreSQL.

Other tools read and write lora-tune's studies (optuna-dashboard, plain Optuna processes, the
``optuna`` CLI), so the storage keeps Optuna's promises exactly: no test is overridden or
skipped. lora-tune's one deliberate difference - trials started in a study with a budget carry
lora-tune's start marks - applies only to budgeted studies, which this suite does not create;
it has its own tests in ``test_storage_budget.py`` (``test_started_trials_carry_marks_*``).
PostgreSQL runs whenever ``LORA_TUNE_TEST_POSTGRES_URL`` is set (CI sets it); each test gets an
empty database of its own.
"""
from __future__ import annotations

import pytest
from optuna.testing.pytest_storages import StorageTestCase

from lora_tune.study import storage as st

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture(params=["sqlite", "journal", "postgres"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'conformance.db'}"
    elif request.param == "journal":
        url = f"journal:{tmp_path / 'conformance.log'}"
    else:
        url = request.getfixturevalue("fresh_postgres")
    opened = st.open_storage(url)
    yield opened
    st.dispose_storage(opened)


class TestOpenStorage(StorageTestCase):
    """Every test of Optuna's suite, unchanged."""


def test_the_suite_is_all_there():
    tests = [name for name in dir(StorageTestCase) if name.startswith("test_")]
    assert len(tests) >= 46, tests  # a smaller suite would mean Optuna moved tests elsewhere
