"""``lora-tune storage-proxy``: Optuna's gRPC storage servicer over ``open_storage`` of a database,
so that many workers share one pool of connections, and the budget and masking happen here.

Whoever can call the proxy can rewrite every study, including the study files workers run: off
loopback it needs a token (``--token-file``; clients send ``authorization: Bearer TOKEN``) or
``--insecure``; TLS with ``--tls-cert``/``--tls-key``. Optuna's own server helper has neither.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lora_tune.errors import ConfigError
from lora_tune.study import _optuna_private as private
from lora_tune.study.storage.opening import dispose_storage, mask_url, open_storage, storage_kind
from lora_tune.study.storage.proxy_client import (
    ENV_PROXY_CA,
    ENV_PROXY_TOKEN,
    TOKEN_METADATA,
    grpc_target,
    read_certificate,
    read_private_file,
    read_token_file,
)

_logger = logging.getLogger("lora_tune.storage")
DEFAULT_PORT = 13000
LOOPBACK = "127.0.0.1, ::1 or localhost (this machine only)"


def check_proxy_settings(url: str, port: int, threads: int, max_connections: int) -> None:
    """Refuse what the proxy cannot serve, before opening anything (ConfigError, exit 2)."""
    kind = storage_kind(url)
    if kind not in ("rdb", "sqlite"):
        raise ConfigError(
            "--storage", mask_url(url), "a database URL: postgresql+psycopg://USER@HOST/DB, "
            "mysql+pymysql://USER@HOST/DB or sqlite:///FILE",
            "Optuna's storage proxy serves database storages (not journal files, memory or another proxy)",
        )
    if not 0 < port < 65536:
        raise ConfigError("--port", port, "a TCP port from 1 to 65535")
    if threads < 1:
        raise ConfigError("--threads", threads, "an integer >= 1")
    if max_connections < 2:
        raise ConfigError("--max-connections", max_connections,
                          "an integer >= 2 (starting a trial holds the study lock on one connection "
                          "and writes on another)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


@dataclass(frozen=True)
class ProxyAccess:
    """Who may call the proxy: holders of ``token`` (None: anyone), over TLS when ``tls_cert``/``tls_key``
    are set; ``insecure``: consent to serve a non-loopback address without a token."""

    token: str | None = field(default=None, repr=False)
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)
    insecure: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def proxy_access(host: str, *, token_file: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, insecure: bool = False) -> ProxyAccess:
    """Read and check ``--token-file`` and ``--tls-cert``/``--tls-key`` for a proxy on ``host``."""
    if (tls_cert is None) != (tls_key is None):
        given, missing = ("--tls-cert", "--tls-key") if tls_key is None else ("--tls-key", "--tls-cert")
        raise ConfigError(missing, None, f"a PEM file, given with {given}",
                          "TLS needs the certificate (--tls-cert) and its private key (--tls-key)")
    token = read_token_file(token_file, "--token-file") if token_file is not None else None
    cert = key = None
    if tls_cert is not None and tls_key is not None:
        cert = read_certificate(tls_cert, "--tls-cert", "a readable PEM certificate file")
        key = read_private_file(tls_key, "--tls-key")
        if b"PRIVATE KEY-----" not in key:
            raise ConfigError("--tls-key", tls_key, "a PEM private key file (-----BEGIN PRIVATE KEY-----)")
    access = ProxyAccess(token=token, tls_cert=cert, tls_key=key, insecure=insecure)
    check_access(host, access)
    return access


def check_access(host: str, access: ProxyAccess) -> None:
    """Refuse a non-loopback ``host`` without a token unless ``--insecure`` (ConfigError, exit 2)."""
    if is_loopback(host) or access.token is not None or access.insecure:
        return
    raise ConfigError(
        "--host", host,
        f"{LOOPBACK}; any other address needs --token-file FILE (a shared secret that clients send "
        f"from ${ENV_PROXY_TOKEN}), best with --tls-cert/--tls-key, or --insecure to serve it to anyone",
        "Whoever can call the proxy can read, delete and rewrite every study, including the study "
        "files that workers run",
    )


def access_warnings(host: str, port: int, access: ProxyAccess) -> list[str]:
    """What the operator should know about the proxy's exposure (printed at start)."""
    if is_loopback(host):
        return []
    where = f"{grpc_target(host, port)}"
    if access.token is None:
        return [f"WARNING: --insecure: the storage proxy on {where} accepts every call from anyone who can "
                "reach it, without a token: they can read, delete and rewrite every study, including the "
                "study files that workers run. Use --token-file FILE (and --tls-cert/--tls-key) instead."]
    if not access.tls:
        return [f"note: the token and the storage calls to {where} cross the network unencrypted; on a "
                f"network you do not trust add --tls-cert/--tls-key (clients: ${ENV_PROXY_CA})."]
    return []


