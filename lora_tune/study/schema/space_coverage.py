"""Every combination of a space's ``targets`` and ``layers`` resolved on the task's model before
any trial: one that does not fit is a problem of the study file, one that fits gets its coverage
(:mod:`lora_tune.lora.coverage`; the study attribute ``target_coverage``)."""
from __future__ import annotations

from typing import Any

from torch import nn

from lora_tune.errors import ConfigError
from lora_tune.lora.config import LoraConfig, layers_label
from lora_tune.lora.coverage import TargetCoverage, linear_weights, target_coverage
from lora_tune.study.schema.space import LORA_DEFAULTS, SearchSpace
from lora_tune.tasks.base import structure_of

Problems = list[tuple[str, str]]


def _targets_value(value: Any) -> Any:
    return value.split("|") if isinstance(value, str) and "|" in value else value


def check_choices(model: nn.Module, space: SearchSpace) -> tuple[list[TargetCoverage], Problems]:
    """(coverage of each targets x layers combination that fits the model, problems of the others);
    targets are checked alone first, so a layers problem names the layers value."""
    targets = space.values_of("targets") or [LORA_DEFAULTS["targets"]]
    layers = space.values_of("layers") or [LORA_DEFAULTS["layers"]]
    weights = linear_weights(model)
    problems: Problems = []
    fitting = []
    for value in targets:
        try:
            target_coverage(model, LoraConfig(targets=_targets_value(value)), weights)
            fitting.append(value)
        except ConfigError as exc:
            problems.append(("search_space.targets", f"{value!r} does not fit the task's model: {exc}"))
    records: list[TargetCoverage] = []
    bad_layers: set[str] = set()
    for layer_value in layers:
        label = layers_label(layer_value)
        for value in fitting:
            try:
                records.append(target_coverage(model, LoraConfig(targets=_targets_value(value), layers=layer_value),
                                               weights))
            except ConfigError as exc:
                if label not in bad_layers:
                    bad_layers.add(label)
                    problems.append(("search_space.layers", f"{label!r} does not fit the task's model with targets "
                                     f"{value!r}: {exc}"))
    return records, problems


def space_coverage(spec: Any, task: Any) -> list[TargetCoverage]:
    """The coverage of every target choice of a (checked) study spec on its task's model."""
    space = SearchSpace.from_spec(spec.search_space)
    return check_choices(structure_of(task), space)[0]


def coverage_attr(records: list[TargetCoverage]) -> list[dict[str, Any]]:
    """The study user attribute ``target_coverage``: one plain record per choice."""
    return [r.to_dict() for r in records]
