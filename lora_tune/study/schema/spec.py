"""The study file: its schema (pydantic, unknown keys forbidden) and its loading. Every problem
is raised at once as a StudySpecError with its path (``search_space.rank.low: must be ≥ 1``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from collections.abc import Mapping

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, create_model,
    field_validator, model_validator,
)

from lora_tune import serving
from lora_tune.errors import StudySpecError, short
from lora_tune.settings import Setting, defaults_of, setting, settings_of
from lora_tune.study.schema.yaml_file import load_yaml, read_spec_text
from lora_tune.tasks.base import metric_direction
from lora_tune.train import TrainConfig

_logger = logging.getLogger(__name__)
STUDY_DIR_KEY = "study_dir"  # the stored spec's key for the study file's folder (StudySpec.study_dir)

ISOLATIONS = ("auto", "process", "none")
OOM_POLICIES = ("fail", "halve_batch")
# objectives the study computes itself, beside the task's metrics
EXTRA_METRICS = ("trainable_params",)  # minimized (lora_tune.tasks.base.metric_direction)

Problems = list[tuple[str, str]]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplerSpec(_Section):
    """``type`` picks the Optuna sampler; ``options`` are passed to its constructor."""

    type: Literal["tpe", "random", "grid", "cmaes", "gp", "nsga2"] = "tpe"
    seed: int | None = 0
    options: dict[str, Any] = Field(default_factory=dict)


class PrunerSpec(_Section):
    """``type`` picks the Optuna pruner; ``options`` are passed to its constructor. Hyperband by
    default: most trials stop after their first evaluations without one aggressive cut-off."""

    type: Literal["median", "sha", "hyperband", "none"] = "hyperband"
    options: dict[str, Any] = Field(default_factory=dict)


class ConfirmSpec(_Section):
    """After the budget, re-run the ``top`` configs with ``seeds`` more seeds each."""

    top: int = Field(3, ge=1)
    seeds: int = Field(2, ge=1)


_DATA_FRACTION = settings_of(TrainConfig)["data_fraction"]


class FidelitySpec(_Section):
    """Cheaper trials: no pruning decision before ``min_steps`` optimizer steps, and each epoch
    on a random ``data_fraction`` of the training data (a list: trials use its first value,
    confirmation runs its last)."""

    min_steps: int | None = Field(None, ge=1)
    data_fraction: float | list[float] = 1.0

    @model_validator(mode="after")
    def _fractions(self) -> FidelitySpec:
        values = self.data_fraction if isinstance(self.data_fraction, list) else [self.data_fraction]
        if not values or any(_DATA_FRACTION.problem(v) for v in values):
            raise ValueError("`data_fraction` must be a number in (0, 1] or a list of them, "
                             f"got {short(self.data_fraction)}")
        if values != sorted(values):
            raise ValueError(f"`data_fraction` lists fractions in increasing order, got {values}")
        return self

    @property
    def trial_fraction(self) -> float:
        return self.data_fraction[0] if isinstance(self.data_fraction, list) else self.data_fraction

    @property
    def confirm_fraction(self) -> float:
        return self.data_fraction[-1] if isinstance(self.data_fraction, list) else self.data_fraction


class ServeSpec(_Section):
    """The engine the result will be served with: the search keeps to adapters it loads, with ranks
    up to ``max_lora_rank`` (default: the engine's in :mod:`lora_tune.serving`; ``any``: no limit)."""

    engine: Literal[serving.ENGINES] = "any"  # type: ignore[valid-type]
    max_lora_rank: int | None = Field(None, ge=1)

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_allowed(cls, value: int | None, info: ValidationInfo) -> int | None:
        engine = info.data.get("engine")
        problem = serving.max_rank_problem(engine, value) if value is not None and engine else None
        if problem:
            raise ValueError(problem)
        return value

    @property
    def rank_limit(self) -> int | None:
        """The largest rank a trial may have (None: no limit)."""
        given = self.max_lora_rank
        return given if given is not None else serving.rules(self.engine).default_max_lora_rank


class LrProbeSpec(_Section):
    """The learning-rate probe (:mod:`lora_tune.study.run.lr_probe`), run once before the first
    trial: ``steps`` optimizer steps at exponentially growing rates on ``data_share`` of the
    training data. ``range``: the search space's ``learning_rate`` range is placed at these
    multiples of the probe's rate (null: the file's range is kept; only the warm-start prior is
    placed). ``lr_probe: true`` is this with its defaults, ``false`` (the default) no probe."""

    steps: int = 30
    data_share: float = 0.25
    range: list[float] | None = None

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"got {short(value)}; allowed: a whole number of optimizer steps ≥ 1")
        return value

    @field_validator("data_share", mode="before")
    @classmethod
    def _share(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"got {short(value)}; allowed: a share of the training data in (0, 1]")
        return value

    @field_validator("range", mode="before")
    @classmethod
    def _range(cls, value: Any) -> Any:
        numbers = isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if value is not None and not (numbers and 0 < value[0] < value[1] < float("inf")):
            raise ValueError(f"got {short(value)}; allowed: null or [low, high], multiples of the probe's rate "
                             "with 0 < low < high (e.g. [0.25, 4])")
        return value


