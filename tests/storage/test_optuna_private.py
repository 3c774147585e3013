"""The private Optuna names lora-tune uses (``lora_tune/study/_optuna_private.py``), checked
against the installed Optuna: an upgrade that renames or changes one fails here, loudly."""
from __future__ import annotations

import ast
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import optuna
import pytest
from optuna.trial import TrialState

from lora_tune.study import _optuna_private as private
from lora_tune.study.run.samplers import OrderedGridSampler

REPO = Path(__file__).resolve().parents[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_study_and_trial_ids_and_storage():
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="ids")
    assert private.study_storage(study) is storage
    assert private.study_id(study) == storage.get_study_id_from_name("ids")
    assert private.frozen_study_id(storage.get_all_studies()[0]) == private.study_id(study)
    trial = study.ask()
    frozen = study.trials[0]
    assert private.trial_id(trial) == private.trial_id(frozen)
    assert storage.get_trial(private.trial_id(trial)).number == 0


def test_stop_requested_follows_study_stop():
    study = optuna.create_study()
    seen = []

    def objective(trial):
        seen.append(private.stop_requested(study))
        study.stop()
        seen.append(private.stop_requested(study))
        return 0.0

    study.optimize(objective, n_trials=3)
    assert seen == [False, True]  # the loop stopped after the first trial


def test_cached_rdb_is_what_optuna_uses_for_a_url(tmp_path):
    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'c.db'}")
    cached = private.cached_rdb(rdb)
    assert type(cached) is type(optuna.storages.get_storage(rdb))
    study_id = cached.create_new_study([optuna.study.StudyDirection.MINIMIZE], "c")
    assert rdb.get_study_name_from_id(study_id) == "c"
    rdb.engine.dispose()


def test_grid_sampler_records_and_reads_what_lora_tune_relies_on():
    space = {"x": [0.0, 1.0, 2.0], "y": [3, 4]}
    sampler = optuna.samplers.GridSampler(space, seed=0)
    assert private.grid_space(sampler) == {"x": [0.0, 1.0, 2.0], "y": [3, 4]}
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", 0, 2) + t.suggest_int("y", 3, 4), n_trials=6)
    ids = set()
    for trial in study.trials:
        assert trial.system_attrs[private.GRID_SPACE_KEY] == private.grid_space(sampler)
        index = trial.system_attrs[private.GRID_ID_KEY]
        assert private.grid_index(sampler, trial.params) == index
        ids.add(index)
    assert ids == set(range(6)) and private.grid_index(sampler, {"x": 9.0, "y": 3}) is None
    # an enqueued trial carries fixed_params, and GridSampler then assigns it no grid point itself
    study.enqueue_trial({"x": 1.0, "y": 3})
    trial = study.ask()
    frozen = study._storage.get_trial(trial._trial_id)
    assert private.FIXED_PARAMS_KEY in frozen.system_attrs and private.GRID_ID_KEY not in frozen.system_attrs
    assert frozen.state == TrialState.RUNNING


def test_grid_sampler_picks_by_trial_number_below_the_grid_size():
    """OrderedGridSampler relies on this: trial n < grid size gets grid point n, others wait."""
    sampler = optuna.samplers.GridSampler({"x": [1, 2, 3]}, seed=0)
    study = optuna.create_study(sampler=sampler)
    trials = [study.ask() for _ in range(3)]
    assert [study._storage.get_trial(t._trial_id).system_attrs["grid_id"] for t in trials] == [0, 1, 2]


def test_copied_grid_state_picks_what_the_original_would():
    """copy_grid_state copies all GridSampler.__init__ sets: the copy picks the same points, in
    the same order, past the grid size too (where GridSampler draws from its random state)."""
    space = {"x": [0.0, 1.0, 2.0], "y": [3, 4]}
    assert set(vars(optuna.samplers.GridSampler(space))) == {
        "_search_space", "_all_grids", "_param_names", "_n_min_trials", "_rng"}

    def points(sampler):
        study = optuna.create_study(sampler=sampler)
        study.enqueue_trial({"x": 9.0, "y": 9})  # off the grid: trial numbers run past the grid size
        study.optimize(lambda t: t.suggest_float("x", 0, 9) + t.suggest_int("y", 3, 9), n_trials=7)
        return [(t.params["x"], t.params["y"]) for t in study.trials]

    copy = OrderedGridSampler.__new__(OrderedGridSampler)
    private.copy_grid_state(optuna.samplers.GridSampler(space, seed=5), copy)
    copy.wait_limit = 1.0
    assert points(copy) == points(optuna.samplers.GridSampler(space, seed=5))
    assert points(OrderedGridSampler.like(optuna.samplers.GridSampler(space, seed=5))) == points(copy)


