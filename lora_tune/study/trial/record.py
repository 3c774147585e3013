"""The trial record: what a trial stores, and the one way trials and their compute are counted.

Every trial user attribute of docs/architecture.md ("Trial record", which describes the readers
below) is named here once. The stored names and value formats never change: studies written by
older versions read the same.
"""
from __future__ import annotations

import enum
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol
from collections.abc import Iterable, Mapping, Sequence

from optuna.trial import FrozenTrial, TrialState

from lora_tune.study.storage import marks

# -- the stored names ----------------------------------------------------------------------------
LORA_CONFIG, TARGET_PRESET, TARGET_MODULES = "lora_config", "target_preset", "target_modules"
TRAINABLE_PARAMS, ADAPTER_BYTES, WARNINGS = "trainable_params", "adapter_bytes", "warnings"
PEAK_MEMORY_BYTES, PEAK_MEMORY_TOTAL_BYTES = "peak_memory_bytes", "peak_memory_total_bytes"
TRAIN_SECONDS, THROUGHPUT = "train_seconds", "throughput"
SETUP_SECONDS = "setup_seconds"  # the trial's start -> its first optimizer step
BASE_LOAD = "base_load"  # how the trial got its base model: a BaseLoad value
TOKENS_PER_SECOND, TRAIN_TOKENS = "tokens_per_second", "train_tokens"
TRAIN_STEPS, PLANNED_STEPS, FIDELITY = "train_steps", "planned_steps", "fidelity"
METRIC_VALUES, EFFECTIVE_BATCH_SIZE = "metric_values", "effective_batch_size"
ISOLATION, OOM_RETRY, WORKER = "isolation", "oom_retry", "worker"
IS_BASELINE, PRUNE_IGNORED = "is_baseline", "prune_ignored"
DIVERGED = "diverged"  # a trial pruned because its training clearly failed: why (lora_tune.train.divergence)
FAIL_REASON, TRACEBACK = "fail_reason", "traceback"
TRIAL_LOG = "trial_log"  # library warnings and log records of the trial (kept here instead of printed)
CONSTRAINT_VIOLATION, ARTIFACT_ERROR = "constraint_violation", "artifact_error"
NESTED_PARENT = "nested_parent"  # a result scored from another trial's training: that trial's number
NESTED_RANKS = "nested_ranks"  # a nested trial: every rank it scored
NESTED_RANK_VALUES = "nested_rank_values"  # ... of a run outside a study (a confirmation): {rank: values}
CONFIRM_OF, SEED = "confirm_of", "seed"  # a confirmation run: the trial it repeats, its training seed
CONFIRM_SHARED = "confirm_shared"  # a confirmation run that read another run's training
WARM_START = "warm_start"  # an enqueued warm-start trial: where its config came from
ENQUEUED_PARAMS = "enqueued_params"  # ... and the parameters it was enqueued with
# a study attribute: the learning-rate probe run before the first trial (lora_tune.study.run.lr_probe),
# {"rate", "edge", "steps", "seconds", "losses", "rates", "compute", ...}; its compute counts in account
LR_PROBE = "lr_probe"
STUDY_ATTRS = (LR_PROBE,)  # the names above that are study attributes, not trial ones

# measurements of a training run, not of a result read off it (not copied onto nested results)
RUN_ONLY = (TRAIN_SECONDS, SETUP_SECONDS, THROUGHPUT, TOKENS_PER_SECOND, TRAIN_TOKENS, PEAK_MEMORY_BYTES,
            PEAK_MEMORY_TOTAL_BYTES, OOM_RETRY, TRACEBACK, FAIL_REASON, ARTIFACT_ERROR, CONSTRAINT_VIOLATION,
            METRIC_VALUES, NESTED_RANKS, TRIAL_LOG)

FAIL_REASON_LIMIT = 8000  # characters of a failure reason kept in the trial
SHORT_REASON_LIMIT = 300  # ... and shown on one line of output (short_reason)


class HasUserAttrs(Protocol):
    """A trial (frozen, running or fixed): anything with ``user_attrs``."""

    @property
    def user_attrs(self) -> dict[str, Any]: ...


