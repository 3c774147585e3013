"""Create, load and optimize studies. A worker is ``load_study`` + ``optimize``.

The study's ``n_trials`` is a *global* budget shared by every process working on it. A trial
uses the budget once it has started: RUNNING, COMPLETE, PRUNED and FAIL trials count (a
trial that failed because its worker died and was re-queued with the same parameters is
counted once, by its retry). The storage from :func:`lora_tune.study.storage.opening.open_storage`
enforces this under a cross-process lock, so a study ends with exactly ``n_trials`` trials
however many workers run it; :func:`optimize` returns when the budget is used up (other
workers' trials may still be running), when its own ``n_trials``/``timeout`` is reached, or
after ``study.max_consecutive_failures`` failed trials in a row in this process.
"""
from __future__ import annotations

import inspect
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from lora_tune.errors import ConfigError, StudyNotFoundError, StudySpecError
from lora_tune.study import _optuna_private as private
from lora_tune.study.trial import record
from lora_tune.study.trial.objective import Objective, TrialFailed
from lora_tune.study.trial.trial_process import prestart
from lora_tune.study.trial.nested_trials import nested_problems
from lora_tune.study.schema.serve_space import restriction_of, saved_modules_problems
from lora_tune.study.schema.space import SearchSpace, baseline_params
from lora_tune.study.run.lr_probe import enqueue_prior, ensure_probe, placed_spec, probe_problems
from lora_tune.study.run.samplers import SAMPLERS as _SAMPLERS
from lora_tune.study.run.samplers import make_sampler
from lora_tune.study.schema.spec import StudySpec, resolve_objective, spec_from_stored
from lora_tune.study.storage.budget import budget_used
from lora_tune.tasks import validate_task_spec
from lora_tune.tasks.allow_code import Allowance, same_task, trusted_refs
from lora_tune.tasks.base import raise_problems, structure_of

_logger = logging.getLogger("lora_tune.study")
Callback = Callable[[optuna.Study, FrozenTrial], None]
SERVE_REMOVED = "serve_removed"  # study attr: the lines of what study.serve removed from the space
# Parts of a stored spec that define what the trials mean; a resumed study must keep them.
_FROZEN_SECTIONS = ("task", "search_space", "train", "constraints")

_NOT_OPTIONS = {"seed", "search_space", "constraints_func", "independent_sampler", "source_trials",
                "mutation", "crossover", "elite_population_selection_strategy",
                "child_generation_strategy", "after_trial_strategy", "gamma", "weights"}


# -- samplers and pruners ------------------------------------------------------------------

