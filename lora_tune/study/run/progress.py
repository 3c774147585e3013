"""What a study did: live progress while it runs, and its outcome (plain data, drawn with rich)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lora_tune.study.run.lr_probe import describe as describe_probe
from lora_tune.study.trial import record
from lora_tune.study.schema.spec import StudySpec


@dataclass
class Outcome:
    """Counts and compute (:func:`lora_tune.study.trial.record.account`), best trial(s) and the
    (complete) baseline of a study."""

    name: str
    metrics: list[str]
    directions: list[str]
    budget: int
    account: record.Account
    best: list[FrozenTrial] = field(default_factory=list)  # one, or the Pareto front
    baseline: FrozenTrial | None = None
    probe: str | None = None  # the learning-rate probe, one line (lora_tune.study.run.lr_probe.describe)

    @property
    def counts(self) -> Mapping[str, int]:
        return self.account.states

    @property
    def finished(self) -> int:
        """Budget slots done (a failed trial whose parameters ran again counts once)."""
        return self.account.done

    @property
    def gain(self) -> float | None:
        """Improvement of the best trial over the baseline, in the objective's direction."""
        if len(self.metrics) != 1 or not self.best or self.baseline is None:
            return None
        best, base = self.best[0].value, self.baseline.value
        return (best - base) if self.directions[0] == "maximize" else (base - best)

    @property
    def relative_gain(self) -> float | None:
        gain = self.gain
        if gain is None or not self.baseline.value:
            return None
        return gain / abs(self.baseline.value)


def study_outcome(study: optuna.Study, spec: StudySpec) -> Outcome:
    trials = study.get_trials(deepcopy=False)
    best: list[FrozenTrial] = []
    if any(t.state == TrialState.COMPLETE for t in trials):
        try:
            best = [study.best_trial] if len(spec.metrics) == 1 else sorted(study.best_trials, key=lambda t: t.number)
        except ValueError:  # no feasible trial
            best = []
    baseline = record.find_baseline(trials)
    return Outcome(study.study_name, spec.metrics, spec.directions, spec.study.n_trials, record.study_account(study),
                   best, baseline if baseline is not None and baseline.state == TrialState.COMPLETE else None,
                   describe_probe(study.user_attrs.get(record.LR_PROBE)))


# -- live progress ---------------------------------------------------------------------------

