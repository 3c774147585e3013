"""Workers talking to a storage proxy: ``grpc://HOST:PORT`` (``lora-tune storage-proxy``).

Optuna's ``GrpcStorageProxy`` is the client of Optuna's gRPC storage proxy server
(``optuna.storages.run_grpc_proxy_server``). Many workers then share the proxy's few
database connections instead of opening their own. The proxy's storage is
:func:`lora_tune.study.storage.open_storage` of the database URL, so the exact budget is
enforced there, under the study lock. What crosses the wire is Optuna's storage API only;
an exception of the proxy's storage reaches the client as a gRPC error carrying its message,
which :class:`ProxyErrors` turns back into :class:`~.budget.BudgetReached` (the proxy refused
to start a trial) - transient errors are recognised by :mod:`.retry`.
"""
from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.storages import BaseStorage

from lora_tune.errors import StorageError
from lora_tune.study.storages.budget import BudgetReached
from lora_tune.study.storages.urls import grpc_address, mask_url
from lora_tune.study.storages.wrapper import StorageWrapper

DEFAULT_PROXY_PORT = 13000
INSTALL_HINT = "the grpc:// storage needs grpcio and protobuf: pip install 'lora-tune[grpc]'"


class ProxyErrors(StorageWrapper):
    """Turns the proxy's "trial budget reached" error back into :class:`BudgetReached`."""

    def create_new_trial(self, study_id: int, template_trial: Any = None) -> int:
        try:
            return self.inner.create_new_trial(study_id, template_trial)
        except Exception as exc:
            if type(exc).__module__.startswith("grpc") and callable(getattr(exc, "details", None)):
                refused = BudgetReached.parse(study_id, str(exc.details() or ""))
                if refused is not None:
                    raise refused from None
            raise


def open_proxy(url: str, wait_seconds: float) -> BaseStorage:
    """Optuna's gRPC client for ``url``, once the proxy answers (StorageError after
    ``wait_seconds`` without an answer, naming the URL and what to do)."""
    host, port = grpc_address(url)
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise StorageError(f"cannot open storage {mask_url(url)}: {INSTALL_HINT}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=wait_seconds)
    except ConnectionError:
        proxy.close()
        raise StorageError(
            f"cannot reach the storage proxy {mask_url(url)} (no answer within {wait_seconds:.0f} s). "
            f"Start it with `lora-tune storage-proxy --storage DATABASE_URL --host 0.0.0.0 --port {port}`, "
            "or check the host and port (and that no firewall is in between)"
        ) from None
    return ProxyErrors(proxy)
