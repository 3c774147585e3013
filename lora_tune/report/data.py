"""Panel data: pure functions from a study (and the report definition's options) to plain data."""
from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime
from typing import Any
from collections.abc import Sequence

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from lora_tune.errors import ConfigError
from lora_tune.report import frame
from lora_tune.study.trial import record
from lora_tune.study.storage.budget import study_budget

COST_AXES = {
    record.TRAINABLE_PARAMS: "trainable parameters",
    record.PEAK_MEMORY_BYTES: "peak memory (bytes)",
    record.ADAPTER_BYTES: "adapter size (bytes)",
    record.TRAIN_SECONDS: "train seconds",
    record.SETUP_SECONDS: "setup seconds (start to first optimizer step)",
}


def pareto_mask(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[bool]:
    """For each point, whether no other point dominates it (better or equal everywhere, better once)."""
    signs = [1.0 if m else -1.0 for m in maximize]
    keyed = [[s * v for s, v in zip(signs, p)] for p in points]  # larger is better everywhere
    mask = []
    for i, p in enumerate(keyed):
        dominated = any(
            j != i and all(q[k] >= p[k] for k in range(len(p))) and any(q[k] > p[k] for k in range(len(p)))
            for j, q in enumerate(keyed)
        )
        mask.append(not dominated)
    return mask


# -- summary ---------------------------------------------------------------------------------
def summary_data(study: optuna.Study, objective: int = 0) -> dict[str, Any]:
    """Best trial, gain over baseline, trial counts by state, and the compute used and saved
    (the one account: :func:`lora_tune.study.trial.record.account`)."""
    metric, maximize = frame.objective_of(study, objective)
    trials = study.get_trials(deepcopy=False)
    account = record.study_account(study)
    best = frame.best_trial(study, objective)
    base = record.find_baseline(trials)
    out: dict[str, Any] = {
        "study": study.study_name,
        "metric": metric,
        "direction": "maximize" if maximize else "minimize",
        "multi_objective": frame.is_multi_objective(study),
        "n_trials": len(trials),
        "done": account.done,
        "budget": study_budget(study.user_attrs),
        "counts": {s.name: account.states.get(s.name, 0) for s in TrialState},
        "best": None,
        "baseline": None,
        "gain": None,
        "gain_relative": None,
        "pareto_numbers": [],
        "compute": {"used": account.used, "results": account.results, "confirm": account.confirm,
                    "saved": account.saved, "line": account.compute_line()},
        "pruning": pruning_savings(account),
        "time": time_per_trial(account),
    }
    if best is not None:
        out["best"] = {
            "number": best.number,
            "value": best.values[objective],
            "values": list(best.values),
            "params": dict(best.params),
            "target_preset": frame.preset_of(best),
            "trainable_params": best.user_attrs.get(record.TRAINABLE_PARAMS),
            "is_baseline": record.kind_of(best) == record.Kind.BASELINE,
        }
    if base is not None:
        value = frame.objective_value(base, objective) if base.state == TrialState.COMPLETE else None
        out["baseline"] = {"number": base.number, "state": base.state.name, "value": value}
        if best is not None and value is not None:
            gain = best.values[objective] - value
            out["gain"] = gain if maximize else -gain  # positive = better than the baseline
            out["gain_relative"] = out["gain"] / abs(value) if value else None
    if frame.is_multi_objective(study):
        out["pareto_numbers"] = sorted(t.number for t in study.best_trials)
    return out


def pruning_savings(account: record.Account) -> dict[str, Any]:
    """Training steps run vs. what the same trials would have run had none been pruned (as
    :class:`lora_tune.study.trial.record.Account` counts them)."""
    unpruned = account.steps_run + account.steps_saved
    return {
        "trials_counted": account.counted,
        "pruned_counted": account.pruned,
        "steps_run": account.steps_run,
        "steps_unpruned": unpruned,
        "steps_saved": account.steps_saved,
        "fraction_saved": account.steps_saved / unpruned if unpruned else 0.0,
        "seconds_saved_estimate": account.seconds_saved,
    }


def time_per_trial(account: record.Account) -> dict[str, Any]:
    """Mean setup and training seconds per trial (:class:`lora_tune.study.trial.record.Account`)."""
    return {"trials": account.timed, "setup_mean": account.mean_setup_seconds,
            "train_mean": account.mean_train_seconds, "line": account.time_line()}


# -- history / importances -----------------------------------------------------------------------
def history_data(study: optuna.Study, objective: int = 0) -> dict[str, Any]:
    """Complete trials in order: value and best so far."""
    metric, maximize = frame.objective_of(study, objective)
    numbers, values, best_so_far, baseline = [], [], [], []
    best: float | None = None
    for t in sorted(frame.complete_trials(study), key=lambda t: t.number):
        v = t.values[objective]
        if frame.better(v, best, maximize):
            best = v
        numbers.append(t.number)
        values.append(v)
        best_so_far.append(best)
        baseline.append(record.kind_of(t) == record.Kind.BASELINE)
    return {"metric": metric, "maximize": maximize, "numbers": numbers, "values": values,
            "best_so_far": best_so_far, "is_baseline": baseline}


def importances_data(study: optuna.Study, objective: int | None = None) -> dict[str, Any]:
    """Parameter importances by PED-ANOVA (Optuna 5's default evaluator)."""
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    out: dict[str, Any] = {"evaluator": type(evaluator).__name__, "importances": {}, "note": None}
    completed = frame.complete_trials(study)
    if len(completed) < 2:
        out["note"] = f"needs at least 2 complete trials, the study has {len(completed)}"
        return out
    target = None
    if frame.is_multi_objective(study) and objective is not None:
        idx = objective
        target = lambda t: t.values[idx]  # noqa: E731
    try:
        out["importances"] = dict(optuna.importance.get_param_importances(
            study, evaluator=evaluator, target=target))
    except (ValueError, RuntimeError) as exc:  # e.g. a single distinct value per parameter
        out["note"] = f"importances unavailable: {exc}"
    return out


# -- LoRA-specific panels --------------------------------------------------------------------------
def rank_alpha_data(study: optuna.Study, objective: int = 0) -> dict[str, Any]:
    """Rank × alpha grid; each cell is the best metric among complete trials with that pair."""
    metric, maximize = frame.objective_of(study, objective)
    trials = frame.complete_trials(study)
    alpha_key, alpha_label = frame.alpha_axis(trials)
    cells: dict[tuple[Any, Any], dict[str, Any]] = {}
    for t in trials:
        rank = frame.param_or_config(t, "rank")
        alpha = frame.param_or_config(t, alpha_key)
        if rank is None or alpha is None:
            continue
        v = t.values[objective]
        cell = cells.setdefault((rank, alpha), {"value": None, "number": None, "count": 0})
        cell["count"] += 1
        if frame.better(v, cell["value"], maximize):
            cell["value"], cell["number"] = v, t.number
    ranks = sorted({k[0] for k in cells})
    alphas = sorted({k[1] for k in cells})
    z = [[cells.get((r, a), {}).get("value") for r in ranks] for a in alphas]
    best_numbers = [[cells.get((r, a), {}).get("number") for r in ranks] for a in alphas]
    counts = [[cells.get((r, a), {}).get("count", 0) for r in ranks] for a in alphas]
    return {"metric": metric, "maximize": maximize, "ranks": ranks, "alphas": alphas,
            "alpha_label": alpha_label, "z": z, "trial_numbers": best_numbers, "counts": counts}


def presets_data(study: optuna.Study, objective: int = 0) -> dict[str, Any]:
    """Metric of complete trials grouped by target preset, presets ordered by their best value."""
    metric, maximize = frame.objective_of(study, objective)
    groups: dict[str, dict[str, list]] = defaultdict(lambda: {"values": [], "numbers": []})
    for t in frame.complete_trials(study):
        g = groups[frame.preset_of(t)]
        g["values"].append(t.values[objective])
        g["numbers"].append(t.number)
    pick = max if maximize else min
    order = sorted(groups, key=lambda p: pick(groups[p]["values"]), reverse=maximize)
    return {
        "metric": metric, "maximize": maximize,
        "presets": [{"preset": p, "values": groups[p]["values"], "numbers": groups[p]["numbers"],
                     "best": pick(groups[p]["values"]), "n": len(groups[p]["values"])} for p in order],
    }


def cost_data(study: optuna.Study, x: str = "trainable_params", objective: int = 0) -> dict[str, Any]:
    """Metric vs. a cost (``x``: a user attribute), Pareto front marked, a series per quant bits
    (split into ``"<bits>, DoRA"`` / ``"<bits>, LoRA"`` when trials differ in ``use_dora``)."""
    if x not in COST_AXES:
        raise ConfigError("x", x, "one of " + ", ".join(COST_AXES))
    metric, maximize = frame.objective_of(study, objective)
    trials = study.get_trials(deepcopy=False)
    points = []
    for t in frame.complete_of(trials):
        cost = t.user_attrs.get(x)
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost):
            continue
        points.append({"number": t.number, "x": cost, "y": t.values[objective],
                       "quant_bits": frame.quant_bits_of(t), "use_dora": frame.use_dora_of(t),
                       "preset": frame.preset_of(t),
                       "rank": frame.param_or_config(t, "rank"),
                       "is_baseline": record.kind_of(t) == record.Kind.BASELINE})
    mask = pareto_mask([(p["x"], p["y"]) for p in points], [False, maximize])
    for p, on_front in zip(points, mask):
        p["pareto"] = on_front
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["x"])
    bits_order = sorted({p["quant_bits"] for p in points}, key=lambda b: (b != "none", b))
    dora_varies = len({p["use_dora"] for p in points}) > 1
    for p in points:
        p["series"] = f"{p['quant_bits']}, {'DoRA' if p['use_dora'] else 'LoRA'}" if dora_varies else p["quant_bits"]
    series = sorted({p["series"] for p in points}, key=lambda s: (bits_order.index(s.split(",")[0]), s))
    return {"metric": metric, "maximize": maximize, "x": x, "x_label": COST_AXES[x],
            "time": time_per_trial(record.study_account(study)),
            "points": points, "front_numbers": [p["number"] for p in front],
            "quant_bits": bits_order, "dora_varies": dora_varies, "series": series}


