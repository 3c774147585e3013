"""The learning-rate probe (``study.lr_probe``): before the sampler's first guess, a short
learning-rate range test on the task places the study's learning rates.

* **What runs.** One adapter of the space's middle values (:func:`probe_plan`: the middle rank,
  alpha or alpha ratio, targets choice and every other sampled key's middle choice, or the value
  the space fixes) trains ``lr_probe.steps`` optimizer steps (default 30) at rates growing
  exponentially from :data:`SWEEP` ``[0]`` to ``[1]``, on the first ``lr_probe.data_share`` (default
  0.25) of an epoch's batches; batch size, accumulation, precision, clipping and optimizer are the
  study's. The rule (:mod:`lora_tune.train.lr_range`): the **edge** is the rate whose update led
  to the minimum of the smoothed training loss (the largest rate at which the loss still falls);
  the probe's **rate** is the edge / 10.
* **Where and when.** Where the trials train: in the driver with ``isolation: none``, else in the
  driver's trial process (:func:`lora_tune.study.trial.trial_process.call_in_child`), so the driver
  never loads the model. Once per study: the first worker that optimizes a study with
  ``lr_probe`` on and no probe recorded runs it under the study lock, so workers starting together
  wait for that one probe.
* **What it places.** The study attribute ``lr_probe`` (:data:`lora_tune.study.trial.record.LR_PROBE`)
  records it; its steps count in the study's compute (``compute``: its steps over a whole trial's).
  With ``lr_probe.range: [a, b]`` the search space's ``learning_rate`` range becomes
  ``[a × rate, b × rate]`` in the stored spec (the file's range kept in the attribute, and a
  resumed study's file read with the same range: :func:`placed_spec`); without it the file's range
  stays. The warm-start prior (``warm_start: defaults``) is enqueued after the probe with rates
  from it (:func:`lora_tune.study.run.warm_start.probe_prior`), and a prior config whose rate times
  its scale passes the edge times the probe's scale is dropped.

A probe that fails is recorded with its ``error``; the study goes on with the file's range and no
warm-start prior.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterator, Mapping

import optuna

from lora_tune.study import _optuna_private as private
from lora_tune.study.schema.space import TRAIN_KEYS, Param, SearchSpace
from lora_tune.study.schema.spec import StudySpec
from lora_tune.study.trial import record
from lora_tune.train.train_config import torch_threads

_logger = logging.getLogger("lora_tune.study")

SWEEP = (1e-5, 1.0)  # the rates the probe sweeps, low to high (it stops once the loss has clearly diverged)
RATE_KEY = "learning_rate"


@dataclass
class ProbePlan:
    """What the probe trains, picklable (sent to the trial process)."""

    lora: dict[str, Any]
    train: Any  # lora_tune.train.TrainConfig, learning rate set by the sweep
    rates: list[float]
    data_share: float
    threads: int | None = None

    @property
    def scale(self) -> float:
        from lora_tune.study.run.warm_start import config_scale

        return config_scale(self.lora)


# -- the plan ------------------------------------------------------------------------------------------

def probe_plan(spec: StudySpec) -> ProbePlan:
    """The probe of ``spec`` (``study.lr_probe`` on): the space's middle values (see the module)."""
    settings = spec.study.lr_probe
    if settings is None:
        raise ValueError("the study has no lr_probe")
    space = SearchSpace.from_spec(spec.search_space)
    middle = {p.name: _middle(p) for p in space.params if p.sampled or p.kind == "nested"}
    values = space.sample(optuna.trial.FixedTrial(middle))
    lora = {k: v for k, v in values.items() if k not in TRAIN_KEYS}
    train_values = {k: v for k, v in values.items() if k in TRAIN_KEYS and k != RATE_KEY}
    train = spec.train.train_config(**train_values, data_fraction=1.0)
    from lora_tune.train.lr_range import sweep_rates

    return ProbePlan(lora, train, sweep_rates(SWEEP[0], SWEEP[1], settings.steps), settings.data_share,
                     spec.train.threads)


