"""Trials read back through lora-tune's storage equal what plain Optuna reads from the same tables;
plain Optuna processes and lora-tune workers share a study; SQLite in WAL mode; connections closed."""
from __future__ import annotations

import math

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from lora_tune.study.storage import opening as st

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")

FIELDS = ("number", "state", "values", "params", "distributions", "user_attrs", "system_attrs")


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fast.db'}"
    return request.getfixturevalue("postgres_url")


def _objective(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", 1e-3, 1.0, log=True)
    kind = trial.suggest_categorical("kind", ["a", None, 3])
    n = trial.suggest_int("n", 2, 64, step=2)
    trial.set_user_attr("info", {"kind": kind, "list": [1, 2.5]})
    trial.set_user_attr("info", {"kind": kind, "overwritten": True})
    if n > 60:
        raise RuntimeError("a failed trial")
    return x * n, float("inf") if kind == "a" else -float("inf")


def _same(ours: list, plain: list) -> None:
    assert len(ours) == len(plain)
    for a, b in zip(ours, plain):
        for field in FIELDS:
            assert getattr(a, field) == getattr(b, field), field
        assert a.datetime_start == b.datetime_start and a.datetime_complete == b.datetime_complete
        assert a.intermediate_values.keys() == b.intermediate_values.keys()
        for step, value in a.intermediate_values.items():
            other = b.intermediate_values[step]
            assert (math.isnan(value) and math.isnan(other)) or value == other


def test_multi_objective_trials_read_back_identically(url):
    storage = st.open_storage(url)
    study = optuna.create_study(study_name="multi", storage=storage, directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(_objective, n_trials=12, catch=(RuntimeError,))
    plain = optuna.load_study(study_name="multi", storage=optuna.storages.RDBStorage(url))
    _same(study.get_trials(), plain.get_trials())
    # and through a second lora-tune storage, not the writer's cache
    second = st.open_storage(url)
    _same(optuna.load_study(study_name="multi", storage=second).get_trials(), plain.get_trials())
    assert {t.state for t in plain.get_trials()} <= {TrialState.COMPLETE, TrialState.FAIL}
    st.dispose_storage(storage)
    st.dispose_storage(second)


def test_reports_and_pruning_read_back_identically(url):
    storage = st.open_storage(url)
    study = optuna.create_study(study_name="steps", storage=storage, pruner=optuna.pruners.MedianPruner(
        n_startup_trials=2, n_warmup_steps=0), sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        for step, value in enumerate([x, float("nan"), float("inf"), x + 1]):
            trial.report(value, step)
            if step == 3 and trial.should_prune():
                raise optuna.TrialPruned()
        return x

    study.optimize(objective, n_trials=10)
    plain = optuna.load_study(study_name="steps", storage=optuna.storages.RDBStorage(url))
    _same(study.get_trials(), plain.get_trials())
    assert plain.get_trials()[0].intermediate_values[2] == float("inf")
    st.dispose_storage(storage)


def test_finished_trials_refuse_updates_like_optuna(url):
    storage = st.open_storage(url)
    study = optuna.create_study(study_name="done", storage=storage)
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, 1.0)
    tid = trial._trial_id
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    for write in (lambda: storage.set_trial_intermediate_value(tid, 0, 1.0),
                  lambda: storage.set_trial_param(tid, "y", 0.5, dist),
                  lambda: storage.set_trial_user_attr(tid, "k", 1),
                  lambda: storage.set_trial_system_attr(tid, "k", 1)):
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            write()
    with pytest.raises(ValueError):  # a different distribution for a known parameter name
        running = study.ask()
        running.suggest_int("x", 0, 5)
    st.dispose_storage(storage)


def test_plain_optuna_and_lora_tune_workers_share_a_study(url):
    ours = st.open_storage(url)
    study = optuna.create_study(study_name="mixed", storage=ours)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    plain = optuna.load_study(study_name="mixed", storage=url)
    plain.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    numbers = [t.number for t in optuna.load_study(study_name="mixed", storage=url).get_trials()]
    assert numbers == list(range(9))
    st.dispose_storage(ours)


def test_sqlite_is_in_wal_mode(tmp_path):
    path = tmp_path / "wal.db"
    storage = st.open_storage(f"sqlite:///{path}")
    optuna.create_study(storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    st.dispose_storage(storage)
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_dispose_closes_every_connection(postgres_url):
    database = sa.engine.make_url(postgres_url).database

    def open_connections() -> int:
        engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            count = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :d AND application_name = 'lora-tune'"
            ), {"d": database}).scalar_one()
        engine.dispose()
        return count

    before = open_connections()  # other tests' storages may still be open
    storage = st.open_storage(postgres_url)
    study = optuna.create_study(study_name="closing", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert open_connections() > before
    st.dispose_storage(storage)
    assert open_connections() == before