def curves_data(study: optuna.Study) -> dict[str, Any]:
    """Intermediate values per trial (what ``trial.report`` recorded), pruned trials included."""
    curves = []
    for t in study.get_trials(deepcopy=False):
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        curves.append({"number": t.number, "state": t.state.name, "steps": steps,
                       "values": [t.intermediate_values[s] for s in steps],
                       "is_baseline": record.kind_of(t) == record.Kind.BASELINE})
    return {"metric": frame.metric_names(study)[0], "curves": curves,
            "n_pruned": sum(c["state"] == "PRUNED" for c in curves)}


def parallel_data(study: optuna.Study, objective: int = 0) -> dict[str, Any]:
    """Parallel-coordinates dimensions: each param of complete trials (log ones as log10,
    categorical or partly missing ones as coded ticks), then the metric."""
    metric, maximize = frame.objective_of(study, objective)
    trials = sorted(frame.complete_trials(study), key=lambda t: t.number)
    names = sorted({p for t in trials for p in t.params})
    dims = []
    for name in names:
        raw = [t.params.get(name) for t in trials]
        present = [v for v in raw if v is not None]
        dist = next((t.distributions[name] for t in trials if name in t.distributions), None)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present) and not (
            isinstance(dist, CategoricalDistribution))
        if numeric and len(present) == len(raw) and len(set(present)) > 1:
            if isinstance(dist, FloatDistribution) and dist.log and all(v > 0 for v in present):
                dims.append({"label": f"log10 {name}", "values": [math.log10(v) for v in raw]})
            else:
                dims.append({"label": name, "values": [float(v) for v in raw]})
            continue
        labels = sorted({str(v) for v in present}, key=_natural)
        if None in raw:
            labels.append("n/a")
        codes = {label: i for i, label in enumerate(labels)}
        dims.append({"label": name, "values": [codes["n/a" if v is None else str(v)] for v in raw],
                     "tickvals": list(range(len(labels))), "ticktext": labels})
    values = [t.values[objective] for t in trials]
    dims.append({"label": metric, "values": values})
    return {"metric": metric, "maximize": maximize, "numbers": [t.number for t in trials],
            "dimensions": dims, "color": values}