def stored_reason(text: str) -> str:
    """A failure reason as the trial keeps it: whole (every line), up to :data:`FAIL_REASON_LIMIT`
    characters (the head and the tail of a longer one)."""
    return _head_and_tail(str(text).strip(), FAIL_REASON_LIMIT)


def short_reason(text: Any, limit: int = SHORT_REASON_LIMIT) -> str:
    """A stored reason (or any text) for one line of output: whitespace runs collapsed, the head
    and the tail of a long one (an exception's type is at the head, what to do often at the tail).
    The one place every display (``run``, ``study show``, the report's table) shortens a reason."""
    return _head_and_tail(" ".join(str(text).split()), limit)


def _head_and_tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    mark = f" [... {len(text) - limit} characters ...] "
    keep = max(limit - len(mark), 0)
    head = keep * 2 // 3
    return text[:head] + mark + text[len(text) - (keep - head):]


# -- kind ----------------------------------------------------------------------------------------------
class Kind(enum.Enum):
    BUDGET = "budget"  # one of the study's n_trials
    BASELINE = "baseline"  # the enqueued baseline (also in the budget)
    NESTED = "nested"  # a smaller rank scored from its parent's training
    CONFIRMATION = "confirmation"  # a config trained again with another seed


class BaseLoad(enum.Enum):
    """How a trial got its base model (``base_load``)."""

    BUILT = "built"  # built (or loaded and quantized) for this trial: the first of its variant in a process
    RESIDENT = "resident"  # the base kept in memory by this process across trials (lora_tune.tasks.resident)
    CACHE = "cache"  # read from the disk cache of quantized bases (lora_tune.tasks.base_cache)


def kind_of(trial: HasUserAttrs) -> Kind:
    """Which kind of result ``trial`` is: the one place that decides (see :class:`Kind`)."""
    attrs = trial.user_attrs
    if CONFIRM_OF in attrs:
        return Kind.CONFIRMATION
    if NESTED_PARENT in attrs:
        return Kind.NESTED
    return Kind.BASELINE if attrs.get(IS_BASELINE) else Kind.BUDGET


def in_budget(trial: HasUserAttrs) -> bool:
    """Whether ``trial`` is one of the study's ``n_trials`` (not a result added beside them)."""
    return kind_of(trial) in (Kind.BUDGET, Kind.BASELINE)


def trained(trial: HasUserAttrs) -> bool:
    """Whether ``trial`` ran training of its own (a nested result or a shared confirmation did not)."""
    return kind_of(trial) != Kind.NESTED and not trial.user_attrs.get(CONFIRM_SHARED)


