"""Every private Optuna name lora-tune relies on, in one place; ``tests/storage/test_optuna_private.py``
exercises each against the installed Optuna, so an upgrade that changes one fails there."""
from __future__ import annotations

import sys
from typing import Any

import optuna

# trial system attributes of GridSampler, and the one ``Study.enqueue_trial`` writes
GRID_ID_KEY = "grid_id"
GRID_SPACE_KEY = "search_space"
FIXED_PARAMS_KEY = "fixed_params"


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes (``Study._storage``)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage's id of the study (``Study._study_id``)."""
    return study._study_id


def frozen_study_id(study: Any) -> int:
    """The id of a ``FrozenStudy`` from ``get_all_studies`` (``FrozenStudy._study_id``)."""
    return study._study_id


def trial_id(trial: Any) -> int:
    """The storage's id of a ``Trial`` or ``FrozenTrial`` (``_trial_id``)."""
    return trial._trial_id


def stop_requested(study: optuna.Study) -> bool:
    """Whether ``study.stop()`` was called in the current optimize loop (``Study._stop_flag``)."""
    return bool(study._stop_flag)


def cached_rdb(rdb: optuna.storages.RDBStorage) -> optuna.storages.BaseStorage:
    """Optuna's trial cache in front of an RDB storage, as ``optuna.create_study(storage=URL)`` has."""
    return optuna.storages._CachedStorage(rdb)


def grid_index(sampler: optuna.samplers.GridSampler, params: dict[str, Any]) -> int | None:
    """The index GridSampler gives the grid point ``params`` (None if it is not a grid point)."""
    names = sampler._param_names
    if set(params) != set(names):
        return None
    for index, point in enumerate(sampler._all_grids):
        if all(params[n] == v for n, v in zip(names, point)):
            return index
    return None


def grid_space(sampler: optuna.samplers.GridSampler) -> dict[str, list[Any]]:
    """The search space as GridSampler records it on trials (``_search_space``)."""
    return sampler._search_space


def copy_grid_state(source: optuna.samplers.GridSampler, target: optuna.samplers.GridSampler) -> None:
    """Give ``target`` the grid of ``source`` (what ``GridSampler.__init__`` sets)."""
    for name in ("_search_space", "_all_grids", "_param_names", "_n_min_trials", "_rng"):
        setattr(target, name, getattr(source, name))


def drop_import_tracebacks() -> int:
    """Forget the tracebacks of the optional imports Optuna could not make; returns how many.

    ``try_import`` keeps a missing package's ``ImportError`` (boto3 in ``optuna.artifacts``, redis
    in the journal storages), whose traceback leads through ``f_back`` to every frame on the stack
    at that first import: a ``create_study`` kept its task, and a whole model, for good. The
    errors stay; only their tracebacks go.
    """
    from optuna import _imports

    deferred_type = getattr(_imports, "_DeferredImportExceptionContextManager", None)
    if deferred_type is None:  # pragma: no cover - an Optuna without it keeps no tracebacks this way
        return 0
    dropped = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "optuna" or name.startswith("optuna.")):
            continue
        for value in list(getattr(module, "__dict__", {}).values()):
            deferred = getattr(value, "_deferred", None) if isinstance(value, deferred_type) else None
            if deferred:
                dropped += _drop_tracebacks(deferred[0])
    return dropped


def _drop_tracebacks(error: BaseException) -> int:
    """Drop the traceback of ``error`` and of the errors it was raised from or during."""
    dropped, seen, todo = 0, set(), [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            exc.__traceback__ = None
            dropped += 1
        todo += [exc.__cause__, exc.__context__]
    return dropped


# -- the gRPC storage proxy: server and client channel built here, to add a token and TLS

def add_storage_servicer(server: Any, storage: optuna.storages.BaseStorage) -> None:
    """Serve ``storage`` on the grpc ``server`` with Optuna's servicer, as its ``make_server`` does."""
    from optuna.storages._grpc import servicer
    from optuna.storages._grpc.auto_generated import api_pb2_grpc

    api_pb2_grpc.add_StorageServiceServicer_to_server(servicer.OptunaStorageProxyService(storage), server)


class ChannelGrpcStorageProxy(optuna.storages.GrpcStorageProxy):
    """Optuna's gRPC client over the channel a subclass's :meth:`open_channel` returns (``_setup``
    runs when the client is created and again when it is unpickled)."""

    def open_channel(self, host: str, port: int) -> Any:
        raise NotImplementedError

    def _setup(self) -> None:
        from optuna.storages._grpc.auto_generated import api_pb2_grpc
        from optuna.storages._grpc.client import GrpcClientCache

        self._channel = self.open_channel(self._host, self._port)
        self._stub = api_pb2_grpc.StorageServiceStub(self._channel)
        self._cache = GrpcClientCache(self._stub)

    def wait_server_ready(self, timeout: float | None = None) -> None:
        """Wait until the proxy answers on this client's kind of channel (ConnectionError if not)."""
        import grpc

        channel = self.open_channel(self._host, self._port)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as exc:
            raise ConnectionError("GRPC connection timeout") from exc
        finally:
            channel.close()