def _token_check(token: str) -> Any:
    """A grpc interceptor refusing (UNAUTHENTICATED) calls without ``authorization: Bearer TOKEN``."""
    import grpc

    expected = f"Bearer {token}".encode()
    logged: set[tuple[str, str]] = set()
    lock = threading.Lock()

    def refusal(reason: str) -> Any:
        message = (f"this storage proxy needs a token: {reason} (lora-tune clients send "
                   f"${ENV_PROXY_TOKEN}; others the metadata '{TOKEN_METADATA}: Bearer TOKEN')")

        def refuse(request: Any, context: Any) -> Any:
            peer = context.peer().rpartition(":")[0] or context.peer()
            with lock:
                first = (peer, reason) not in logged and len(logged) < 1000
                logged.add((peer, reason))
            if first:  # once per client address and reason: a fleet of misconfigured workers is one line each
                _logger.warning("refused a call from %s: %s", peer, reason)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return refuse

    class TokenCheck(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            sent = next((value for key, value in details.invocation_metadata or () if key == TOKEN_METADATA), None)
            if isinstance(sent, str):
                sent = sent.encode("utf-8", "replace")
            if sent is not None and hmac.compare_digest(sent, expected):
                return continuation(details)
            handler = continuation(details)
            if handler is None:
                return None
            refuse = refusal("no token was sent" if sent is None else "wrong token")
            if handler.request_streaming and handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(refuse)
            if handler.request_streaming:
                return grpc.stream_unary_rpc_method_handler(refuse)
            if handler.response_streaming:
                return grpc.unary_stream_rpc_method_handler(refuse)
            return grpc.unary_unary_rpc_method_handler(refuse)

    return TokenCheck()


def make_server(storage: Any, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int = 16,
                access: ProxyAccess | None = None) -> tuple[Any, int]:
    """A grpc server (not started) serving ``storage`` on ``host:port``, and the port it bound
    (``port`` 0: a free one)."""
    import grpc

    access = access or ProxyAccess()
    check_access(host, access)
    interceptors = [_token_check(access.token)] if access.token is not None else []
    server = grpc.server(ThreadPoolExecutor(max_workers=threads), interceptors=interceptors)
    private.add_storage_servicer(server, storage)
    address = grpc_target(host, port)
    try:
        if access.tls:
            credentials = grpc.ssl_server_credentials([(access.tls_key, access.tls_cert)])
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        raise ConfigError("--port", port, "a free port on this host",
                          f"{address} is in use or cannot be bound ({exc})") from None
    if not bound:
        raise ConfigError("--port", port, "a free port on this host", f"{address} cannot be bound")
    return server, bound


def serve(url: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int = 16,
          max_connections: int = 8, retry_seconds: float = 10.0, access: ProxyAccess | None = None) -> None:
    """Serve the storage at ``url`` on ``host:port`` until interrupted.

    A database outage is retried for ``retry_seconds`` per call; then the worker gets an error
    it recognises as transient, and retries itself.
    """
    access = access or ProxyAccess()
    check_proxy_settings(url, port, threads, max_connections)
    check_access(host, access)
    storage = open_storage(url, worker=None, pool_size=max_connections, max_overflow=0,
                           retry_seconds=retry_seconds)
    try:
        server, _ = make_server(storage, host=host, port=port, threads=threads, access=access)
        server.start()
        _logger.info("storage proxy listening on %s (%s, %s)", grpc_target(host, port),
                     "token required" if access.token is not None else "no token",
                     "TLS" if access.tls else "plaintext")
        try:
            server.wait_for_termination()
        finally:
            server.stop(grace=2)
    finally:
        dispose_storage(storage)
