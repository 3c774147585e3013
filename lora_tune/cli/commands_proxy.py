"""CLI: ``lora-tune storage-proxy`` over :func:`lora_tune.study.storage.proxy_server.serve`."""
from __future__ import annotations

import logging

import click


def register(cli: click.Group, study: click.Group) -> None:
    """Add this module's commands to the root group."""
    cli.add_command(storage_proxy)


@click.command("storage-proxy")
@click.option("--storage", "storage_url", default=None, metavar="URL",
              help="The database to serve, e.g. postgresql+psycopg://USER@HOST/DB (password from PGPASSFILE "
                   "or PGPASSWORD) or sqlite:///FILE (default: $LORA_TUNE_STORAGE: keep a password there, "
                   "not on the command line).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. 127.0.0.1, ::1 or localhost serve this machine only; any other "
                   "(0.0.0.0: every interface) needs --token-file, or --insecure.")
@click.option("--port", type=int, default=13000, show_default=True, help="TCP port to listen on.")
@click.option("--token-file", default=None, metavar="FILE",
              help="A file holding the shared secret (at least 16 characters, not world-readable) every call "
                   "must carry; workers send it from $LORA_TUNE_PROXY_TOKEN (or a copy of the file named by "
                   "$LORA_TUNE_PROXY_TOKEN_FILE). Calls without it are refused.")
@click.option("--tls-cert", default=None, metavar="PEM",
              help="Serve TLS with this certificate (with --tls-key); workers trust its CA from $LORA_TUNE_PROXY_CA.")
@click.option("--tls-key", default=None, metavar="PEM", help="The private key of --tls-cert (not world-readable).")
@click.option("--insecure", is_flag=True,
              help="Serve a non-loopback --host without a token: anyone who reaches the port can read, "
                   "delete and rewrite every study (a warning is printed).")
@click.option("--threads", type=int, default=16, show_default=True, help="Storage calls served at once.")
@click.option("--max-connections", type=int, default=8, show_default=True,
              help="Database connections this proxy opens at most, however many workers use it.")
@click.option("--retry-seconds", type=float, default=10.0, show_default=True,
              help="How long one call retries a database outage before the worker is told to retry.")
def storage_proxy(storage_url: str | None, host: str, port: int, token_file: str | None, tls_cert: str | None,
                  tls_key: str | None, insecure: bool, threads: int, max_connections: int,
                  retry_seconds: float) -> None:
    """Serve a study database to workers over gRPC (Optuna's storage proxy).

    Workers then use --storage grpc://HOST:PORT: any number of them share this process's few
    database connections, with the same exact budget and crash recovery. Whoever can call the
    proxy can rewrite every study, so it serves this machine only unless it has a token.
    """
    from lora_tune.study.storage import opening as st
    from lora_tune.study.storage.proxy_server import access_warnings, check_proxy_settings, proxy_access, serve

    st.install_log_masking()
    logging.getLogger("lora_tune").setLevel(logging.INFO)
    url = st.resolve_storage_url(storage_url, None)
    check_proxy_settings(url, port, threads, max_connections)
    access = proxy_access(host, token_file=token_file, tls_cert=tls_cert, tls_key=tls_key, insecure=insecure)
    for warning in access_warnings(host, port, access):
        click.echo(warning, err=True)
    scheme = "TLS, " if access.tls else ""
    guard = "token required" if access.token is not None else "no token"
    click.echo(f"storage proxy for {st.mask_url(url)} on grpc://{host}:{port} ({scheme}{guard}, {threads} threads, "
               f"at most {max_connections} database connections); workers: --storage grpc://{host}:{port}", err=True)
    try:
        serve(url, host=host, port=port, threads=threads, max_connections=max_connections,
              retry_seconds=retry_seconds, access=access)
    except KeyboardInterrupt:
        click.echo("storage proxy stopped", err=True)
