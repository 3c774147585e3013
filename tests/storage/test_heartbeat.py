"""Why lora-tune keeps its own heartbeat on databases too (lora_tune/study/storage/heartbeat.py): the
Optuna behaviour that reasoning rests on. If one of these fails after an Optuna upgrade, passing
``study.heartbeat_interval`` through to ``RDBStorage`` may have become possible: look again."""
from __future__ import annotations

import time
import warnings

import optuna
from optuna.trial import TrialState
from workerlib import make_study

from lora_tune.study.storage import opening as st
from lora_tune.study.run.workers import run_worker

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_optunas_rdb_heartbeat_never_fails_a_trial_that_has_not_beaten_yet(tmp_path):
    """A trial whose worker died between starting it and running the objective stays RUNNING
    under Optuna's heartbeat (it holds a budget slot forever); lora-tune's fails and retries it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeat_interval is experimental; ask() outside optimize
        rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1,
                                         grace_period=1)
        optunas = optuna.create_study(storage=rdb)
        never_beat, beat_once = optunas.ask(), optunas.ask()
        rdb.record_heartbeat(beat_once._trial_id)
        time.sleep(2.2)  # past the grace period (SQLite's clock has whole seconds)
        optuna.storages.fail_stale_trials(optunas)
    states = {t.number: t.state for t in optunas.trials}
    assert states == {never_beat.number: TrialState.RUNNING, beat_once.number: TrialState.FAIL}
    rdb.engine.dispose()

    url = f"sqlite:///{tmp_path / 'lora-tune.db'}"
    ours = make_study(url, "ours", 2, heartbeat_interval=1, grace_period=1, failed_trial_retries=1)
    abandoned = ours.ask()  # started (and marked) by the budget layer; its worker never ran it
    run_worker(ours, lambda t: t.suggest_float("x", 0, 1), poll_interval=0.2)
    states = {t.number: t.state for t in ours.get_trials()}
    assert states[abandoned.number] == TrialState.FAIL and list(states.values()).count(TrialState.COMPLETE) == 2
    st.dispose_storage(ours._storage)


def test_only_rdb_storages_have_optunas_heartbeat():
    """Workers behind a storage proxy (or on a journal file) cannot write Optuna's heartbeat: one
    study served both directly and through a proxy needs the one heartbeat every storage carries."""
    from optuna.storages._heartbeat import BaseHeartbeat

    assert issubclass(optuna.storages.RDBStorage, BaseHeartbeat)
    assert not issubclass(optuna.storages.GrpcStorageProxy, BaseHeartbeat)
    assert not issubclass(optuna.storages.JournalStorage, BaseHeartbeat)