class StudyProgress:
    """A rich progress bar (trial n/N, best so far, pruned/failed counts, ETA) plus one line
    per finished trial. Use as a context manager; the instance is an Optuna callback."""

    def __init__(self, study: optuna.Study, spec: StudySpec, console: Console | None = None):
        self.study, self.spec = study, spec
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]trial[/]"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[best]}"), TextColumn("pruned {task.fields[pruned]}"),
            TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.task_id: Any = None

    def __enter__(self) -> StudyProgress:
        self.progress.__enter__()
        outcome = study_outcome(self.study, self.spec)
        self.task_id = self.progress.add_task(
            "study", total=outcome.budget, completed=outcome.finished,
            best=_best_text(outcome), pruned=outcome.counts.get("PRUNED", 0), failed=outcome.counts.get("FAIL", 0),
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        outcome = study_outcome(study, self.spec)
        self.progress.console.print(trial_line(trial, outcome), markup=False)
        self.progress.update(
            self.task_id, completed=min(outcome.finished, outcome.budget), best=_best_text(outcome),
            pruned=outcome.counts.get("PRUNED", 0), failed=outcome.counts.get("FAIL", 0),
        )


def trial_line(trial: FrozenTrial, outcome: Outcome) -> str:
    """One line for a finished trial: number, state, value(s), key parameters and why."""
    head = f"trial {trial.number:>3} {trial.state.name.lower():<8}"
    if trial.state == TrialState.COMPLETE:
        vals = ", ".join(f"{m} {_fmt(v)}" for m, v in zip(outcome.metrics, trial.values or []))
    elif trial.state == TrialState.PRUNED:
        steps = trial.intermediate_values
        last = steps[max(steps)] if steps else None
        reason = trial.user_attrs.get(record.CONSTRAINT_VIOLATION)
        vals = reason or (f"at eval {max(steps)}: {outcome.metrics[0]} {_fmt(last)}" if steps else "")
    else:
        vals = record.short_reason(trial.user_attrs.get(record.FAIL_REASON, "failed"))
    tag = " [baseline]" if record.kind_of(trial) == record.Kind.BASELINE else ""
    params = " ".join(f"{k}={_param_text(k, v)}" for k, v in trial.params.items())
    return f"{head} {vals}  {params}{tag}"


def _param_text(key: str, value: Any) -> str:
    if key == "quant_bits" and value in (0, None):
        return "none"
    return _fmt(value)


def _best_text(outcome: Outcome) -> str:
    if not outcome.best:
        return "best -"
    if len(outcome.metrics) > 1:
        return f"pareto {len(outcome.best)}"
    return f"best {outcome.metrics[0]} {_fmt(outcome.best[0].value)}"


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if (abs(v) < 1e-3 or abs(v) >= 1e5) and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    if isinstance(v, int) and abs(v) >= 1_000:
        return f"{v:,}"
    return str(v)


# -- end-of-study and inspection tables ----------------------------------------------------------

def render_outcome(outcome: Outcome, console: Console) -> None:
    a, c = outcome.account, outcome.counts
    console.print(
        f"[bold]{outcome.name}[/]: {a.done}/{outcome.budget} trials finished "
        f"({c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0)} failed"
        + (f", of which {a.requeued} ran again)" if a.requeued else ")")
    )
    console.print(f"compute: {a.compute_line()}", markup=False)
    if outcome.probe is not None:
        console.print(outcome.probe, markup=False)
    if a.time_line() is not None:
        console.print(f"time: {a.time_line()}", markup=False)
    if not outcome.best:
        console.print("no completed feasible trial yet")
        return
    base = outcome.baseline
    if len(outcome.metrics) == 1:
        best = outcome.best[0]
        metric = outcome.metrics[0]
        console.print(f"best trial #{best.number}: {metric} {_fmt(best.value)}")
        if base is not None:
            rel = outcome.relative_gain
            rel_text = f", {rel:+.1%}" if rel is not None else ""
            console.print(f"baseline trial #{base.number}: {metric} {_fmt(base.value)}  "
                          f"(gain {outcome.gain:+.4f}{rel_text})")
        else:
            console.print("baseline: none completed (set study.baseline: true to compare)")
    else:
        console.print(f"Pareto front ({len(outcome.best)} trials):")
        if base is not None:
            console.print(f"baseline trial #{base.number}: " + ", ".join(
                f"{m} {_fmt(v)}" for m, v in zip(outcome.metrics, base.values)))
    console.print(trials_table(outcome.best, outcome.metrics, title="best"))


def trials_table(trials: list[FrozenTrial], metrics: list[str], title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    param_names: list[str] = []
    for t in trials:
        param_names += [k for k in t.params if k not in param_names]
    for col in ["#", "state", *metrics, *param_names, "trainable", "setup s", "train s"]:
        table.add_column(col, justify="right" if col not in ("state", "targets") else "left")
    for t in trials:
        values = t.values if t.values is not None else [None] * len(metrics)
        if t.state == TrialState.PRUNED and t.intermediate_values and len(metrics) == 1:
            values = [t.intermediate_values[max(t.intermediate_values)]]
        row = [str(t.number) + ("*" if record.kind_of(t) == record.Kind.BASELINE else ""), t.state.name.lower()]
        row += [_fmt(v) for v in values]
        row += [_param_text(k, t.params[k]) if k in t.params else "" for k in param_names]
        timings = record.timings_of(t)
        row += [_fmt(t.user_attrs.get(record.TRAINABLE_PARAMS)),
                *("" if seconds is None else f"{seconds:.1f}" for seconds in (timings.setup_seconds,
                                                                              timings.train_seconds))]
        table.add_row(*row)
    return table


def top_trials(study: optuna.Study, spec: StudySpec, limit: int) -> list[FrozenTrial]:
    """Completed trials best first (single objective) or the Pareto front, then the rest by number."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(spec.metrics) == 1:
        reverse = spec.directions[0] == "maximize"
        feasible = [t for t in complete if all(v <= 0 for v in t.constraints.values())]
        ranked = sorted(feasible, key=lambda t: t.value, reverse=reverse)
    else:
        ranked = sorted(study.best_trials, key=lambda t: t.number) if complete else []
    rest = [t for t in trials if t not in ranked and t.state != TrialState.WAITING]
    return (ranked + rest)[:limit]
