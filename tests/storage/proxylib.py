"""Helpers for tests of the authenticated storage proxy: a token, a self-signed TLS certificate
(made by the ``openssl`` command), and a real proxy server in this process on 127.0.0.1."""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

from lora_tune.study.storage import opening as st
from lora_tune.study.storage.proxy_server import ProxyAccess, make_server

TOKEN = secrets.token_urlsafe(32)


def token_file(folder: Path, token: str = TOKEN, mode: int = 0o600) -> Path:
    path = folder / "proxy-token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, and its key (mode 600): ``(cert, key)``."""
    cert, key = folder / "proxy-cert.pem", folder / "proxy-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    os.chmod(key, 0o600)
    return cert, key


def access(token: str | None = TOKEN, tls: tuple[Path, Path] | None = None) -> ProxyAccess:
    cert, key = (tls[0].read_bytes(), tls[1].read_bytes()) if tls else (None, None)
    return ProxyAccess(token=token, tls_cert=cert, tls_key=key)


@contextlib.contextmanager
def serving(database_url: str, proxy_access: ProxyAccess, threads: int = 8) -> Iterator[str]:
    """A storage proxy for ``database_url`` on a free port of 127.0.0.1; yields its grpc:// URL."""
    storage = st.open_storage(database_url, worker=None)
    server, port = make_server(storage, host="127.0.0.1", port=0, threads=threads, access=proxy_access)
    server.start()
    try:
        yield f"grpc://127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait()
        st.dispose_storage(storage)
