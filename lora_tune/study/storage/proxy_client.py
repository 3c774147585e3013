"""Workers of a storage proxy (``grpc://HOST:PORT``): Optuna's ``GrpcStorageProxy`` over a channel
that sends ``$LORA_TUNE_PROXY_TOKEN`` (or ``$LORA_TUNE_PROXY_TOKEN_FILE``'s content) on every call
and speaks TLS when ``$LORA_TUNE_PROXY_CA`` names the certificate to trust (``system``: the
system's roots). The proxy's errors come back as gRPC errors; :class:`ProxyErrors` turns them
back into ``BudgetReached`` or a ``StorageError`` saying which variable to set.
"""
from __future__ import annotations

import functools
import os
import stat
import threading
import warnings
from collections import namedtuple
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import BaseStorage

from lora_tune.errors import ConfigError, StorageError
from lora_tune.study import _optuna_private as private
from lora_tune.study.storage.budget import BudgetReached
from lora_tune.study.storage.retry import grpc_code, grpc_details
from lora_tune.study.storage.urls import grpc_address, mask_secrets, mask_url
from lora_tune.study.storage.wrapper import StorageWrapper

INSTALL_HINT = "the grpc:// storage needs grpcio and protobuf: pip install 'lora-tune[grpc]'"
ENV_PROXY_TOKEN = "LORA_TUNE_PROXY_TOKEN"
ENV_PROXY_TOKEN_FILE = "LORA_TUNE_PROXY_TOKEN_FILE"
ENV_PROXY_CA = "LORA_TUNE_PROXY_CA"
TOKEN_METADATA = "authorization"  # value: "Bearer TOKEN"
MIN_TOKEN_LENGTH = 16
TOKEN_HINT = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE; chmod 600 FILE"
# a call that only asks for a study id: cheap, and refused like any other without the token
_PROBE_STUDY = "lora-tune: access check"


def check_token(token: str, field_name: str, value: object) -> str:
    """``token`` stripped; at least 16 printable ASCII characters (a gRPC metadata value)."""
    token = token.strip()
    if not token:
        raise ConfigError(field_name, value, "a non-empty token", TOKEN_HINT)
    if len(token) < MIN_TOKEN_LENGTH or not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(field_name, value, f"a token of at least {MIN_TOKEN_LENGTH} printable ASCII "
                          "characters without spaces", TOKEN_HINT)
    return token


def read_private_file(path: str, field_name: str) -> bytes:
    """The content of ``path``, a file that holds a secret: others must not be able to read it."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(field_name, path, "a file")
        if info.st_mode & stat.S_IROTH:
            raise ConfigError(field_name, path, "a file other users cannot read",
                              f"it holds a secret: chmod 600 {path}")
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(field_name, path, "a readable file", exc.strerror or str(exc)) from None


def read_certificate(path: str, field_name: str, allowed: str) -> bytes:
    """The PEM certificate in ``path`` (ConfigError: unreadable, or no ``-----BEGIN CERTIFICATE-----``)."""
    try:
        with open(path, "rb") as handle:
            pem = handle.read()
    except OSError as exc:
        raise ConfigError(field_name, path, allowed, exc.strerror or str(exc)) from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(field_name, path, "a PEM certificate file (-----BEGIN CERTIFICATE-----)")
    return pem


def read_token_file(path: str, field_name: str) -> str:
    """The token in ``path``: its stripped content (see :func:`check_token`)."""
    raw = read_private_file(path, field_name)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = "\0"  # refused by check_token
    return check_token(text, field_name, path)


@dataclass(frozen=True)
class ProxyCredentials:
    """A client's token and the CA (PEM) it trusts for TLS (None: plaintext; ``b"system"``: the
    system's roots); ``source``: where the token came from, for messages."""

    token: str | None = field(default=None, repr=False)
    ca: bytes | None = field(default=None, repr=False)
    source: str = "the client's settings"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProxyCredentials:
        env = os.environ if environ is None else environ
        token_value, token_file = env.get(ENV_PROXY_TOKEN, "").strip(), env.get(ENV_PROXY_TOKEN_FILE, "").strip()
        if token_value and token_file:
            raise ConfigError(ENV_PROXY_TOKEN_FILE, token_file, f"unset when ${ENV_PROXY_TOKEN} is set",
                              "Set one of them: the token, or the file holding it")
        token, source = None, ""
        if token_value:
            token, source = check_token(token_value, ENV_PROXY_TOKEN, "***"), f"${ENV_PROXY_TOKEN}"
        elif token_file:
            token, source = read_token_file(token_file, ENV_PROXY_TOKEN_FILE), f"${ENV_PROXY_TOKEN_FILE}"
        ca_path = env.get(ENV_PROXY_CA, "").strip()
        ca = None
        if ca_path == "system":
            ca = b"system"
        elif ca_path:
            ca = read_certificate(ca_path, ENV_PROXY_CA, "the proxy's CA certificate (PEM file) or 'system'")
        return cls(token=token, ca=ca, source=source)