def find_baseline(trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    """The baseline trial: the first complete one, else the first in any state (queued, failed)."""
    baselines = [t for t in trials if kind_of(t) == Kind.BASELINE]
    return next((t for t in baselines if t.state == TrialState.COMPLETE), baselines[0] if baselines else None)


def budget_used(trials: Sequence[FrozenTrial]) -> int:
    """Budget slots in use: started trials of the budget that are not retries of a failed one."""
    return sum(1 for t in trials if t.state != TrialState.WAITING and marks.RETRY_KEY not in t.system_attrs
               and in_budget(t))


def budget_done(trials: Sequence[FrozenTrial]) -> int:
    """Budget slots whose last trial finished (a slot with a retry queued or running is not done)."""
    finished = sum(1 for t in trials if t.state.is_finished() and in_budget(t))
    return finished - sum(1 for t in trials if marks.RETRY_KEY in t.system_attrs)


# -- fidelity and timings ------------------------------------------------------------------------------
class Fidelity(NamedTuple):
    """How much training a result stands for: its data fraction, steps run and planned, and for
    a nested-rank result its rank and the rank its parent trained."""

    data_fraction: float = 1.0
    steps: int | None = None
    planned_steps: int | None = None
    rank: int | None = None
    trained_rank: int | None = None

    def to_attr(self) -> dict[str, Any]:
        return {k: v for k, v in self._asdict().items() if v is not None}


def fidelity_of(trial: HasUserAttrs) -> Fidelity:
    """The trial's ``fidelity`` (steps from ``train_steps``/``planned_steps`` when it has none)."""
    attrs = trial.user_attrs
    stored = attrs.get(FIDELITY)
    stored = stored if isinstance(stored, dict) else {}
    fraction = _float(stored.get("data_fraction"))
    return Fidelity(fraction if fraction is not None and math.isfinite(fraction) else 1.0,
                    _int(attrs.get(TRAIN_STEPS, stored.get("steps"))),
                    _int(attrs.get(PLANNED_STEPS, stored.get("planned_steps"))),
                    _int(stored.get("rank")), _int(stored.get("trained_rank")))


class Timings(NamedTuple):
    """A training run's measured time (None when the trial has none: it did not train itself,
    or was recorded before lora-tune measured it)."""

    train_seconds: float | None
    throughput: float | None
    tokens_per_second: float | None
    train_tokens: int | None
    setup_seconds: float | None = None


def timings_of(trial: HasUserAttrs) -> Timings:
    attrs = trial.user_attrs
    return Timings(_float(attrs.get(TRAIN_SECONDS)), _float(attrs.get(THROUGHPUT)),
                   _float(attrs.get(TOKENS_PER_SECOND)), _int(attrs.get(TRAIN_TOKENS)),
                   _float(attrs.get(SETUP_SECONDS)))


def run_attrs(result: Any) -> dict[str, Any]:
    """The trial user attributes of a training run (a :class:`~lora_tune.train.TrainResult`)."""
    log = list(getattr(result, "log", None) or [])
    return {
        **({TRIAL_LOG: log} if log else {}),
        PEAK_MEMORY_BYTES: int(result.peak_memory_bytes),
        PEAK_MEMORY_TOTAL_BYTES: int(result.peak_memory_total_bytes),
        TRAIN_SECONDS: float(result.seconds),
        THROUGHPUT: float(result.throughput),
        TOKENS_PER_SECOND: float(result.tokens_per_second),
        TRAIN_TOKENS: int(result.tokens),
        TRAIN_STEPS: int(result.steps),
        PLANNED_STEPS: int(result.planned_steps),
        METRIC_VALUES: metric_values(result.final_metrics),
    }


def metric_values(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """``metric_values`` as stored: a non-finite value as its text (``"nan"``)."""
    return {k: float(v) if math.isfinite(float(v)) else str(float(v)) for k, v in metrics.items()}


def objective_value(name: str, metrics: Mapping[str, float], trainable: int) -> float:
    """The value of objective ``name``: a task metric, or the trainable parameters."""
    if name == TRAINABLE_PARAMS:
        return float(trainable)
    if name not in metrics:
        raise KeyError(f"the task did not report metric {name!r}; it reported {sorted(metrics)}")
    return float(metrics[name])


# -- compute and counts ----------------------------------------------------------------------------------
def trial_compute(trial: FrozenTrial) -> float:
    """Full-trial equivalents ``trial`` trained: its share of planned steps times its data
    fraction (0 for a result that trained nothing of its own)."""
    if not trained(trial):
        return 0.0
    f = fidelity_of(trial)
    if f.steps is not None and f.planned_steps:
        share = min(1.0, f.steps / f.planned_steps)
    else:  # failed before training, or pruned as infeasible: no training compute
        share = 1.0 if trial.state == TrialState.COMPLETE else 0.0
    return share * f.data_fraction


@dataclass(frozen=True)
class Account:
    """A study's trials and compute, counted once: a result that trained nothing of its own counts
    as a result, its training once, with the trial that ran it."""

    states: Mapping[str, int]  # every stored trial, by state name
    done: int  # budget slots done (:func:`budget_done`)
    requeued: int  # finished trials that ran a failed trial's parameters again
    results: int  # finished results: trials, nested-rank results, confirmation runs
    used: float  # full-trial equivalents trained
    confirm: float  # ... of which by confirmation runs
    steps_run: int  # optimizer steps of the finished trials that trained
    steps_saved: int  # steps their pruned trials did not run
    counted: int  # trials that trained and recorded their steps
    pruned: int  # ... of which pruned
    seconds_saved: float  # estimated from each pruned trial's seconds per step
    timed: int = 0  # finished trials that trained and recorded both their setup and training seconds
    setup_seconds: float = 0.0  # ... their setup (start -> first optimizer step), in all
    train_seconds: float = 0.0  # ... their training, in all
    probe: float = 0.0  # full-trial equivalents of the learning-rate probe (in ``used`` too)

    @property
    def saved(self) -> float:
        """The share of compute that pruning, nesting and data fractions saved against training
        every result fully (the probe, which is no result, left out)."""
        return 1.0 - (self.used - self.probe) / self.results if self.results else 0.0

    @property
    def mean_setup_seconds(self) -> float | None:
        return self.setup_seconds / self.timed if self.timed else None

    @property
    def mean_train_seconds(self) -> float | None:
        return self.train_seconds / self.timed if self.timed else None

    def time_line(self) -> str | None:
        """Mean setup and training seconds per trial (None when no trial recorded both)."""
        if not self.timed:
            return None
        return (f"setup {self.mean_setup_seconds:.2f} s, training {self.mean_train_seconds:.2f} s per trial "
                f"(mean of {self.timed} trial{'s' if self.timed != 1 else ''})")

    def compute_line(self) -> str:
        parts = [f"{self.saved:.0%} saved by pruning, nesting and data fractions"]
        if self.confirm:
            parts.append(f"{self.confirm:.1f} of it on confirmation runs")
        if self.probe:
            parts.append(f"{self.probe:.1f} of it on the learning-rate probe")
        return f"{self.used:.1f} full-trial equivalents for {self.results} results ({'; '.join(parts)})"


class HasTrialsAndAttrs(Protocol):
    """A study (``optuna.Study``): its trials and its user attributes."""

    @property
    def user_attrs(self) -> dict[str, Any]: ...

    def get_trials(self, deepcopy: bool = ...) -> list[FrozenTrial]: ...


def study_account(study: HasTrialsAndAttrs) -> Account:
    """The one account of a study: its trials and its learning-rate probe (every display uses this)."""
    return account(study.get_trials(deepcopy=False), probe_compute(study.user_attrs))


def probe_compute(study_attrs: Mapping[str, Any]) -> float:
    """Full-trial equivalents the study's learning-rate probe trained (:data:`LR_PROBE`; 0 without
    one): its optimizer steps over the steps of a whole trial, as the probe recorded them."""
    probe = study_attrs.get(LR_PROBE)
    value = _float(probe.get("compute")) if isinstance(probe, Mapping) else None
    return value if value is not None and math.isfinite(value) and value > 0 else 0.0


def account(trials: Sequence[FrozenTrial], probe: float = 0.0) -> Account:
    """Count ``trials`` (every trial of a study) as :class:`Account` says; ``probe``: the study's
    learning-rate probe in full-trial equivalents (:func:`probe_compute`; :func:`study_account`)."""
    used, confirm, seconds_saved, setup_seconds, train_seconds = probe, 0.0, 0.0, 0.0, 0.0
    results = steps_run = steps_saved = counted = pruned = timed = 0
    for t in trials:
        if not t.state.is_finished():
            continue
        results += 1
        if not trained(t):
            continue
        share = trial_compute(t)
        used += share
        confirm += share if kind_of(t) == Kind.CONFIRMATION else 0.0
        timings = timings_of(t)
        if timings.setup_seconds is not None and timings.train_seconds is not None:
            timed += 1
            setup_seconds += timings.setup_seconds
            train_seconds += timings.train_seconds
        f = fidelity_of(t)
        if f.steps is None:
            continue
        counted += 1
        steps_run += f.steps
        if t.state == TrialState.PRUNED and f.planned_steps is not None:
            pruned += 1
            skipped = max(f.planned_steps - f.steps, 0)
            steps_saved += skipped
            seconds = timings.train_seconds
            seconds_saved += seconds / f.steps * skipped if seconds is not None and f.steps > 0 else 0.0
    requeued = sum(1 for t in trials if marks.RETRY_KEY in t.system_attrs and t.state.is_finished())
    return Account(dict(Counter(t.state.name for t in trials)), budget_done(trials), requeued, results, used,
                   confirm, steps_run, steps_saved, counted, pruned, seconds_saved,
                   timed=timed, setup_seconds=setup_seconds, train_seconds=train_seconds, probe=probe)


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None
