"""Every private Optuna name lora-tune relies on, in one place.

Optuna has no public accessor for these; each is used by Optuna's own code and tests the same
way. ``tests/storage/test_optuna_private.py`` exercises each one against the installed
Optuna, so an upgrade that renames or changes one fails there, loudly, instead of somewhere
in a worker.
"""
from __future__ import annotations

import sys
from typing import Any

import optuna

# System attributes GridSampler reads and writes on a trial (optuna/samplers/_grid.py), and
# the one ``Study.enqueue_trial`` writes.
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
    """Optuna's trial cache in front of an RDB storage, what ``optuna.create_study(storage=URL)``
    uses (``optuna.storages._CachedStorage``)."""
    return optuna.storages._CachedStorage(rdb)


def grid_index(sampler: optuna.samplers.GridSampler, params: dict[str, Any]) -> int | None:
    """The index GridSampler gives the grid point ``params`` (None if it is not a grid point),
    with the search space GridSampler records next to it (``_param_names``, ``_all_grids``)."""
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
    """Give ``target`` the grid of ``source``: its search space, its points in their shuffled
    order and its random state (``_search_space``, ``_all_grids``, ``_param_names``,
    ``_n_min_trials``, ``_rng``: what ``GridSampler.__init__`` sets)."""
    for name in ("_search_space", "_all_grids", "_param_names", "_n_min_trials", "_rng"):
        setattr(target, name, getattr(source, name))


def drop_import_tracebacks() -> int:
    """Forget the tracebacks of the optional imports Optuna could not make; returns how many.

    ``optuna._imports.try_import`` keeps the ``ImportError`` of a missing optional package
    (``boto3`` and ``google.api_core`` in ``optuna.artifacts``, ``redis`` in the journal
    storages) in its ``_DeferredImportExceptionContextManager._deferred``, to raise when the
    feature is used. With it Optuna keeps the error's traceback, whose first frame (the Optuna
    module's) leads through ``f_back`` to every frame that was on the stack when that module
    was first imported, with their locals, for the life of the process: a ``create_study`` that
    imported ``optuna.artifacts`` kept its task, and so a whole model, in every later trial's
    driver. The errors and their messages stay; only their tracebacks go. Call it after an
    import that may have reached such a module (it looks at every loaded Optuna module).
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


# -- the gRPC storage proxy. Optuna's server helper (``make_server``) only binds an insecure
# port and its client (``GrpcStorageProxy``) only opens an insecure channel; lora-tune builds
# the server from Optuna's servicer, and the client's channel itself, to add a token and TLS.

def add_storage_servicer(server: Any, storage: optuna.storages.BaseStorage) -> None:
    """Serve ``storage`` on the grpc ``server`` with Optuna's storage proxy servicer, as
    ``optuna.storages._grpc.server.make_server`` does (``OptunaStorageProxyService``,
    ``add_StorageServiceServicer_to_server``)."""
    from optuna.storages._grpc import servicer
    from optuna.storages._grpc.auto_generated import api_pb2_grpc

    api_pb2_grpc.add_StorageServiceServicer_to_server(servicer.OptunaStorageProxyService(storage), server)


class ChannelGrpcStorageProxy(optuna.storages.GrpcStorageProxy):
    """Optuna's gRPC client over the channel :meth:`open_channel` returns (a subclass's),
    instead of ``create_insecure_channel``. ``GrpcStorageProxy._setup`` opens the channel,
    the stub and the client cache (``_channel``, ``_stub``, ``_cache``) when the client is
    created and again when it is unpickled; ``_host``/``_port`` are the proxy's address."""

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