def grpc_target(host: str, port: int) -> str:
    """``host:port`` for grpc, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@functools.cache
def _token_interceptor_type() -> type:
    """A grpc client interceptor adding ``authorization: Bearer TOKEN`` (grpc is optional)."""
    import grpc

    fields = ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")

    class CallDetails(namedtuple("CallDetails", fields), grpc.ClientCallDetails):
        pass

    class TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
        def __init__(self, token: str):
            self.metadata = ((TOKEN_METADATA, f"Bearer {token}"),)

        def with_token(self, details: Any) -> Any:
            return CallDetails(details.method, details.timeout, (*(details.metadata or ()), *self.metadata),
                               details.credentials, getattr(details, "wait_for_ready", None),
                               getattr(details, "compression", None))

        def intercept_unary_unary(self, continuation, details, request):
            return continuation(self.with_token(details), request)

        def intercept_unary_stream(self, continuation, details, request):
            return continuation(self.with_token(details), request)

        def intercept_stream_unary(self, continuation, details, requests):
            return continuation(self.with_token(details), requests)

        def intercept_stream_stream(self, continuation, details, requests):
            return continuation(self.with_token(details), requests)

    return TokenInterceptor


class AuthenticatedProxy(private.ChannelGrpcStorageProxy):
    """Optuna's ``GrpcStorageProxy`` whose channel carries ``credentials``; picklable like Optuna's."""

    def __init__(self, *, host: str, port: int, credentials: ProxyCredentials | None = None):
        self.credentials = credentials or ProxyCredentials()
        super().__init__(host=host, port=port)

    def open_channel(self, host: str, port: int) -> Any:
        import grpc

        options = [("grpc.max_receive_message_length", -1)]  # as Optuna's own client
        target, ca = grpc_target(host, port), self.credentials.ca
        if ca is None:
            channel = grpc.insecure_channel(target, options=options)
        else:
            tls = grpc.ssl_channel_credentials(root_certificates=None if ca == b"system" else ca)
            channel = grpc.secure_channel(target, tls, options=options)
        if self.credentials.token:
            channel = grpc.intercept_channel(channel, _token_interceptor_type()(self.credentials.token))
        return channel


def refused_message(url: str, credentials: ProxyCredentials) -> str:
    """What to do when the proxy at ``url`` refused this client's token (or its lack of one)."""
    if credentials.token is None:
        what = (f"it needs a token and this process sent none: set ${ENV_PROXY_TOKEN} to the content of "
                f"the proxy's --token-file (or ${ENV_PROXY_TOKEN_FILE} to a copy of that file)")
    else:
        what = (f"the token this process sent (from {credentials.source}) is not the proxy's: set "
                f"${ENV_PROXY_TOKEN} to the content of the proxy's --token-file")
    return f"the storage proxy {mask_url(url)} refused the call: {what}"


class ProxyErrors(StorageWrapper):
    """The proxy's "trial budget reached" back into :class:`BudgetReached`; a refused token into a
    :class:`StorageError` naming ``$LORA_TUNE_PROXY_TOKEN``."""

    def __init__(self, inner: BaseStorage, url: str = "grpc://", credentials: ProxyCredentials | None = None):
        super().__init__(inner)
        self.url, self.credentials = url, credentials or ProxyCredentials()

    def _forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._forward(name, *args, **kwargs)
        except Exception as exc:
            code = grpc_code(exc)
            if code == "UNAUTHENTICATED":
                raise StorageError(refused_message(self.url, self.credentials)) from None
            if code is not None and name == "create_new_trial":
                refused = BudgetReached.parse(args[0], grpc_details(exc))
                if refused is not None:
                    raise refused from None
            raise


def _unreachable(url: str, port: int, wait_seconds: float, proxy: AuthenticatedProxy) -> StorageError:
    """Why the proxy did not answer, from one call's error (a TLS mismatch says so)."""
    reasons: list[str] = []

    def probe() -> None:
        try:
            proxy.get_study_id_from_name(_PROBE_STUDY)
        except Exception as exc:  # noqa: BLE001 - only its message is wanted
            text = mask_secrets(grpc_details(exc) or str(exc)).strip()
            reasons.append(text.splitlines()[0][:300] if text else "")

    thread = threading.Thread(target=probe, daemon=True)  # Optuna's calls have no deadline
    thread.start()
    thread.join(timeout=5)
    reason = reasons[0] if reasons else ""
    lowered = reason.lower()
    tls = proxy.credentials.ca is not None
    if any(word in lowered for word in ("ssl", "tls", "handshake", "certificate")) or tls:
        hint = (f"TLS: ${ENV_PROXY_CA} must name the CA certificate (PEM) of the proxy's --tls-cert, and that "
                "certificate must name the host used here" if tls else
                f"if the proxy was started with --tls-cert, set ${ENV_PROXY_CA} to its CA certificate (PEM)")
    else:
        hint = (f"start it with `lora-tune storage-proxy --storage DATABASE_URL --host 0.0.0.0 --port {port} "
                "--token-file FILE`, or check the host and port (and that no firewall is in between); "
                f"a proxy with --tls-cert needs ${ENV_PROXY_CA}")
    detail = f": {reason}" if reason else ""
    return StorageError(f"cannot reach the storage proxy {mask_url(url)} (no answer within "
                        f"{wait_seconds:.0f} s{detail}). {hint[0].upper()}{hint[1:]}")


def open_proxy(url: str, wait_seconds: float, credentials: ProxyCredentials | None = None) -> BaseStorage:
    """Optuna's gRPC client for ``url`` with the environment's (or ``credentials``') token and TLS,
    once the proxy answers and accepts them."""
    host, port = grpc_address(url)
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise StorageError(f"cannot open storage {mask_url(url)}: {INSTALL_HINT}") from None
    credentials = ProxyCredentials.from_env() if credentials is None else credentials
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = AuthenticatedProxy(host=host, port=port, credentials=credentials)
    try:
        proxy.wait_server_ready(timeout=wait_seconds)
    except ConnectionError:
        error = _unreachable(url, port, wait_seconds, proxy)
        proxy.close()
        raise error from None
    storage = ProxyErrors(proxy, url, credentials)
    try:
        storage.get_study_id_from_name(_PROBE_STUDY)  # the token is checked now, not mid-trial
    except StorageError:
        proxy.close()
        raise
    except Exception:  # noqa: BLE001 - no such study, or the database behind is down: later calls retry
        pass
    return storage
