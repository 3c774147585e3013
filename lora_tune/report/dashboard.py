"""optuna-dashboard on a lora-tune storage, with the LoRA-specific figures saved into studies."""
from __future__ import annotations

import os
import sys
from socketserver import ThreadingMixIn
from typing import Any
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from lora_tune.errors import ConfigError
from lora_tune.report.definitions import definition_for
from lora_tune.report.html import render_panel
from lora_tune.report.panels import PANELS

FIGURE_ID_PREFIX = "lora-tune:"


def figure_id(index: int, panel: str, title: str) -> str:
    """A stable graph-object id (letters, digits, - _ : .) so re-saving overwrites the figure."""
    slug = "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"{FIGURE_ID_PREFIX}{index:02d}-{panel}:{slug}" if slug else f"{FIGURE_ID_PREFIX}{index:02d}-{panel}"


def save_figures(study: optuna.Study) -> list[str]:
    """Save the report's LoRA-specific panels into the study for optuna-dashboard; their ids."""
    from optuna_dashboard import save_plotly_graph_object

    ids = []
    definition = definition_for(study)
    for i, spec in enumerate(definition.panels):
        if not PANELS[spec.panel].lora_specific:
            continue
        fig = render_panel(study, spec.panel, spec.title, spec.options)
        ids.append(save_plotly_graph_object(study, fig, graph_object_id=figure_id(i, spec.panel, spec.title)))
    return ids


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def make_dashboard_app(storage: Any, artifact_dir: str | os.PathLike | None) -> Callable:
    """The optuna-dashboard WSGI app with a file-system artifact store when ``artifact_dir``."""
    import optuna_dashboard

    store = None
    if artifact_dir is not None:
        from lora_tune.study.trial.artifacts import open_artifact_store

        store = open_artifact_store(artifact_dir)
    return optuna_dashboard.wsgi(storage, artifact_store=store)


def serve_dashboard(storage: Any, *, host: str = "127.0.0.1", port: int = 8080,
                    artifact_dir: str | os.PathLike | None = None, quiet: bool = True,
                    ready: Callable[[str], None] | None = None) -> None:
    """Serve optuna-dashboard until interrupted (threaded wsgiref server)."""
    if not 0 <= port <= 65535:
        raise ConfigError("--port", port, "a TCP port from 0 to 65535")
    app = make_dashboard_app(storage, artifact_dir)
    try:
        httpd = make_server(host, port, app, server_class=_ThreadingServer,
                            handler_class=_QuietHandler if quiet else WSGIRequestHandler)
    except OSError as exc:
        raise ConfigError("--port", port, "a free port on " + host, exc.strerror or str(exc)) from None
    url = f"http://{host}:{httpd.server_port}/dashboard"
    (ready or (lambda u: print(f"optuna-dashboard listening on {u}", file=sys.stderr, flush=True)))(url)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
