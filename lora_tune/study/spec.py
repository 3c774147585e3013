"""The study file: its schema (pydantic, unknown keys forbidden) and its loading.

A study file has five sections: ``study`` (name, storage, objective, sampler, pruner,
budget), ``task`` (checked by :func:`lora_tune.tasks.validate_task_spec`), ``search_space``
(checked by :mod:`lora_tune.study.space`), ``train`` and ``constraints``. Every problem is
collected and raised at once as :class:`~lora_tune.errors.StudySpecError` with its path,
e.g. ``search_space.rank.low: must be ≥ 1``.
"""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from lora_tune.errors import StudySpecError, clip, short
from lora_tune.train import LR_SCHEDULERS, OPTIMIZERS, PRECISIONS, TrainConfig

ISOLATIONS = ("auto", "process", "none")
OOM_POLICIES = ("fail", "halve_batch")
# train: keys the study driver uses itself; the rest are TrainConfig fields.
DRIVER_TRAIN_KEYS = ("isolation", "oom", "threads")

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "nsga2")
PRUNERS = ("median", "sha", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
# Objectives the study itself can compute, on top of the task's own metrics.
EXTRA_METRICS = {"trainable_params": "minimize"}
_MINIMIZED_METRICS = ("loss", "eval_loss", "perplexity", "error", "trainable_params")

Problems = list[tuple[str, str]]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplerSpec(_Section):
    """``type`` picks the Optuna sampler; ``options`` are passed to its constructor."""

    type: Literal["tpe", "random", "grid", "cmaes", "gp", "nsga2"] = "tpe"
    seed: int | None = 0
    options: dict[str, Any] = Field(default_factory=dict)


class PrunerSpec(_Section):
    """``type`` picks the Optuna pruner; ``options`` are passed to its constructor.

    Hyperband by default: successive halving over the trial's evaluations in several brackets,
    so that most trials stop after their first evaluations without one aggressive cut-off
    (the budget is multi-fidelity by default; ``study.fidelity`` makes it cheaper still)."""

    type: Literal["median", "sha", "hyperband", "none"] = "hyperband"
    options: dict[str, Any] = Field(default_factory=dict)


class ConfirmSpec(_Section):
    """After the budget, re-run the ``top`` configs with ``seeds`` more seeds each."""

    top: int = Field(3, ge=1)
    seeds: int = Field(2, ge=1)


class FidelitySpec(_Section):
    """Cheaper trials: no pruning decision before ``min_steps`` optimizer steps, and each epoch
    on a random ``data_fraction`` of the training data (a list: trials use its first value,
    confirmation runs its last)."""

    min_steps: int | None = Field(None, ge=1)
    data_fraction: float | list[float] = 1.0

    @model_validator(mode="after")
    def _fractions(self) -> "FidelitySpec":
        values = self.data_fraction if isinstance(self.data_fraction, list) else [self.data_fraction]
        if not values or any(not (0 < v <= 1) for v in values):
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
    # Enqueue well-known good configs first (lora_tune/study/warm_start.py prior).
    warm_start: Literal["defaults"] | None = None
    confirm: ConfirmSpec | None = None
    fidelity: FidelitySpec | None = None

    @model_validator(mode="after")
    def _objective_shape(self) -> "StudySection":
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


_TRAIN = TrainConfig()  # the one source of the training defaults


class TrainSection(_Section):
    """Training settings (defaults from :class:`lora_tune.train.TrainConfig`); any of the
    numeric ones may be searched by naming it in ``search_space``."""

    epochs: int = Field(_TRAIN.epochs, ge=1)
    batch_size: int = Field(_TRAIN.batch_size, ge=1)
    learning_rate: float = Field(_TRAIN.learning_rate, gt=0)
    weight_decay: float = Field(_TRAIN.weight_decay, ge=0)
    evals_per_epoch: int = Field(_TRAIN.evals_per_epoch, ge=1)
    eval_steps: int | None = Field(_TRAIN.eval_steps, ge=1)
    seed: int = _TRAIN.seed
    device: str = _TRAIN.device
    grad_clip: float | None = Field(_TRAIN.grad_clip, gt=0)
    max_steps: int | None = Field(_TRAIN.max_steps, ge=1)
    precision: Literal[PRECISIONS] = _TRAIN.precision  # type: ignore[valid-type]
    gradient_accumulation_steps: int = Field(_TRAIN.gradient_accumulation_steps, ge=1)
    lr_scheduler: Literal[LR_SCHEDULERS] = _TRAIN.lr_scheduler  # type: ignore[valid-type]
    warmup_ratio: float = Field(_TRAIN.warmup_ratio, ge=0, lt=1)
    warmup_steps: int | None = Field(_TRAIN.warmup_steps, ge=0)
    gradient_checkpointing: bool = _TRAIN.gradient_checkpointing
    optimizer: Literal[OPTIMIZERS] = _TRAIN.optimizer  # type: ignore[valid-type]
    loraplus_lr_ratio: float | None = Field(_TRAIN.loraplus_lr_ratio, gt=0)
    # Where a trial trains: "process" (a fresh child process per trial: a crash, an
    # out-of-memory or a leak ends that trial only), "none" (in the driver process) or "auto"
    # (process on CUDA, none on CPU).
    isolation: Literal[ISOLATIONS] = "auto"  # type: ignore[valid-type]
    # On an out-of-memory error: "fail" the trial, or "halve_batch": retry it once with half the
    # batch and twice the gradient accumulation (same effective batch).
    oom: Literal[OOM_POLICIES] = "fail"  # type: ignore[valid-type]
    # CPU threads for torch in each trial process (torch.set_num_threads); null keeps torch's
    # default. Small models on a busy or small CPU often train several times faster with 1.
    threads: int | None = Field(None, ge=1)

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The :class:`TrainConfig` of these settings (the driver-only keys left out)."""
        data = self.model_dump(exclude=set(DRIVER_TRAIN_KEYS))
        data.update(overrides)
        return TrainConfig(**data)


class ConstraintsSection(_Section):
    """Trials beyond a limit are marked infeasible (``trial.set_constraint``) and not trained."""

    max_trainable_params: int | None = Field(None, ge=1)


class StudySpec(_Section):
    _source: str | None = PrivateAttr(default=None)  # the file it came from, for error messages
    study: StudySection
    task: dict[str, Any]
    search_space: dict[str, Any] = Field(default_factory=dict)
    train: TrainSection = Field(default_factory=TrainSection)
    constraints: ConstraintsSection = Field(default_factory=ConstraintsSection)

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
        """The JSON-able dict stored as the study's ``spec`` user attribute. ``train`` holds the
        settings the file gives (defaults are derived again on loading), so tasks that drive
        their own trainer can tell the study's settings from the defaults."""
        data = self.model_dump(mode="json")
        data["train"] = self.train.model_dump(mode="json", exclude_unset=True)
        return data


# -- loading ------------------------------------------------------------------------------

def load_spec_file(path: str | Path) -> StudySpec:
    """Read, parse and validate a study file; raises StudySpecError with every problem."""
    return parse_spec_text(read_spec_text(path), source=str(path))


# Bounds on a study file, far above any real one (a few KB), so that a hostile or broken file is
# refused at once instead of hanging or filling the memory.
MAX_SPEC_BYTES = 1 << 20  # 1 MiB of text
# The file's values and scalar characters with every YAML alias written out (a value used through
# `*alias` counts each time). Without aliases a 1 MiB file stays under them in practice (a real
# study file holds a few hundred values); aliases that multiply a file (a "billion laughs": 1.6 KB
# that expands to 10⁹ values) are refused before anything is built from them.
MAX_YAML_VALUES = 250_000
MAX_YAML_CHARS = 2 * MAX_SPEC_BYTES
MAX_YAML_DEPTH = 100  # levels of nesting (a study file has about 5)


def read_spec_text(path: str | Path) -> str:
    """A study file's text; StudySpecError naming the file when it cannot be read, is not a
    regular file (a directory, a FIFO, a device such as /dev/zero) or is over MAX_SPEC_BYTES."""
    path = Path(path)

    def refuse(message: str) -> StudySpecError:
        return StudySpecError([("(file)", message)], source=str(path))

    shown = short(str(path))
    try:  # stat before opening: opening a FIFO would wait for a writer for ever
        info = os.stat(path)
    except FileNotFoundError:
        raise refuse(f"no such file: {shown}") from None
    except (OSError, ValueError) as exc:
        raise refuse(f"cannot read {shown}: {exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise refuse(f"{shown} is a directory, not a study file")
    if not stat.S_ISREG(info.st_mode):
        raise refuse(f"{shown} is not a regular file ({_file_kind(info.st_mode)}); give a YAML study file")
    if info.st_size > MAX_SPEC_BYTES:
        raise refuse(f"{shown} is {info.st_size:,} bytes; a study file may be at most {MAX_SPEC_BYTES:,} bytes (1 MiB)")
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does not wait
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise refuse(f"{shown} is not a regular file; give a YAML study file")
            data = fh.read(MAX_SPEC_BYTES + 1)
    except StudySpecError:
        raise
    except OSError as exc:
        raise refuse(f"cannot read {shown}: {exc}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise refuse(f"{shown} is over {MAX_SPEC_BYTES:,} bytes; a study file may be at most 1 MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise refuse(f"cannot read {shown}: not UTF-8 text (line {line}: {exc.reason})") from None


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def load_yaml(text: str, source: str | None = None) -> Any:
    """``yaml.safe_load`` that also refuses a key given twice, aliases that expand the file past
    MAX_YAML_VALUES / MAX_YAML_CHARS, nesting past MAX_YAML_DEPTH and values Python cannot build
    (a 13th month); StudySpecError with the line."""
    if len(text) > MAX_SPEC_BYTES:
        raise StudySpecError([("(file)", f"the text is {len(text):,} characters; a study file may be at most "
                                         f"{MAX_SPEC_BYTES:,} (1 MiB)")], source=source)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(file)"
        problem = clip(getattr(exc, "problem", None) or str(exc), 300)
        message = problem if isinstance(exc, _TooLargeError) else f"not valid YAML: {problem}"
        raise StudySpecError([(where, message)], source=source) from None
    except RecursionError:
        raise StudySpecError([("(file)", "the YAML is nested too deeply (hundreds of levels); a study file needs a "
                                         "few")], source=source) from None


def parse_spec_text(text: str, source: str | None = None) -> StudySpec:
    return validate_spec(load_yaml(text, source), source=source)


def validate_spec(raw: Any, source: str | None = None) -> StudySpec:
    """Validate a parsed study file (a mapping); every problem is reported at once."""
    spec, problems = check_spec(raw)
    if problems:
        raise StudySpecError(problems, source=source)
    assert spec is not None
    spec._source = source
    return spec


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when installed
    """``yaml.safe_load`` semantics, except that a key given twice in one mapping is an error
    (plain YAML keeps the last one silently), a document whose aliases expand it past
    MAX_YAML_VALUES / MAX_YAML_CHARS is refused before anything is built, and a scalar Python cannot build
    (``2021-13-45``, an integer of 5000 digits) is a YAML error at its line."""

    def get_single_node(self):
        node = super().get_single_node()
        _check_expansion(node)
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, TypeError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {clip(str(exc), 200)}", node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged by SafeLoader below
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, got {short(key)}", key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _TooLargeError(yaml.constructor.ConstructorError):
    """Valid YAML, but over a bound of lora-tune (aliases that expand too far, nesting too deep)."""


def _check_expansion(root: yaml.Node | None) -> None:
    """Refuse a node graph whose size with aliases written out is over MAX_YAML_VALUES values or
    MAX_YAML_CHARS characters, nested over MAX_YAML_DEPTH levels, or infinite (an alias inside its
    own anchor). Each node is visited once (sizes are memoized), so this takes time in the size of
    the text, not of the expansion."""
    if root is None:
        return
    sizes: dict[int, tuple[int, int, int]] = {}  # id(node) -> (values, characters, levels) written out
    open_nodes: set[int] = set()  # the nodes on the path from the root (an alias to one: endless)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = (1, len(node.value), 0)
            continue
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        if done:
            open_nodes.discard(key)
            values = 1 + sum(sizes[id(child)][0] for child in children)
            chars = sum(sizes[id(child)][1] for child in children)
            levels = 1 + max((sizes[id(child)][2] for child in children), default=0)
            if levels > MAX_YAML_DEPTH:
                raise _TooLargeError(None, None, f"values are nested more than {MAX_YAML_DEPTH} levels deep here "
                                     f"(aliases written out); a study file may nest at most {MAX_YAML_DEPTH}",
                                     node.start_mark)
            if values > MAX_YAML_VALUES or chars > MAX_YAML_CHARS:
                what = f"{MAX_YAML_VALUES:,} values" if values > MAX_YAML_VALUES else f"{MAX_YAML_CHARS:,} characters"
                raise _TooLargeError(
                    None, None, f"this holds more than {what} once its aliases are written out; a study file may "
                    f"hold at most {MAX_YAML_VALUES:,} values and {MAX_YAML_CHARS:,} characters (aliases that "
                    "multiply a file, a 'billion laughs', are refused)", node.start_mark)
            sizes[key] = (values, chars, levels)
            continue
        open_nodes.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise _TooLargeError(
                    None, None, "an alias refers to the value that contains it (an endless value)", child.start_mark)
            if id(child) not in sizes:
                stack.append((child, False))


def check_spec(raw: Any) -> tuple[StudySpec | None, Problems]:
    """``(spec or None, problems)`` without raising: schema, search space and task section."""
    from lora_tune.study.space import check_search_space

    if not isinstance(raw, Mapping):
        kind = "empty" if raw is None else type(raw).__name__
        return None, [("(file)", f"a study file must be a YAML mapping with a `study:` section; got {kind}")]
    problems: Problems = []
    spec: StudySpec | None = None
    try:
        spec = StudySpec.model_validate(dict(raw))
    except ValidationError as exc:
        problems += unknown_key_hint(pydantic_problems(exc))
    space = raw.get("search_space")
    if isinstance(space, Mapping):
        problems += check_search_space(space, raw.get("study") if isinstance(raw.get("study"), Mapping) else {})
    task = raw.get("task")
    if isinstance(task, Mapping):
        problems += _task_problems(task)
    problems = _dedupe(problems)
    return (spec if not problems else None), problems


def spec_from_stored(data: Mapping[str, Any]) -> StudySpec:
    """Rebuild a spec from a study's ``spec`` user attribute.

    It was fully validated when the study was created; only the schema is checked again, so
    a worker whose working directory differs (relative data paths) can still load it.
    """
    try:
        return StudySpec.model_validate(dict(data))
    except ValidationError as exc:
        raise StudySpecError(unknown_key_hint(pydantic_problems(exc)), source="(stored spec)") from None


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
    return StudySpec.model_validate(data)


def default_direction(metric: str, task: Any) -> str:
    if metric == task.default_metric:
        return task.default_direction
    if metric in EXTRA_METRICS:
        return EXTRA_METRICS[metric]
    return "minimize" if metric in _MINIMIZED_METRICS else "maximize"


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


def _dedupe(problems: Problems) -> Problems:
    seen: set[tuple[str, str]] = set()
    out: Problems = []
    for item in problems:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def unknown_key_hint(problems: Problems) -> Problems:
    """Add the allowed keys to "unknown key" messages of the fixed sections."""
    sections = {
        "study": StudySection, "train": TrainSection, "constraints": ConstraintsSection,
        "study.sampler": SamplerSpec, "study.pruner": PrunerSpec, "study.confirm": ConfirmSpec,
        "study.fidelity": FidelitySpec, "": StudySpec,
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


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
