"""The panel registry: name -> (data function, draw function, default title); a report
definition's options for a panel are its data function's keywords."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from lora_tune.report import data, draw, layer_ranges


@dataclass(frozen=True)
class Panel:
    name: str
    title: str
    data: Callable[..., dict[str, Any]]
    draw: Callable[[dict[str, Any], str], Any]
    lora_specific: bool = False  # saved into the study for optuna-dashboard

    @property
    def options(self) -> list[str]:
        """Keyword options the data function accepts (everything after ``study``)."""
        params = list(inspect.signature(self.data).parameters.values())[1:]
        return [p.name for p in params if p.name != "now"]

    @property
    def html(self) -> bool:
        """Whether the panel draws HTML (else a Plotly figure)."""
        return self.name in ("summary", "table")


PANELS: dict[str, Panel] = {p.name: p for p in (
    Panel("summary", "Summary", data.summary_data, draw.draw_summary),
    Panel("history", "Optimization history", data.history_data, draw.draw_history),
    Panel("importances", "Parameter importances", data.importances_data, draw.draw_importances),
    Panel("rank_alpha", "Best metric by rank × alpha", data.rank_alpha_data, draw.draw_rank_alpha, True),
    Panel("presets", "Metric by target preset", data.presets_data, draw.draw_presets, True),
    Panel("layers", "Metric by layer range", layer_ranges.layers_data, draw.draw_layers, True),
    Panel("cost", "Metric vs. cost", data.cost_data, draw.draw_cost, True),
    Panel("curves", "Learning curves", data.curves_data, draw.draw_curves, True),
    Panel("parallel", "Parallel coordinates", data.parallel_data, draw.draw_parallel, True),
    Panel("timeline", "Trials per worker", data.timeline_data, draw.draw_timeline, True),
    Panel("pareto", "Pareto front of the objectives", data.pareto_data, draw.draw_pareto, True),
    Panel("table", "All trials", data.table_data, draw.draw_table),
)}
