"""Reports on studies: panel data functions, Plotly drawers, the HTML report, optuna-dashboard.

Names are loaded lazily, so that the study driver's import of the package does not import Plotly.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PANELS": "lora_tune.report.panels",
    "Panel": "lora_tune.report.panels",
    "ReportDefinition": "lora_tune.report.definitions",
    "definition_for": "lora_tune.report.definitions",
    "load_definition": "lora_tune.report.definitions",
    "build_report": "lora_tune.report.html",
    "render_panel": "lora_tune.report.html",
    "write_report": "lora_tune.report.html",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_tune.report' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
