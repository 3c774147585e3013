"""Panel data "metric by layer range": complete trials grouped by their ``layers`` parameter
(else their ``lora_config``'s), as typed records."""
from __future__ import annotations

from typing import NamedTuple

import optuna
from optuna.trial import FrozenTrial

from lora_tune.errors import ConfigError
from lora_tune.lora.config import layers_label
from lora_tune.report import frame
from lora_tune.study.trial import record


class LayerPoint(NamedTuple):
    number: int
    value: float
    targets: str          # the trial's target preset (or its explicit list, shortened)
    is_baseline: bool


class LayerRange(NamedTuple):
    label: str            # all, first:N, last:N, 0|1|2
    points: list[LayerPoint]
    best: float
    mean: float

    @property
    def n(self) -> int:
        return len(self.points)


class LayersPanel(NamedTuple):
    metric: str
    maximize: bool
    ranges: list[LayerRange]   # all first, then first:N, last:N (larger N first), then index lists


def layers_of(trial: FrozenTrial) -> str:
    """The layer range label of a trial."""
    value = frame.param_or_config(trial, "layers")
    try:
        return layers_label(value)
    except ConfigError:
        return str(value)


def _order(label: str) -> tuple:
    side, _, n = label.partition(":")
    if label == "all":
        return (0, 0, label)
    if side in ("first", "last") and n.isdigit():
        return (1 if side == "last" else 2, -int(n), label)
    return (3, 0, label)


def layers_data(study: optuna.Study, objective: int = 0) -> LayersPanel:
    """The metric of complete trials by layer range (an objective index for multi-objective studies)."""
    metric, maximize = frame.objective_of(study, objective)
    groups: dict[str, list[LayerPoint]] = {}
    for t in sorted(frame.complete_trials(study), key=lambda t: t.number):
        groups.setdefault(layers_of(t), []).append(
            LayerPoint(t.number, t.values[objective], frame.preset_of(t), record.kind_of(t) == record.Kind.BASELINE))
    pick = max if maximize else min
    ranges = [LayerRange(label, pts, pick(p.value for p in pts), sum(p.value for p in pts) / len(pts))
              for label, pts in sorted(groups.items(), key=lambda kv: _order(kv[0]))]
    return LayersPanel(metric, maximize, ranges)