class StudySection(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    storage: str | None = None
    direction: Literal["maximize", "minimize"] | None = None
    directions: list[Literal["maximize", "minimize"]] | None = None
    metric: str | list[str] | None = None
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    n_trials: int = Field(20, ge=1)
    timeout: float | None = Field(None, gt=0)
    baseline: bool = True
    max_consecutive_failures: int = Field(5, ge=1)
    heartbeat_interval: int | None = Field(None, ge=1)
    grace_period: int | None = Field(None, ge=1)
    failed_trial_retries: int = Field(2, ge=0)
    warm_start: Literal["defaults"] | None = None
    confirm: ConfirmSpec | None = None
    fidelity: FidelitySpec | None = None
    serve: ServeSpec = Field(default_factory=ServeSpec)
    lr_probe: LrProbeSpec | None = None

    @field_validator("lr_probe", mode="before")
    @classmethod
    def _probe_switch(cls, value: Any) -> Any:
        """``true``: the probe with its defaults; ``false``: none."""
        if value is True:
            return {}
        if value is not None and value is not False and not isinstance(value, (Mapping, LrProbeSpec)):
            raise ValueError(f"got {short(value)}; allowed: true, false or a mapping of steps, data_share, range")
        return None if value is False else value

    @model_validator(mode="after")
    def _objective_shape(self) -> StudySection:
        if self.direction is not None and self.directions is not None:
            raise ValueError("give either `direction` or `directions`, not both")
        if self.directions is not None and not self.directions:
            raise ValueError("`directions` must list at least one direction")
        if isinstance(self.metric, list):
            if not self.metric or not all(isinstance(m, str) and m for m in self.metric):
                raise ValueError("`metric` must be a metric name or a non-empty list of names")
            if len(set(self.metric)) != len(self.metric):
                raise ValueError(f"`metric` lists a name twice: {short(self.metric)}")
        n_metrics = len(self.metric) if isinstance(self.metric, list) else 1
        if self.directions is not None and self.metric is not None and len(self.directions) != n_metrics:
            raise ValueError(
                f"`directions` has {len(self.directions)} entries but `metric` names {n_metrics}; "
                "give one direction per metric"
            )
        if self.direction is not None and n_metrics > 1:
            raise ValueError("several metrics need `directions: [...]` (one per metric), not `direction`")
        return self


@dataclass
class DriverSettings:
    """``train:`` keys the study driver uses itself (the rest are :class:`TrainConfig`'s)."""

    # "process": trials run in the worker's trial process (a crash ends that trial and the process,
    # which is replaced); "auto": process on CUDA, none on CPU
    isolation: str = setting("auto", choices=ISOLATIONS)
    # "halve_batch": retry an out-of-memory trial once with half the batch, twice the accumulation
    oom: str = setting("fail", choices=OOM_POLICIES)
    # torch.set_num_threads in each trial; small models on a busy CPU often train faster with 1
    threads: int | None = setting(None, int, ge=1, nullable=True)


DRIVER_TRAIN_KEYS = tuple(settings_of(DriverSettings))


class _TrainSettings(_Section):
    """Training settings (:class:`lora_tune.train.TrainConfig`'s, and :class:`DriverSettings`);
    any searchable one may be searched by naming it in ``search_space``."""

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The :class:`TrainConfig` of these settings (the driver-only keys left out)."""
        data = self.model_dump(exclude=set(DRIVER_TRAIN_KEYS))
        data.update(overrides)
        return TrainConfig(**data)


def _field(rule: Setting, default: Any) -> tuple[Any, Any]:
    """A pydantic field of a setting: pydantic parses the type, the setting's check gives the message."""
    kind = rule.kind if rule.kind is not None and not rule.choices else Any

    def check(value: Any) -> Any:
        problem = rule.problem(value)
        if problem:
            raise ValueError(problem)
        return value

    return Annotated[kind | None if rule.nullable else kind, AfterValidator(check)], Field(default)


def _train_fields() -> dict[str, Any]:
    out = {}
    for cls in (TrainConfig, DriverSettings):
        defaults = defaults_of(cls)
        out.update({name: _field(rule, defaults[name]) for name, rule in settings_of(cls).items()
                    if rule.section is None})
    return out


# The study file's train: section, derived from the settings (one field per setting, its default).
TrainSection = create_model("TrainSection", __base__=_TrainSettings, __doc__=_TrainSettings.__doc__,
                            **_train_fields())


class ConstraintsSection(_Section):
    """Trials beyond a limit are marked infeasible (``trial.set_constraint``) and not trained."""

    max_trainable_params: int | None = Field(None, ge=1)


class StudySpec(_Section):
    _source: str | None = PrivateAttr(default=None)  # the file it came from, for error messages
    # the study file's folder (absolute): relative paths of `task` are read against it. Set when the
    # file is read; stored beside the sections (to_stored), `task` kept as written.
    _study_dir: str | None = PrivateAttr(default=None)
    # the folder whose `file.py:function` names this process may import: the study file's, when this
    # process read the file (validate_spec); never a stored study's own study_dir (lora_tune.tasks.study_paths)
    _code_dir: str | None = PrivateAttr(default=None)
    study: StudySection
    task: dict[str, Any]
    search_space: dict[str, Any] = Field(default_factory=dict)
    train: TrainSection = Field(default_factory=TrainSection)  # type: ignore[valid-type]
    constraints: ConstraintsSection = Field(default_factory=ConstraintsSection)

    # -- the task section's paths (lora_tune.tasks.study_paths) ------------------------------
    @property
    def study_dir(self) -> str | None:
        """The study file's folder, that relative paths of ``task`` are read against (None: the
        current directory, as for a spec not read from a file)."""
        return self._study_dir

    def trust_code_dir(self, folder: str | Path | None) -> StudySpec:
        """Let this process import ``file.py:function`` names of ``task`` from ``folder`` (the folder
        of a study file its operator gave); returns the spec."""
        self._code_dir = str(folder) if folder is not None else None
        return self

    def _paths(self) -> Any:
        from lora_tune.tasks.study_paths import resolve_task_paths

        data = [d for d in (self.study_dir, self._code_dir) if d]
        return resolve_task_paths(self.task, list(dict.fromkeys(data)), [self._code_dir] if self._code_dir else [])

    def resolved_task(self) -> dict[str, Any]:
        """``task`` with its relative paths read against ``study_dir`` (what builds the task)."""
        return self._paths().task

    def path_fallbacks(self) -> list[tuple[str, str]]:
        """``(key, message)`` for each relative path of ``task`` read from the current directory
        because the study file's folder does not hold it (the behaviour before study_dir)."""
        return self._paths().fallbacks

    # -- the objective, after task defaults are filled in by ``resolve_objective`` ----------
    @property
    def metrics(self) -> list[str]:
        metric = self.study.metric
        if metric is None:
            raise RuntimeError("metric not resolved; call resolve_objective(spec, task) first")
        return list(metric) if isinstance(metric, list) else [metric]

    @property
    def directions(self) -> list[str]:
        if self.study.directions is not None:
            return list(self.study.directions)
        if self.study.direction is not None:
            return [self.study.direction]
        raise RuntimeError("direction not resolved; call resolve_objective(spec, task) first")

    @property
    def is_multi_objective(self) -> bool:
        return len(self.metrics) > 1

    def to_stored(self) -> dict[str, Any]:
        """The study's ``spec`` user attribute; ``train`` holds only the settings the file gives, so a
        task with its own trainer can tell them from the defaults."""
        data = self.model_dump(mode="json")
        data["train"] = self.train.model_dump(mode="json", exclude_unset=True)
        if self._study_dir is not None:  # beside the sections: task as written, and where it was written
            data[STUDY_DIR_KEY] = self._study_dir
        return data


# -- loading ------------------------------------------------------------------------------

def load_spec_file(path: str | Path) -> StudySpec:
    """Read, parse and validate a study file; raises StudySpecError with every problem. Its
    relative paths are read against its folder (``study_dir``); one found only in the current
    directory is read from there with a warning."""
    spec = validate_spec(load_yaml(read_spec_text(path), source=str(path)), source=str(path),
                         study_dir=study_folder(path))
    for where, message in spec.path_fallbacks():
        _logger.warning("%s: %s: %s", path, where, message)
    return spec


def study_folder(path: str | Path) -> str:
    """The folder of study file ``path`` (absolute, symbolic links kept as the user sees them)."""
    return str(Path(path).absolute().parent)


def parse_spec_text(text: str, source: str | None = None) -> StudySpec:
    return validate_spec(load_yaml(text, source), source=source)


def validate_spec(raw: Any, source: str | None = None, study_dir: str | None = None) -> StudySpec:
    """Validate a parsed study file (a mapping); every problem is reported at once. ``study_dir``:
    the file's folder (:func:`study_folder`), that its relative paths are read against."""
    spec, problems = check_spec(raw, study_dir)
    if problems:
        raise StudySpecError(problems, source=source)
    assert spec is not None
    spec._source = source
    return spec.trust_code_dir(study_dir)  # a file its operator gave: its folder's code too


def check_spec(raw: Any, study_dir: str | None = None) -> tuple[StudySpec | None, Problems]:
    """``(spec or None, problems)`` without raising: schema, search space and task section (its
    paths read against ``study_dir``, else against the folder a stored spec names)."""
    from lora_tune.study.schema.space import check_search_space
    from lora_tune.tasks.study_paths import resolve_task_paths

    if not isinstance(raw, Mapping):
        kind = "empty" if raw is None else type(raw).__name__
        return None, [("(file)", f"a study file must be a YAML mapping with a `study:` section; got {kind}")]
    problems: Problems = []
    raw = dict(raw)
    stored_dir = raw.pop(STUDY_DIR_KEY, None)  # a stored spec's (to_stored)
    if study_dir is not None and stored_dir is not None:
        problems.append((STUDY_DIR_KEY, "unknown key; lora-tune stores the study file's folder in a stored study, "
                                        "a study file does not name it"))
    folder = study_dir if study_dir is not None else stored_dir if isinstance(stored_dir, str) else None
    folders = [folder] if folder else []
    spec: StudySpec | None = None
    try:
        spec = StudySpec.model_validate(raw)
        spec._study_dir = folder
    except ValidationError as exc:
        problems += unknown_key_hint(pydantic_problems(exc))
    space = raw.get("search_space")
    if isinstance(space, Mapping):
        problems += check_search_space(space, raw.get("study") if isinstance(raw.get("study"), Mapping) else {})
    task = raw.get("task")
    if isinstance(task, Mapping):
        # code from the file's folder only (a stored spec's folder is not trusted for code)
        problems += _task_problems(resolve_task_paths(task, folders, [study_dir] if study_dir else []).task)
    problems = list(dict.fromkeys(problems))
    return (spec if not problems else None), problems


def spec_from_stored(data: Mapping[str, Any]) -> StudySpec:
    """Rebuild a spec from a study's ``spec`` user attribute; only the schema is checked again
    (a worker in another directory must load it even with relative data paths)."""
    data = dict(data)
    folder = data.pop(STUDY_DIR_KEY, None)
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise StudySpecError(unknown_key_hint(pydantic_problems(exc)), source="(stored spec)") from None
    spec._study_dir = folder if isinstance(folder, str) and folder else None
    return spec


def _task_problems(task: Mapping[str, Any]) -> Problems:
    from lora_tune.tasks import validate_task_spec

    out: Problems = []
    for path, message in validate_task_spec(dict(task)):
        out.append((path if path.startswith("task") else f"task.{path}", message))
    return out


# -- the objective, with the task's defaults ------------------------------------------------

def objective_problems(spec: StudySpec, task: Any) -> Problems:
    """Problems of ``study.metric`` against the metrics the task computes."""
    allowed = list(task.metrics) + list(EXTRA_METRICS)
    metric = spec.study.metric
    names = [] if metric is None else (list(metric) if isinstance(metric, list) else [metric])
    out: Problems = []
    for i, name in enumerate(names):
        if name not in allowed:
            path = "study.metric" if not isinstance(metric, list) else f"study.metric[{i}]"
            out.append((path, f"unknown metric {short(name)} for task type {task.name!r}; "
                              f"allowed: {', '.join(allowed)}"))
    if names == ["trainable_params"]:
        out.append(("study.metric", "trainable_params alone is not a useful objective; pair it with a task metric"))
    return out


def resolve_objective(spec: StudySpec, task: Any) -> StudySpec:
    """A copy of ``spec`` with ``metric`` and ``direction(s)`` filled in from the task."""
    problems = objective_problems(spec, task)
    if problems:
        raise StudySpecError(problems)
    data = spec.to_stored()
    data.pop(STUDY_DIR_KEY, None)
    study = data["study"]
    metric = study.get("metric") or task.default_metric
    names = list(metric) if isinstance(metric, list) else [metric]
    if study.get("directions") is None and study.get("direction") is None:
        dirs = [default_direction(name, task) for name in names]
    elif study.get("direction") is not None:
        dirs = [study["direction"]]
    else:
        dirs = list(study["directions"])
    study["metric"] = metric
    if len(names) > 1:
        study["directions"], study["direction"] = dirs, None
    else:
        study["direction"], study["directions"] = dirs[0], None
    resolved = StudySpec.model_validate(data)
    resolved._study_dir = spec._study_dir
    return resolved.trust_code_dir(spec._code_dir)


def default_direction(metric: str, task: Any) -> str:
    """The task's direction for its default metric, else the one rule by name (:func:`metric_direction`)."""
    return task.default_direction if metric == task.default_metric else metric_direction(metric)


# -- pydantic errors as (path, message) ------------------------------------------------------

def pydantic_problems(exc: ValidationError) -> Problems:
    out: Problems = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        # Union members add their type name to the location (e.g. "str", "list[str]"); drop them.
        loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")))]
        path = _format_loc(loc)
        out.append((path or "(file)", _message(err)))
    return out


def _format_loc(loc: list[Any]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


def _message(err: Mapping[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    if kind == "greater_than_equal":
        return f"must be ≥ {ctx.get('ge')}, got {short(value)}"
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}, got {short(value)}"
    if kind == "literal_error":
        return f"got {short(value)}; allowed: {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        return f"got {short(value)}; allowed: letters, digits, '.', '_' and '-' (starting with a letter or digit)"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    msg = err["msg"]
    if value is None or isinstance(value, Mapping):
        return msg
    return f"{msg[0].lower()}{msg[1:]}, got {short(value)}"


def unknown_key_hint(problems: Problems) -> Problems:
    """Add the allowed keys to "unknown key" messages of the fixed sections."""
    sections = {
        "study": StudySection, "train": TrainSection, "constraints": ConstraintsSection,
        "study.sampler": SamplerSpec, "study.pruner": PrunerSpec, "study.confirm": ConfirmSpec,
        "study.fidelity": FidelitySpec, "study.serve": ServeSpec, "study.lr_probe": LrProbeSpec,
        "": StudySpec,
    }
    out: Problems = []
    for path, message in problems:
        if message == "unknown key":
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            model = sections.get(parent)
            if model is not None:
                message = "unknown key; allowed: " + ", ".join(model.model_fields)
        out.append((path, message))
    return out