def build_sampler(spec: StudySpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler the study file names, seeded with ``sampler.seed + seed_offset``."""
    s = spec.study.sampler
    problems = _option_problems("study.sampler", _SAMPLERS[s.type](), s.options)
    if s.type == "cmaes":
        if spec.study.metric is not None and isinstance(spec.study.metric, list) and len(spec.study.metric) > 1:
            problems.append(("study.sampler.type", "cmaes handles one objective only; use tpe, nsga2, gp or random"))
        try:
            import cmaes  # noqa: F401
        except ImportError:
            problems.append(("study.sampler.type", "cmaes needs the `cmaes` package: pip install cmaes"))
    if problems:
        raise StudySpecError(problems)
    seed = None if s.seed is None else s.seed + seed_offset
    if s.type == "grid":
        # GridSampler shuffles its grid with the seed and stores grid *indexes* on trials:
        # every worker must use the same seed, or an index names a different point in each.
        seed = s.seed
    kwargs = dict(s.options)
    if s.type == "grid":
        grid, grid_problems = SearchSpace.from_spec(spec.search_space).grid()
        if grid_problems:
            raise StudySpecError(grid_problems)
        if not grid:
            raise StudySpecError([("search_space", "the grid sampler needs at least one sampled parameter")])
        kwargs["search_space"] = grid
    try:
        return make_sampler(s.type, seed, kwargs)
    except (TypeError, ValueError) as exc:
        raise StudySpecError([("study.sampler.options", str(exc))]) from None


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner the study file names; none for multi-objective studies (Optuna cannot prune them)."""
    p = spec.study.pruner
    multi = isinstance(spec.study.metric, list) and len(spec.study.metric) > 1
    if p.type == "none" or multi:
        return optuna.pruners.NopPruner()
    evals = spec.train.epochs * spec.train.evals_per_epoch
    defaults: dict[str, dict[str, Any]] = {
        "median": {"n_startup_trials": 5, "n_warmup_steps": 1},
        "sha": {"min_resource": 1, "reduction_factor": 3},
        "hyperband": {"min_resource": 1, "max_resource": max(evals, 1), "reduction_factor": 3},
    }
    cls = {"median": optuna.pruners.MedianPruner, "sha": optuna.pruners.SuccessiveHalvingPruner,
           "hyperband": optuna.pruners.HyperbandPruner}[p.type]
    problems = _option_problems("study.pruner", cls, p.options)
    if problems:
        raise StudySpecError(problems)
    try:
        return cls(**{**defaults[p.type], **p.options})
    except (TypeError, ValueError) as exc:
        raise StudySpecError([("study.pruner.options", str(exc))]) from None


def _option_problems(path: str, cls: type, options: dict[str, Any]) -> list[tuple[str, str]]:
    allowed = [n for n, prm in inspect.signature(cls).parameters.items()
               if n not in _NOT_OPTIONS and prm.kind in (prm.KEYWORD_ONLY, prm.POSITIONAL_OR_KEYWORD)]
    return [(f"{path}.options.{k}", f"not an option of {cls.__name__}; allowed: {', '.join(allowed)}")
            for k in options if k not in allowed]


def pruning_warning(spec: StudySpec) -> str | None:
    if spec.is_multi_objective and spec.study.pruner.type != "none":
        return (f"pruning is disabled for multi-objective studies (pruner {spec.study.pruner.type!r} "
                "is ignored): Optuna cannot prune trials with several objectives")
    return None


# -- preparing a spec -------------------------------------------------------------------------

def prepare_spec(spec: StudySpec, task: Any = None) -> tuple[StudySpec, Any, dict[str, Any] | None]:
    """Check the spec against its task and fill in defaults, before anything is written.

    Returns ``(resolved spec, task, baseline params or None)``; raises StudySpecError with
    every problem (metric names, baseline outside the space, sampler/pruner options). The resolved
    spec's search space is the one ``study.serve``'s engine serves (:mod:`.serve_space`), so the
    study stores it and every trial, the baseline and warm starts are sampled from it.
    """
    if task is None:
        from lora_tune.tasks import build_task

        task = build_task(spec.resolved_task())
    source = spec._source
    try:
        resolved = resolve_objective(spec, task)
    except StudySpecError as exc:
        raise StudySpecError(exc.errors + _model_problems(spec, task), source=source) from None
    restriction = restriction_of(resolved)
    resolved = resolved.model_copy(update={"search_space": restriction.space})
    serve = resolved.study.serve
    problems = restriction.problems + saved_modules_problems(getattr(task, "modules_to_save", None) or [],
                                                             serve.engine, serve.rank_limit)
    baseline = None
    if resolved.study.baseline and not restriction.problems:
        space = SearchSpace.from_spec(resolved.search_space)
        baseline, baseline_problems = baseline_params(space, resolved.train.model_dump(), task.baseline_targets)
        problems += baseline_problems
    for build in (lambda: build_sampler(resolved), lambda: build_pruner(resolved)):
        try:
            build()
        except StudySpecError as exc:
            problems += exc.errors
    problems += _model_problems(resolved, task)
    problems += probe_problems(resolved, task)
    if problems:
        raise StudySpecError(problems, source=source)
    return resolved, task, baseline


def _model_problems(spec: StudySpec, task: Any) -> list[tuple[str, str]]:
    """What only the task's model can tell: every target and layers choice must match layers of it
    (:mod:`lora_tune.study.schema.space_coverage`), and the training device must exist here. Caught now, these
    would fail every trial later."""
    from lora_tune.study.schema.space_coverage import check_choices
    from lora_tune.train import resolve_device

    problems: list[tuple[str, str]] = []
    space = SearchSpace.from_spec(spec.search_space)
    try:
        device = resolve_device(spec.train.device)
    except ConfigError as exc:
        problems.append(("train.device", str(exc).split(": ", 1)[-1]))
        device = None
    if device is not None:
        problems += _device_problems(spec, space, task, device)
    choices = space.values_of("targets") or space.values_of("layers")
    model = None
    if spec.train.gradient_checkpointing:
        model = structure_of(task)
        if not getattr(model, "supports_gradient_checkpointing", False):
            problems.append(("train.gradient_checkpointing", f"got true; allowed: false for this task's "
                             f"{type(model).__name__} (only Hugging Face models that support it "
                             "can recompute activations)"))
    if choices:
        model = model if model is not None else structure_of(task)
        problems += check_choices(model, space)[1]
    problems += nested_problems(space, task, model)  # search_space.rank.nested against the model
    quantized = [b for b in space.values_of("quant_bits") if b in (4, 8)]
    if quantized:
        model = model if model is not None else structure_of(task)
        if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
            problems.append(("search_space.quant_bits", f"got {quantized}; allowed: null, 16 or 32 for this task's "
                             "model, whose weights are already quantized (its config.json has a "
                             "quantization_config)"))
    return problems


def _device_problems(spec: StudySpec, space: SearchSpace, task: Any, device: Any) -> list[tuple[str, str]]:
    """Precisions (fixed or searched) and the task's weight dtype that ``device`` cannot run."""
    import torch

    from lora_tune.train import resolve_precision

    problems: list[tuple[str, str]] = []
    searched = space.values_of("precision")
    for precision in searched or [spec.train.precision]:
        try:
            resolve_precision(precision, device)
        except ConfigError as exc:
            path = "search_space.precision" if searched else "train.precision"
            problems.append((path, str(exc).split(": ", 1)[-1]))
    dtype = getattr(task, "weight_dtype", None)
    if dtype == torch.float16 and device.type == "cpu":
        problems.append(("task.dtype", "got 'float16'; allowed: auto, bfloat16 or float32 on a CPU "
                         "(float16 weights need a CUDA device)"))
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        problems.append(("task.dtype", f"got 'bfloat16'; allowed: auto, float16 or float32 on "
                         f"{torch.cuda.get_device_name(device)}, which has no bfloat16 support"))
    return problems


# -- create / load ------------------------------------------------------------------------------

def create_study(spec: StudySpec, storage_url: str, name: str | None = None, resume: bool = False,
                 *, task: Any = None) -> optuna.Study:
    """Create the study (or, with ``resume``, reuse an existing one of that name).

    Everything is checked before the storage is opened, so an invalid file writes nothing.
    The validated spec is stored in the study (user attribute ``spec``) and, with
    ``study.baseline``, the conventional baseline is enqueued once.
    """
    from lora_tune import __version__
    from lora_tune.study.schema.space_coverage import coverage_attr, space_coverage
    from lora_tune.study.storage.opening import mask_url

    name = name or spec.study.name
    _check_name(name)
    resolved, task, baseline = prepare_spec(spec, task)
    storage = _open(storage_url, resolved)
    existing = optuna.get_all_study_names(storage)
    if name in existing:
        if not resume:
            raise ConfigError("study name", name, f"a name not already used in {mask_url(storage_url)}",
                              "Pass --resume to continue that study, or --name to pick another name.")
        stored = _stored_spec(storage, name, storage_url)
        # the learning_rate range a recorded probe placed is part of the stored spec (lr_probe.py)
        study_id = storage.get_study_id_from_name(name)
        resolved = placed_spec(resolved, storage.get_study_user_attrs(study_id).get(record.LR_PROBE))
        _check_resumable(stored, resolved, name)
    study = optuna.create_study(
        storage=storage, study_name=name, directions=resolved.directions,
        sampler=build_sampler(resolved), pruner=build_pruner(resolved), load_if_exists=resume,
    )
    study.set_user_attr("spec", resolved.to_stored())
    study.set_user_attr("metrics", resolved.metrics)
    study.set_user_attr("lora_tune_version", __version__)
    study.set_user_attr("target_coverage", coverage_attr(space_coverage(resolved, task)))
    removed = restriction_of(spec).removed  # what study.serve took out of the file's space
    if removed or SERVE_REMOVED not in study.user_attrs:
        study.set_user_attr(SERVE_REMOVED, removed)
    _record_artifact_dir(study, storage_url)
    if study.metric_names != resolved.metrics:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(resolved.metrics)
    if baseline is not None and not _has_baseline(study):
        study.enqueue_trial(baseline, user_attrs={record.IS_BASELINE: True})
        _baseline_grid_point(study)
    if resolved.study.warm_start == "defaults":  # with lr_probe on: after the probe, from its rate
        enqueue_prior(study, resolved, task)
    # an Optuna module first imported by the checks above (optuna.artifacts, a sampler's) may keep
    # an ImportError's traceback, and with it this frame and its task: the driver must not keep
    # the task's model for the whole study (isolation: process)
    private.drop_import_tracebacks()
    return study


def _record_artifact_dir(study: optuna.Study, storage_url: str) -> None:
    """Adapters of best trials go to an artifact store next to the storage (see artifacts.py)."""
    from lora_tune.study.trial.artifacts import default_artifact_dir, open_artifact_store

    directory = default_artifact_dir(storage_url)
    open_artifact_store(directory)  # creates it, or says clearly why it cannot
    if study.user_attrs.get("artifact_dir") != str(directory):
        study.set_user_attr("artifact_dir", str(directory))


def _baseline_grid_point(study: optuna.Study) -> None:
    """Give the enqueued baseline its grid index, so a grid search does not run that point twice.

    Optuna's GridSampler assigns grid indexes only to trials it samples itself; an enqueued
    trial would otherwise be evaluated again later as an ordinary grid point.
    """
    sampler = study.sampler
    if not isinstance(sampler, optuna.samplers.GridSampler):
        return
    waiting = [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
               if record.kind_of(t) == record.Kind.BASELINE]
    if not waiting:
        return
    index = private.grid_index(sampler, waiting[0].system_attrs.get(private.FIXED_PARAMS_KEY, {}))
    if index is not None:
        storage, trial_id = private.study_storage(study), private.trial_id(waiting[0])
        storage.set_trial_system_attr(trial_id, private.GRID_SPACE_KEY, private.grid_space(sampler))
        storage.set_trial_system_attr(trial_id, private.GRID_ID_KEY, index)


def load_study(name: str, storage_url: str, *, seed_offset: int = 0, allow_code: Sequence[str] = (),
               study_file: str | Path | None = None, check_code: bool = True) -> tuple[optuna.Study, StudySpec]:
    """Load a study by name; the spec comes from the study itself (a worker needs nothing else).

    ``seed_offset`` is added to the sampler seed: give each concurrent worker its own
    (e.g. its process id) so that they do not all propose the same parameters.

    The stored spec came from whoever could write the storage, so every importable name in
    its task section must be allowed by this process's operator (:mod:`lora_tune.tasks.allow_code`):
    ``study_file`` (the same task section as stored), ``allow_code`` patterns or
    ``$LORA_TUNE_ALLOW_CODE``; else :class:`~lora_tune.tasks.allow_code.CodeNotAllowed`, before
    anything is imported. ``check_code=False`` is for readers that never build the task
    (``study show``).
    """
    from lora_tune.study.storage.opening import dispose_storage, open_storage

    storage = open_storage(storage_url)
    try:
        spec = _stored_spec(storage, name, storage_url)
        if check_code:
            operator_allowance(spec, name, allow_code, study_file).check(spec.task, f"the stored study {name!r}")
        if study_file is not None:  # its operator's file: its folder's `file.py:function` names may be imported
            spec.trust_code_dir(Path(study_file).absolute().parent)
    except BaseException:
        dispose_storage(storage)
        raise
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=build_sampler(spec, seed_offset), pruner=build_pruner(spec))
    return study, spec


