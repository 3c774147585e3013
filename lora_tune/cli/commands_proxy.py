"""CLI: ``lora-tune storage-proxy --storage URL --port P`` - one gRPC storage proxy for many workers.

Thin: :func:`lora_tune.study.storage_proxy.serve` does the work.
"""
from __future__ import annotations

import logging

import click


def register(cli: click.Group, study: click.Group) -> None:
    """Add this module's commands to the root group."""
    cli.add_command(storage_proxy)


@click.command("storage-proxy")
@click.option("--storage", "storage_url", default=None, metavar="URL",
              help="The database to serve: postgresql+psycopg://USER:PASSWORD@HOST/DB or sqlite:///FILE "
                   "(default: $LORA_TUNE_STORAGE).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface, for workers on other machines).")
@click.option("--port", type=int, default=13000, show_default=True, help="TCP port to listen on.")
@click.option("--threads", type=int, default=16, show_default=True, help="Storage calls served at once.")
@click.option("--max-connections", type=int, default=8, show_default=True,
              help="Database connections this proxy opens at most, however many workers use it.")
@click.option("--retry-seconds", type=float, default=10.0, show_default=True,
              help="How long one call retries a database outage before the worker is told to retry.")
def storage_proxy(storage_url: str | None, host: str, port: int, threads: int, max_connections: int,
                  retry_seconds: float) -> None:
    """Serve a study database to workers over gRPC (Optuna's storage proxy).

    Workers then use --storage grpc://HOST:PORT: any number of them share this process's few
    database connections, with the same exact budget and crash recovery.
    """
    from lora_tune.study import storage as st
    from lora_tune.study.storage_proxy import check_proxy_settings, serve

    st.install_log_masking()
    logging.getLogger("lora_tune").setLevel(logging.INFO)
    url = st.resolve_storage_url(storage_url, None)
    check_proxy_settings(url, port, threads, max_connections)
    click.echo(f"storage proxy for {st.mask_url(url)} on grpc://{host}:{port} ({threads} threads, at most "
               f"{max_connections} database connections); workers: --storage grpc://{host}:{port}", err=True)
    try:
        serve(url, host=host, port=port, threads=threads, max_connections=max_connections,
              retry_seconds=retry_seconds)
    except KeyboardInterrupt:
        click.echo("storage proxy stopped", err=True)
