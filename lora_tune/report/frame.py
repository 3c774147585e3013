"""Reading a study's trials (the trial record) the way every panel needs them."""
from __future__ import annotations

import json
import math
from typing import Any
from collections.abc import Iterable, Sequence

import optuna
import pandas as pd
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from lora_tune.errors import ConfigError
from lora_tune.study.trial import record

# User attributes shown as table columns, in this order (others follow, sorted).
KNOWN_USER_ATTRS = (
    record.IS_BASELINE, record.TARGET_PRESET, record.TRAINABLE_PARAMS, record.ADAPTER_BYTES,
    record.PEAK_MEMORY_BYTES, record.SETUP_SECONDS, record.TRAIN_SECONDS, record.THROUGHPUT, record.TRAIN_STEPS,
    record.PLANNED_STEPS, record.WORKER, record.FAIL_REASON,
)
# Long or nested attributes left out of tables unless asked for.
BULKY_USER_ATTRS = (record.TRACEBACK, record.LORA_CONFIG, record.TARGET_MODULES, record.METRIC_VALUES,
                    record.TRIAL_LOG)


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def metric_names(study: optuna.Study) -> list[str]:
    """Names of the objectives: the ``metrics`` study attribute, else the spec, else ``value``."""
    n = len(study.directions)
    attrs = study.user_attrs
    names = attrs.get("metrics")
    if not names:
        spec = attrs.get("spec") or {}
        metric = (spec.get("study") or {}).get("metric") if isinstance(spec, dict) else None
        names = [metric] if isinstance(metric, str) else metric
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or len(names) != n or not all(isinstance(x, str) for x in names):
        return ["value"] if n == 1 else [f"value_{i}" for i in range(n)]
    return list(names)


def maximizing(study: optuna.Study, objective: int = 0) -> bool:
    return study.directions[objective] == StudyDirection.MAXIMIZE


def objective_of(study: optuna.Study, objective: int) -> tuple[str, bool]:
    """The metric name of objective number ``objective`` and whether it is maximized."""
    names = metric_names(study)
    if not 0 <= objective < len(names):
        raise ConfigError("objective", objective, f"an index from 0 to {len(names) - 1}")
    return names[objective], maximizing(study, objective)


def better(a: float, b: float | None, maximize: bool) -> bool:
    """Whether value ``a`` is strictly better than ``b`` (``None`` is beaten by anything)."""
    if b is None:
        return True
    return a > b if maximize else a < b


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return complete_of(study.get_trials(deepcopy=False))


def complete_of(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The complete ``trials`` with finite values."""
    return [t for t in trials if t.state == TrialState.COMPLETE
            and t.values is not None and all(math.isfinite(v) for v in t.values)]


def objective_value(trial: FrozenTrial, objective: int = 0) -> float | None:
    if trial.values is None or len(trial.values) <= objective:
        return None
    return float(trial.values[objective])


def best_trial(study: optuna.Study, objective: int = 0) -> FrozenTrial | None:
    """The best complete trial on one objective; ``None`` when none completed."""
    best: FrozenTrial | None = None
    maximize = maximizing(study, objective)
    for t in complete_trials(study):
        if best is None or better(t.values[objective], best.values[objective], maximize):
            best = t
    return best


def preset_of(trial: FrozenTrial) -> str:
    """The target preset of a trial: the user attr, else the ``targets`` param, else the config."""
    preset = trial.user_attrs.get(record.TARGET_PRESET)
    if isinstance(preset, str) and preset:
        return preset
    targets = trial.params.get("targets")
    if isinstance(targets, str) and targets:  # a preset name, or an explicit list joined by "|"
        return targets if len(targets) <= 40 else targets[:37] + "..."
    cfg = trial.user_attrs.get(record.LORA_CONFIG) or {}
    given = cfg.get("targets") if isinstance(cfg, dict) else None
    if isinstance(given, str):
        return given
    return "explicit" if given else "unknown"


def quant_bits_of(trial: FrozenTrial) -> str:
    """Quantization bits as a label: ``"none"``, ``"8"`` or ``"4"`` (param 0 means none)."""
    bits = param_or_config(trial, "quant_bits")
    if bits in (None, 0, "0", "none", "None", 16, 32):
        return "none"
    return str(int(bits))


def use_dora_of(trial: FrozenTrial) -> bool:
    """Whether a trial trained DoRA (its ``use_dora`` param, else its LoRA config; default False)."""
    return bool(param_or_config(trial, "use_dora"))


def alpha_axis(trials: Sequence[FrozenTrial]) -> tuple[str, str]:
    """Which parameter is the alpha axis: (param name, axis label)."""
    if any("alpha" in t.params for t in trials):
        return "alpha", "alpha"
    if any("alpha_ratio" in t.params for t in trials):
        return "alpha_ratio", "alpha / rank"
    return f"{record.LORA_CONFIG}.alpha", "alpha"


def param_or_config(trial: FrozenTrial, name: str) -> Any:
    """A trial param, or (for ``lora_config.X``) the value used in the LoRA config."""
    if name.startswith(f"{record.LORA_CONFIG}."):
        cfg = trial.user_attrs.get(record.LORA_CONFIG) or {}
        return cfg.get(name.split(".", 1)[1]) if isinstance(cfg, dict) else None
    if name in trial.params:
        return trial.params[name]
    cfg = trial.user_attrs.get(record.LORA_CONFIG) or {}
    return cfg.get(name) if isinstance(cfg, dict) else None


def _cell(value: Any) -> Any:
    """A table cell: scalars as they are, lists and dicts as compact JSON."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def trials_dataframe(study: optuna.Study, *, include_bulky: bool = False,
                     states: Iterable[TrialState] | None = None) -> pd.DataFrame:
    """One row per trial: number, state, metric(s), ``param_*`` columns and user attributes."""
    names = metric_names(study)
    wanted = set(states) if states is not None else None
    trials = [t for t in study.get_trials(deepcopy=False) if wanted is None or t.state in wanted]
    param_names = sorted({p for t in trials for p in t.params})
    attr_names = [a for a in KNOWN_USER_ATTRS if any(a in t.user_attrs for t in trials)]
    extra = sorted({a for t in trials for a in t.user_attrs} - set(KNOWN_USER_ATTRS) - set(BULKY_USER_ATTRS))
    attr_names += extra
    if include_bulky:
        attr_names += [a for a in BULKY_USER_ATTRS if any(a in t.user_attrs for t in trials)]
    rows = []
    for t in trials:
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        for i, name in enumerate(names):
            row[name] = objective_value(t, i)
        for p in param_names:
            row[f"param_{p}"] = _cell(t.params.get(p))
        for a in attr_names:
            row[a] = _cell(t.user_attrs.get(a))
        row["datetime_start"] = t.datetime_start
        row["datetime_complete"] = t.datetime_complete
        row["duration_s"] = t.duration.total_seconds() if t.duration is not None else None
        rows.append(row)
    columns = (["number", "state", *names] + [f"param_{p}" for p in param_names] + attr_names
               + ["datetime_start", "datetime_complete", "duration_s"])
    return pd.DataFrame(rows, columns=columns)