def operator_allowance(stored: StudySpec, name: str, allow_code: Sequence[str] = (),
                       study_file: str | Path | None = None) -> Allowance:
    """What this process's operator allowed the stored spec of study ``name`` to import.

    ``study_file`` is read as YAML only (nothing imported); its task section must equal the
    stored one, value for value, for its names to be trusted (ConfigError naming the keys
    that differ otherwise)."""
    trusted: frozenset[str] = frozenset()
    if study_file is not None:
        from lora_tune.study.schema.yaml_file import load_yaml, read_spec_text

        raw = load_yaml(read_spec_text(study_file), source=str(study_file))
        local = raw.get("task") if isinstance(raw, dict) else None
        if not isinstance(local, dict):
            raise ConfigError("--study-file", str(study_file), "a study file with a task section")
        differ = same_task(local, stored.task)
        if differ:
            raise ConfigError("--study-file", str(study_file), f"the study file study {name!r} was created from",
                              "its task section differs from the stored one at "
                              + ", ".join(f"task.{k}" for k in differ[:5])
                              + "; the stored study was changed after it was created, or this is another file")
        trusted = trusted_refs(local)
    return Allowance.from_operator(allow_code, trusted)


def _open(storage_url: str, spec: StudySpec) -> optuna.storages.BaseStorage:
    from lora_tune.study.storage.opening import open_storage

    return open_storage(storage_url)  # heartbeats and retries: the worker reads them from the study