def _middle(p: Param) -> Any:
    """The middle value of a sampled parameter (as a trial stores it): the middle choice (the
    lower of two middles), the middle of a range (geometric for a log range)."""
    if p.kind in ("categorical", "ratio", "nested"):
        return p.choices[(len(p.choices) - 1) // 2]
    low, high = float(p.low), float(p.high)
    mid = math.sqrt(low * high) if p.log and low > 0 else (low + high) / 2
    if p.step:
        mid = low + round((mid - low) / p.step) * p.step
    return int(round(mid)) if p.kind == "int" else mid


def probe_problems(spec: StudySpec, task: Any) -> list[tuple[str, str]]:
    """What stops ``spec``'s probe on ``task``, before anything is written."""
    settings = spec.study.lr_probe
    if settings is None:
        return []
    problems: list[tuple[str, str]] = []
    if getattr(task, "train_adapted", None) is not None or getattr(task, "adapt", None) is not None:
        problems.append(("study.lr_probe", f"got on; allowed: false for a {getattr(task, 'name', 'task')!r} task, "
                         "which trains with its own trainer (the probe trains with lora-tune's loop)"))
    rate = SearchSpace.from_spec(spec.search_space)[RATE_KEY]
    if settings.range is not None and (rate is None or rate.kind != "float"):
        problems.append(("study.lr_probe.range", f"got {settings.range}; allowed: null when "
                         "search_space.learning_rate is not a range {low, high} (nothing to place)"))
    elif settings.range is not None and spec.study.sampler.type == "grid":
        problems.append(("study.lr_probe.range", f"got {settings.range}; allowed: null with the grid sampler, "
                         "whose grid is fixed when the study is created"))
    return problems


# -- running it ------------------------------------------------------------------------------------------

def run_probe(task: Any, plan: ProbePlan) -> dict[str, Any]:
    """The probe on ``task`` (in the process where trials train): lease the base, inject the plan's
    adapter, sweep (:func:`lora_tune.train.lr_range.range_test`), give the base back. Returns the
    measurements: the sweep, ``full_steps`` (a whole trial's steps) and the task's ``model_kind``."""
    import warnings

    import torch

    from lora_tune import LoraConfig, inject
    from lora_tune.tasks.base import give_back_base, lease_base
    from lora_tune.train import resolve_device
    from lora_tune.train.loop import planned_steps
    from lora_tune.train.lr_range import range_test

    config = LoraConfig(**plan.lora, modules_to_save=list(getattr(task, "modules_to_save", None) or []))
    with torch_threads(plan.threads):
        model, _how = lease_base(task, config, resolve_device(plan.train.device))
        clean = True
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                torch.manual_seed(plan.train.seed)
                warnings.filterwarnings("ignore", message="rank .* is larger than min", category=UserWarning)
                inject(model, config)
            test = range_test(model, task, plan.train, plan.rates, plan.data_share)
        except torch.OutOfMemoryError:
            clean = False  # a CUDA kernel may have stopped half-way: the base is not trusted
            raise
        finally:
            give_back_base(task, model, clean)
    return {"test": test, "full_steps": planned_steps(int(task.num_train_examples()), plan.train),
            "model_kind": getattr(task, "model_kind", None)}


def measure(spec: StudySpec, objective: Any) -> dict[str, Any]:
    """Run the probe where ``objective``'s trials train; the study attribute it records (an
    ``error`` instead when it failed)."""
    plan = probe_plan(spec)
    start = time.perf_counter()
    try:
        if objective.isolation() == "process":
            from lora_tune.study.trial.trial_process import call_in_child

            measured = call_in_child(spec.resolved_task(), run_probe, plan)
        else:
            measured = run_probe(objective.get_task(), plan)
    except Exception as exc:  # noqa: BLE001 - recorded; the trials say the rest
        reason = record.short_reason(f"{type(exc).__name__}: {exc}")
        _logger.warning("the learning-rate probe failed (%s); the study keeps its file's learning_rate range "
                        "and enqueues no warm-start prior", reason)
        return {"error": reason, "seconds": time.perf_counter() - start, "config": _config_attr(plan)}
    test, full = measured["test"], max(1, int(measured["full_steps"]))
    return {
        "rate": test.rate, "edge": test.edge, "falls": test.falls, "steps": test.steps,
        "planned_steps": len(plan.rates), "seconds": time.perf_counter() - start, "compute": test.steps / full,
        "full_trial_steps": full, "data_share": plan.data_share, "stopped": test.stopped,
        "rates": [float(r) for r in test.rates], "losses": [float(v) for v in test.losses],
        "config": _config_attr(plan), "scale": plan.scale, "model_kind": measured.get("model_kind"),
    }


def _config_attr(plan: ProbePlan) -> dict[str, Any]:
    return {k: v for k, v in plan.lora.items() if isinstance(v, (str, int, float, bool, type(None)))}


# -- placing the range -------------------------------------------------------------------------------------

def place(probe: Mapping[str, Any] | None, spec: StudySpec) -> dict[str, Any] | None:
    """``probe`` with the range it places for ``spec`` (``range``, the file's in ``file_range``);
    None when it has no rate."""
    if not probe or not isinstance(probe.get("rate"), (int, float)):
        return None
    out = dict(probe)
    settings = spec.study.lr_probe
    current = spec.search_space.get(RATE_KEY)
    if settings is not None and settings.range is not None and isinstance(current, Mapping) and "low" in current:
        low, high = (float(probe["rate"]) * m for m in settings.range)
        out["file_range"] = [float(current["low"]), float(current["high"])]
        out["range"] = [_round(low), _round(high)]
    return out


def placed_spec(spec: StudySpec, probe: Mapping[str, Any] | None) -> StudySpec:
    """``spec`` with the ``learning_rate`` range a recorded probe placed (``spec`` itself when it
    placed none): what the study stores and samples from, and what a resumed study's file is
    compared with."""
    current = spec.search_space.get(RATE_KEY)
    placed = probe.get("range") if isinstance(probe, Mapping) else None
    if not (isinstance(placed, list) and len(placed) == 2 and isinstance(current, Mapping) and "low" in current):
        return spec
    space = {**spec.search_space, RATE_KEY: {**current, "low": float(placed[0]), "high": float(placed[1])}}
    return spec.model_copy(update={"search_space": space})


def _round(value: float) -> float:
    """Three significant digits: a range a person can read in the stored spec."""
    return float(f"{value:.3g}")


def ensure_probe(study: optuna.Study, objective: Any) -> tuple[Any, dict[str, Any] | None]:
    """Before the first trial: run the probe when ``objective.spec`` asks for one and the study has
    none recorded. Returns the objective to optimize with (its spec's range placed by the study's
    probe, if any) and the probe when this call ran it (else None)."""
    spec = objective.spec
    probe = study.user_attrs.get(record.LR_PROBE)
    ran = None
    if probe is None and spec.study.lr_probe is not None:
        with _study_lock(study):
            probe = study.user_attrs.get(record.LR_PROBE)  # another worker's, recorded while this one waited
            if probe is None:
                measured = measure(spec, objective)
                ran = probe = place(measured, spec) or measured
                study.set_user_attr(record.LR_PROBE, probe)
                stored = study.user_attrs.get("spec")
                if isinstance(stored, dict) and "range" in probe:
                    from lora_tune.study.schema.spec import spec_from_stored

                    study.set_user_attr("spec", placed_spec(spec_from_stored(stored), probe).to_stored())
                    _baseline_into_range(study, spec, probe["range"])
        if ran is not None:
            enqueue_prior(study, placed_spec(spec, probe), None)
    placed = placed_spec(spec, probe)
    if placed is not spec:
        objective = dataclasses.replace(objective, spec=placed)
    return objective, ran


def _baseline_into_range(study: optuna.Study, spec: StudySpec, placed: list[float]) -> None:
    """The queued baseline's learning rate as :func:`~lora_tune.study.schema.space.baseline_params`
    gives it in the placed space: ``train.learning_rate`` clamped into the range."""
    from optuna.trial import TrialState

    storage = private.study_storage(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        fixed = dict(trial.system_attrs.get(private.FIXED_PARAMS_KEY) or {})
        if record.kind_of(trial) != record.Kind.BASELINE or RATE_KEY not in fixed:
            continue
        fixed[RATE_KEY] = min(max(float(spec.train.learning_rate), placed[0]), placed[1])
        storage.set_trial_system_attr(private.trial_id(trial), private.FIXED_PARAMS_KEY, fixed)


@contextlib.contextmanager
def _study_lock(study: optuna.Study) -> Iterator[None]:
    """The study's lock across processes (:mod:`lora_tune.study.storage.locks`), when its storage
    has one; else nothing (a storage in memory: one process)."""
    from lora_tune.study.storage.budget import BudgetedStorage
    from lora_tune.study.storage.wrapper import StorageWrapper

    storage = private.study_storage(study)
    layer = storage.layer(BudgetedStorage) if isinstance(storage, StorageWrapper) else None
    if layer is None:
        yield
        return
    with layer.locks.hold(private.study_id(study)):
        yield


# -- the warm-start prior ----------------------------------------------------------------------------------

def enqueue_prior(study: optuna.Study, spec: StudySpec, task: Any) -> int:
    """Enqueue ``warm_start: defaults``'s prior: from the study's probe when it has one (rates from
    its rate and scale; configs past its edge dropped); none while a probe is still to run or
    when it failed; else today's rates by the task's model kind. Returns how many were enqueued."""
    from lora_tune.study.run.warm_start import prior, probe_prior, warm_start
    from lora_tune.tasks.base import Task

    if spec.study.warm_start != "defaults":
        return 0
    probe = study.user_attrs.get(record.LR_PROBE)
    space = SearchSpace.from_spec(spec.search_space)
    if isinstance(probe, Mapping) and "rate" in probe:
        configs = probe_prior(float(probe["rate"]), float(probe["scale"]))
        return warm_start(study, space, configs, task, origin="defaults (lr probe)",
                          keep=within_edge(space, spec, float(probe["edge"]), float(probe["scale"])))
    if probe is not None or spec.study.lr_probe is not None:
        return 0  # the probe enqueues it once it has run; a failed probe: no prior
    return warm_start(study, space, prior(getattr(task, "model_kind", Task.model_kind)), task, origin="defaults")


def within_edge(space: SearchSpace, spec: StudySpec, edge: float, scale: float) -> Callable[[dict[str, Any]], bool]:
    """``keep(params)``: whether a config's learning rate times its effective scale stays within the
    probe's ``edge`` times the probe adapter's ``scale`` (the same step size, which the probe's loss
    still fell at)."""
    from lora_tune.study.run.warm_start import config_scale

    def keep(params: dict[str, Any]) -> bool:
        values = space.sample(_Known(params))
        rate = float(values.get(RATE_KEY, spec.train.learning_rate))
        return rate * config_scale(values) <= edge * scale * (1 + 1e-9)

    return keep


class _Known:
    """A trial answering from ``params`` where it has them, else with the low end / first choice
    (a projected config may leave out keys it has no value for)."""

    def __init__(self, params: Mapping[str, Any]):
        self.params = params

    def suggest_int(self, name: str, low: int, high: int, **_: Any) -> int:
        return int(self.params.get(name, low))

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return float(self.params.get(name, low))

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self.params.get(name, choices[0])


# -- what it says ------------------------------------------------------------------------------------------

def describe_settings(spec: StudySpec) -> str:
    """One line on ``study.lr_probe`` for ``validate``: on or off, what it will run, what it places."""
    settings = spec.study.lr_probe
    if settings is None:
        return "lr_probe: off"
    placed = (f"the learning_rate range placed at [{settings.range[0]:g}, {settings.range[1]:g}] x its rate"
              if settings.range is not None else "the file's learning_rate range kept")
    prior = "; the warm-start prior's rates from it" if spec.study.warm_start == "defaults" else ""
    return (f"lr_probe: on, runs before the first trial ({settings.steps} steps at rates {SWEEP[0]:g} to "
            f"{SWEEP[1]:g} on {settings.data_share:.0%} of the training data); {placed}{prior}")


def describe(probe: Mapping[str, Any] | None) -> str | None:
    """One line on a recorded probe for ``run`` and ``study show``; None without one."""
    if not isinstance(probe, Mapping):
        return None
    if "error" in probe:
        return f"lr probe: failed ({probe['error']}); the file's learning_rate range was kept"
    text = (f"lr probe: rate {probe['rate']:.3g} (loss fell up to {probe['edge']:.3g}; {probe['steps']} steps, "
            f"{float(probe.get('seconds', 0.0)):.1f} s, {float(probe.get('compute', 0.0)):.2f} full-trial equivalents)")
    if not probe.get("falls", True):
        text += "; the loss did not fall at any rate of the sweep"
    if isinstance(probe.get("range"), list):
        low, high = probe["range"]
        text += f"; learning_rate searched in [{low:.3g}, {high:.3g}]"
    return text