class _CountingClient(private.ChannelGrpcStorageProxy):
    """Opens plain channels and counts them: proves Optuna's client gets its channel from us."""

    opened: list[tuple[str, int]] = []

    def open_channel(self, host, port):
        _CountingClient.opened.append((host, port))
        return grpc.insecure_channel(f"{host}:{port}")


def test_grpc_proxy_server_and_client_from_optunas_parts():
    """Optuna's servicer on our own grpc server, Optuna's client on our own channel: the names
    (OptunaStorageProxyService, add_StorageServiceServicer_to_server, StorageServiceStub,
    GrpcClientCache) and GrpcStorageProxy's _setup/_channel/_stub/_cache/_host/_port."""
    backend = optuna.storages.InMemoryStorage()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    private.add_storage_servicer(server, backend)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            client = _CountingClient(host="127.0.0.1", port=port)
        assert _CountingClient.opened == [("127.0.0.1", port)]  # __init__ calls _setup
        client.wait_server_ready(timeout=10)
        assert len(_CountingClient.opened) == 2  # and so does our wait_server_ready
        study = optuna.create_study(storage=client, study_name="parts")
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        assert len(backend.get_all_trials(backend.get_study_id_from_name("parts"))) == 2
        again = pickle.loads(pickle.dumps(client))  # __setstate__ calls _setup: a new channel of ours
        assert len(_CountingClient.opened) == 3 and len(again.get_all_trials(private.study_id(study))) == 2
        for each in (client, again):
            each.close()
            with pytest.raises(ValueError):  # close() closed our channel
                each.get_all_studies()
    finally:
        server.stop(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        lonely = _CountingClient(host="127.0.0.1", port=port)
    with pytest.raises(ConnectionError):
        lonely.wait_server_ready(timeout=0.5)
    lonely.close()


def test_dropped_import_tracebacks_let_the_importing_frames_go():
    """try_import keeps a missing package's ImportError with the frames that imported it (and their
    locals); drop_import_tracebacks lets them go and keeps the error Optuna raises on use."""
    import gc
    import sys
    import types
    import weakref

    from optuna._imports import try_import

    module = types.ModuleType("optuna._lora_tune_test_optional")

    class Model:
        pass

    def importer() -> weakref.ref:
        model = Model()  # a local of the importing frame, as create_study's task was
        with try_import() as module._imports:
            import lora_tune_no_such_package  # noqa: F401
        return weakref.ref(model)

    sys.modules[module.__name__] = module
    try:
        held = importer()
        gc.collect()
        assert held() is not None  # Optuna's deferred error keeps the frame
        assert private.drop_import_tracebacks() >= 1
        gc.collect()
        assert held() is None
        with pytest.raises(ImportError, match="lora_tune_no_such_package"):
            module._imports.check()
    finally:
        del sys.modules[module.__name__]


def test_no_private_optuna_name_outside_the_private_module():
    """Our storage and worker code reaches Optuna's internals only through _optuna_private."""
    own = ["lora_tune/study/run/workers.py", "lora_tune/study/run/samplers.py", "lora_tune/cli/commands_worker.py",
           "lora_tune/cli/commands_proxy.py",
           *[str(p.relative_to(REPO)) for p in (REPO / "lora_tune/study/storage").glob("*.py")]]
    for path in own:
        tree = ast.parse((REPO / path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                assert node.attr in _OWN_PRIVATE, f"{path}:{node.lineno}: .{node.attr}"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optuna"):
                assert not any(part.startswith("_") for part in node.module.split(".")), f"{path}: {node.module}"


# lora-tune's own private attributes (not Optuna's) that these modules use
_OWN_PRIVATE = {"_forward", "_retry", "_retries", "_drop_connections", "_study_of", "_known", "_find_study",
                "_running", "_seen", "_lock", "_stop", "_thread", "_run", "_logger",
                "_pending", "_starting", "_already_started"}


# Optuna's private names lora-tune has used or might reach for
_OPTUNA_PRIVATE = {"_storage", "_study_id", "_trial_id", "_stop_flag", "_CachedStorage", "_all_grids",
                   "_param_names", "_search_space", "_n_min_trials", "_heartbeat", "_backend", "_cached_frozen_trial",
                   "_thread_local", "_get_stale_trial_ids", "_grpc", "_rdb", "_setup", "_channel", "_stub",
                   "_cache", "_host", "_port", "_imports", "_deferred", "_DeferredImportExceptionContextManager"}


def test_no_optuna_private_name_anywhere_else_in_lora_tune():
    for path in sorted((REPO / "lora_tune").rglob("*.py")):
        if path.name == "_optuna_private.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                assert node.attr not in _OPTUNA_PRIVATE, f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    if name.startswith("optuna"):
                        assert not any(p.startswith("_") for p in name.split(".")), f"{path.relative_to(REPO)}: {name}"