def _stored_spec(storage: Any, name: str, storage_url: str) -> StudySpec:
    from lora_tune.study.storage.opening import mask_url

    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise StudyNotFoundError(name, mask_url(storage_url), sorted(names))
    attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    if "spec" not in attrs:
        raise ConfigError("study", name, "a study created by lora-tune (it has no stored study file)",
                          "Create it with `lora-tune study create STUDY.yaml`.")
    return spec_from_stored(attrs["spec"])


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name or ""):
        raise ConfigError("study name", name, "letters, digits, '.', '_' and '-' (starting with a letter or digit)")


def _check_resumable(stored: StudySpec, new: StudySpec, name: str) -> None:
    old_d, new_d = stored.to_stored(), new.to_stored()
    changed = [s for s in _FROZEN_SECTIONS if old_d.get(s) != new_d.get(s)]
    if stored.metrics != new.metrics or stored.directions != new.directions:
        changed.append("study.metric/direction")
    if changed:
        raise StudySpecError([(section, f"differs from the stored study {name!r}; its trials would not be "
                               "comparable. Use a new --name, or restore the original value")
                              for section in changed])


def _has_baseline(study: optuna.Study) -> bool:
    return record.find_baseline(study.get_trials(deepcopy=False)) is not None


# -- optimize ------------------------------------------------------------------------------------