def _natural(label: str) -> tuple:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def timeline_data(study: optuna.Study, now: datetime | None = None) -> dict[str, Any]:
    """Trials per worker (user attr ``worker``) as start/end intervals, in start order."""
    bars = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is None:
            continue
        end = t.datetime_complete
        if end is None:
            end = now or datetime.now(t.datetime_start.tzinfo)
        bars.append({"number": t.number, "worker": str(t.user_attrs.get(record.WORKER) or "unknown"),
                     "state": t.state.name, "start": t.datetime_start, "end": end,
                     "seconds": max((end - t.datetime_start).total_seconds(), 0.0)})
    bars.sort(key=lambda b: (b["start"], b["number"]))
    workers = sorted({b["worker"] for b in bars})
    busy = {w: sum(b["seconds"] for b in bars if b["worker"] == w) for w in workers}
    return {"bars": bars, "workers": workers, "busy_seconds": busy}


def pareto_data(study: optuna.Study, objectives: Sequence[int] = (0, 1)) -> dict[str, Any]:
    """Multi-objective studies: two objectives of complete trials, Optuna's Pareto front marked."""
    names = frame.metric_names(study)
    if len(names) < 2:
        return {"names": names, "points": [], "note": "single-objective study"}
    i, j = objectives
    front = {t.number for t in study.best_trials}
    points = [{"number": t.number, "x": t.values[i], "y": t.values[j], "pareto": t.number in front,
               "quant_bits": frame.quant_bits_of(t)} for t in frame.complete_trials(study)]
    return {"names": [names[i], names[j]], "points": points, "front_numbers": sorted(front), "note": None}


def table_data(study: optuna.Study) -> dict[str, Any]:
    """The trials table (a pandas DataFrame), best first."""
    df = frame.trials_dataframe(study)
    if record.FAIL_REASON in df:  # kept whole in the trial; one line here
        df[record.FAIL_REASON] = df[record.FAIL_REASON].map(
            lambda reason: record.short_reason(reason) if isinstance(reason, str) else reason)
    names = frame.metric_names(study)
    if len(df) and df[names[0]].notna().any():
        df = df.sort_values(names[0], ascending=not frame.maximizing(study), na_position="last")
    return {"frame": df, "metric": names[0]}
