"""Reports on studies: panel data functions, Plotly drawers, the HTML report, optuna-dashboard.

Each panel is a pure function from a study to plain data (``lora_tune.report.data``) and a
function drawing it (``lora_tune.report.draw``); ``dashboards/*.yaml`` say which panels a
report shows, in what order, for single- and multi-objective studies.
"""
from __future__ import annotations

from lora_tune.report.definitions import ReportDefinition, definition_for, load_definition
from lora_tune.report.html import build_report, render_panel, write_report
from lora_tune.report.panels import PANELS, Panel

__all__ = ["PANELS", "Panel", "ReportDefinition", "build_report", "definition_for", "load_definition",
           "render_panel", "write_report"]