@dataclass
class OptimizeResult:
    trials_run: int
    stop_reason: str  # "budget" | "n_trials" | "timeout" | "failures" | "interrupted" | "exhausted"
    seconds: float
    states: dict[str, int]


def optimize(study: optuna.Study, spec: StudySpec, n_trials: int | None = None, timeout: float | None = None,
             callbacks: Sequence[Callback] = (), *, task: Any = None,
             objective: Objective | None = None, reseed: bool = False,
             on_probe: Callable[[dict[str, Any]], None] | None = None) -> OptimizeResult:
    """Run trials in this process until the study's global budget is used up.

    ``n_trials`` / ``timeout`` (default: the file's ``study.timeout``) limit this process only.
    With ``study.lr_probe`` on and no probe recorded, the learning-rate probe runs first (where the
    trials train) and places the learning rates (:mod:`lora_tune.study.run.lr_probe`); ``on_probe``
    is called with what it recorded.
    With a storage from ``open_storage`` the trial loop is
    :func:`lora_tune.study.run.workers.run_worker` (exact budget across workers, waiting for
    other workers' running trials, SIGTERM handling); ``reseed`` gives this process its own
    random stream (for concurrent workers sharing a seeded sampler).
    """
    from lora_tune.study.storage.opening import OpenedStorage
    from lora_tune.study.run.workers import run_worker

    if objective is None:
        if spec.study.metric is None or (spec.study.direction is None and spec.study.directions is None):
            stored = study.user_attrs.get("spec")
            spec = spec_from_stored(stored) if stored else prepare_spec(spec, task)[0]
        objective = Objective(spec, task)
    spec = objective.spec
    if objective.isolation() == "none":
        objective.get_task()  # a bad task section fails here, not once per trial
    else:  # trials build the task in their own processes; check the section without loading it
        raise_problems(validate_task_spec(spec.resolved_task()), spec.task)
        prestart(spec.resolved_task())  # the trial process builds its task while the first trial is sampled
    objective, probed = ensure_probe(study, objective)  # before the sampler's first guess
    spec = objective.spec
    if probed is not None and on_probe is not None:
        on_probe(probed)
    timeout = timeout if timeout is not None else spec.study.timeout
    warning = pruning_warning(spec)
    if warning:
        _logger.warning(warning)
    counter = _RunCounter(spec.study.max_consecutive_failures)
    start = time.monotonic()
    if isinstance(private.study_storage(study), OpenedStorage):  # the budget is the stored study's
        stats = run_worker(
            study, objective, n_trials=n_trials, timeout=timeout,
            callbacks=[counter, *callbacks], catch=(TrialFailed,), reseed=reseed,
        )
        interrupted, budget_reached = stats.interrupted, stats.budget_reached
    else:  # a plain Optuna storage (e.g. in memory, one process): enforce the budget here
        remaining = max(0, spec.study.n_trials - _used(study))
        limit = remaining if n_trials is None else min(n_trials, remaining)
        if limit > 0:
            study.optimize(objective, n_trials=limit, timeout=timeout, catch=(TrialFailed,),
                           callbacks=[counter, *callbacks], gc_after_trial=True)
        interrupted, budget_reached = False, _used(study) >= spec.study.n_trials
    if counter.stopped:
        reason = "failures"
    elif interrupted:
        reason = "interrupted"
    elif budget_reached:
        reason = "budget"
    elif _grid_exhausted(study):
        reason = "exhausted"
    elif n_trials is not None and counter.ran >= n_trials:
        reason = "n_trials"
    else:
        reason = "timeout"
    return OptimizeResult(counter.ran, reason, time.monotonic() - start, dict(counter.states))


class _RunCounter:
    """Counts this process's trials; stops after too many consecutive failures."""

    def __init__(self, max_consecutive_failures: int):
        self.limit = max_consecutive_failures
        self.ran = 0
        self.failures_in_a_row = 0
        self.stopped = False
        self.states: dict[str, int] = {}

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.ran += 1
        self.states[trial.state.name] = self.states.get(trial.state.name, 0) + 1
        self.failures_in_a_row = self.failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.failures_in_a_row >= self.limit:
            self.stopped = True
            _logger.error("stopping: %d trials failed in a row (study.max_consecutive_failures); last reason: %s",
                          self.failures_in_a_row, record.short_reason(trial.user_attrs.get(record.FAIL_REASON, "?")))
            study.stop()


def _used(study: optuna.Study) -> int:
    return budget_used(study.get_trials(deepcopy=False))


def _grid_exhausted(study: optuna.Study) -> bool:
    sampler = study.sampler
    return isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study)
