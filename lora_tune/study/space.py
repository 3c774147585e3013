"""The search space: a study file's ``search_space`` section -> ``trial.suggest_*`` calls.

Each key is a LoRA setting (``rank``, ``alpha``, ``targets``, ``quant_bits``, ...) or a
training setting (``learning_rate``, ``weight_decay``, ``epochs``, ``batch_size``,
``grad_clip``). A key's value is one of:

- a plain value, which fixes the setting (``method: parallel``);
- ``{type: int|float, low, high, log: false, step: null}``, a range;
- ``{choices: [...]}``, a categorical;
- for ``alpha`` only, ``{ratio: [0.5, 1, 2]}``: the trial samples ``alpha_ratio`` and uses
  ``alpha = ratio × rank``;
- for ``rank`` only, ``{nested: [4, 8, 16, 32]}`` (increasing; ``nested_dropout: false`` to train
  without it): nested ranks. The trial trains rank R = the largest with nested rank dropout and
  scores every listed rank (:mod:`lora_tune.study.nested`); its parameter ``rank`` is R, and the
  rank-r adapter of the same parameters has ``alpha`` as the space gives it for rank r (a ratio
  keeps its ratio, a fixed alpha stays).

Trial parameter names and encodings are those of docs/architecture.md: ``quant_bits`` 0
means no quantization, an explicit ``targets`` list is stored ``|``-joined, ``layers`` is stored
as ``all``, ``first:N``, ``last:N`` or ``|``-joined block indices (``0|1|2``), and
``quant_type`` is sampled only when ``quant_bits`` is 4. ``layers: {last: 4}`` is a plain value
(``layers`` takes a value or ``choices``, never a range).

For your own Optuna objective: ``space = SearchSpace.from_file("study.yaml")`` (or
:meth:`SearchSpace.from_dict`), then ``space.suggest(trial)`` -> a :class:`lora_tune.LoraConfig`
and ``space.suggest_training(trial)`` -> the training settings, with the same trial parameters
as lora-tune's own studies. Any object with Optuna's ``suggest_int`` / ``suggest_float`` /
``suggest_categorical`` will do; this module does not import optuna.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from lora_tune.errors import ConfigError, StudySpecError, short
from lora_tune.lora.config import LoraConfig, layers_label, normalize_layers, quantized_bits
from lora_tune.lora.nested import NestedRanks
from lora_tune.settings import Setting, defaults_of, settings_of, show
from lora_tune.study.spec import StudySpec
from lora_tune.study.yaml_file import load_yaml, read_spec_text
from lora_tune.train import TrainConfig

Problems = list[tuple[str, str]]
Check = Callable[[Any], "str | None"]

LORA_DEFAULTS: Mapping[str, Any] = MappingProxyType(defaults_of(LoraConfig))  # one source: LoraConfig
STUDY_SECTIONS = tuple(StudySpec.model_fields)  # a mapping with any of these keys is a whole study file
BASELINE = {"rank": 8, "alpha": 16.0, "quant_bits": None}  # plus the task's baseline targets
_ORDER = ("rank", "alpha", "targets", "layers", "quant_bits", "quant_type", "method", "dropout", "rslora")
_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices", "ratio", "nested", "nested_dropout"}
# Longest lists a search space may give (far above any real space, and refused before they are
# looked at, so that a huge list costs no time): the values of a categorical (`choices`, an alpha
# `ratio`, `nested` ranks), and a list value such as explicit `targets` module names.
MAX_CHOICES = 1_000
MAX_LIST_ITEMS = 10_000


# -- per-key value checks: the settings' own (lora_tune.settings), and two of the space's own ------

def _targets(v: Any) -> str | None:
    if isinstance(v, str) and v.strip():
        return None
    if isinstance(v, list) and v and all(isinstance(t, str) and t.strip() and "|" not in t for t in v):
        return None
    return f"must be a preset name or a non-empty list of module-name patterns (without '|'), got {short(v)}"


def _layers(v: Any) -> str | None:
    try:
        normalize_layers(v)
    except ConfigError as exc:
        return f"got {short(v)}; allowed: {exc.allowed}"
    return None


def _plain_value(key: str, value: Any) -> bool:
    """Whether ``value`` fixes ``key`` (rather than being a range / choices spec)."""
    return not isinstance(value, Mapping) or (key == "layers" and "choices" not in value)


@dataclass(frozen=True)
class KeyRule:
    check: Check
    numeric: str | None  # "int" / "float" when ranges are allowed, else None (choices only)


_OWN_CHECKS: dict[str, Check] = {"targets": _targets, "layers": _layers}  # values the space stores as text
_RATIO = Setting(float, gt=0)  # alpha as a ratio of the rank
# The searchable settings of LoraConfig and TrainConfig.
KEYS: dict[str, KeyRule] = {key: KeyRule(_OWN_CHECKS.get(key, rule.problem), rule.numeric)
                            for cls in (LoraConfig, TrainConfig) for key, rule in settings_of(cls).items()
                            if rule.searchable}
# Keys that are training settings (the rest configure LoRA).
TRAIN_KEYS = tuple(key for key, rule in settings_of(TrainConfig).items() if rule.searchable)


# -- compiled parameters ---------------------------------------------------------------------

@dataclass
class Param:
    """One key of the space. ``name`` is the trial parameter name (``alpha_ratio`` for ratios)."""

    key: str
    name: str
    kind: str  # "fixed" | "int" | "float" | "categorical" | "ratio" | "nested" (rank only; value = R)
    value: Any = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)  # encoded (what Optuna stores)
    decoded: dict[Any, Any] = field(default_factory=dict)  # encoded -> value for the config
    nested_dropout: bool = True  # nested ranks: train with nested rank dropout

    @property
    def sampled(self) -> bool:
        """Whether a sampler chooses the value (a nested rank is always R, recorded as a param)."""
        return self.kind not in ("fixed", "nested")

    def suggest(self, trial: Any) -> Any:
        if self.kind == "nested":
            # a single-valued parameter, never sampled; an enqueued trial may fix another rank
            # (the baseline's 8), which Optuna would warn about as outside [R, R]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=f"Fixed parameter {self.name} with value")
                return trial.suggest_int(self.name, int(self.value), int(self.value))
        if self.kind == "int":
            step = int(self.step) if self.step else 1
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=step, log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        encoded = trial.suggest_categorical(self.name, self.choices)
        return self.decoded.get(_key(encoded), encoded)


def encode_choice(key: str, value: Any) -> Any:
    """The value Optuna stores for a categorical choice of ``key``."""
    if key == "targets" and isinstance(value, list):
        return "|".join(value)
    if key == "quant_bits":
        return quantized_bits(value) or 0  # 0: not quantized
    if key == "layers":
        return layers_label(value)
    return value


def _decode_choice(key: str, value: Any) -> Any:
    if key == "quant_bits":
        return quantized_bits(value)
    if key == "layers":
        return normalize_layers(value)
    return value


def _key(v: Any) -> Any:
    # bool and int compare equal in dicts (True == 1); keep them apart.
    return (type(v).__name__, v)


@dataclass
class SearchSpace:
    """The compiled ``search_space`` of a study file: one :class:`Param` per key."""

    params: list[Param]

    @classmethod
    def from_spec(cls, raw: Mapping[str, Any]) -> "SearchSpace":
        """From a validated-or-not ``search_space`` mapping; raises StudySpecError with every problem."""
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> "SearchSpace":
        """From a whole study file as a dict (its ``search_space`` section is used) or from a
        ``search_space`` mapping itself. Raises StudySpecError listing every problem with its
        path (``search_space.rank.low: ...``); ``source`` names the file in the message."""
        if not isinstance(data, Mapping):
            kind = "empty" if data is None else type(data).__name__
            raise StudySpecError([("(file)", f"expected a mapping (a study file or its search_space); got {kind}")],
                                 source=source)
        problems: Problems = []
        raw, study = data, {}
        if any(k in STUDY_SECTIONS for k in data):
            problems += [(str(k), "unknown key; allowed: " + ", ".join(STUDY_SECTIONS))
                         for k in data if k not in STUDY_SECTIONS]
            raw = data.get("search_space") or {}
            study = data.get("study") if isinstance(data.get("study"), Mapping) else {}
            if not isinstance(raw, Mapping):
                problems.append(("search_space", f"must be a mapping of parameter -> spec, got {short(raw)}"))
                raw = {}
        problems += check_search_space(raw, study)
        if problems:
            raise StudySpecError(problems, source=source)
        return cls([_compile(key, raw[key]) for key in _ordered(raw)])

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SearchSpace":
        """From the ``search_space`` section of a study file (or a YAML file holding only a search
        space). Only that section is checked, so the ``task`` needs nothing installed or present;
        raises StudySpecError naming the file and each bad key."""
        data = load_yaml(read_spec_text(path), source=str(path))
        return cls.from_dict(data, source=str(path))

    def suggest(self, trial: Any, **fixed: Any) -> LoraConfig:
        """The trial's :class:`lora_tune.LoraConfig`: the space's LoRA keys suggested (or fixed) as
        lora-tune's studies suggest them, every other field at LoraConfig's default or as
        ``fixed`` gives it (e.g. ``modules_to_save=["classifier"]``; a key the space sets is an
        error). ``trial`` is an Optuna trial, a ``FixedTrial``, or anything with ``suggest_*``."""
        clash = sorted(set(fixed) & {p.key for p in self.params})
        if clash:
            raise ConfigError(clash[0], fixed[clash[0]], "LoraConfig fields the search space does not set",
                              f"the search space already sets {short(clash[0])}; give it in one place")
        values = self._sample(trial, lambda key: key not in TRAIN_KEYS)
        return LoraConfig.from_dict({**values, **fixed})

    def suggest_training(self, trial: Any) -> dict[str, Any]:
        """The trial's training settings of the space (``learning_rate``, ``batch_size``, ... --
        :data:`TRAIN_KEYS`), as ``{key: value}`` for the keys the space has: fields of
        :class:`lora_tune.train.TrainConfig`."""
        return self._sample(trial, lambda key: key in TRAIN_KEYS)

    def nested_ranks(self, params: Mapping[str, Any]) -> NestedRanks | None:
        """The nested ranks a trial with these parameters (Optuna's names, as ``trial.params``)
        trains, or None: the space has no nested rank, or the trial's rank is not the largest
        listed (an enqueued baseline or warm start trains its own rank plainly)."""
        p = self["rank"]
        if p is None or p.kind != "nested" or params.get("rank") != p.value:
            return None
        at = [self.at_rank(params, r) for r in p.choices]
        return NestedRanks(tuple(p.choices), tuple(float(v.get("alpha", LORA_DEFAULTS["alpha"])) for v in at),
                           rslora=bool(at[-1].get("rslora", LORA_DEFAULTS["rslora"])), sample=p.nested_dropout)

    def at_rank(self, params: Mapping[str, Any], rank: int) -> dict[str, Any]:
        """What :meth:`sample` gives for these trial parameters with ``rank`` instead (the alpha of a
        ratio follows the rank): the values of a nested rank's own result."""
        return self.sample(_Replay({**params, "rank": rank}))

    def values_of(self, key: str) -> list[Any]:
        """Every value ``key`` can take in a trial (decoded: lists stay lists); [] if absent."""
        p = self[key]
        if p is None:
            return []
        if p.kind == "nested":
            return list(p.choices)
        if not p.sampled:
            return [p.value]
        if p.kind != "categorical":
            return []
        return [p.decoded.get(_key(c), c) for c in p.choices]

    def __getitem__(self, key: str) -> Param | None:
        return next((p for p in self.params if p.key == key), None)

    @property
    def sampled(self) -> list[Param]:
        return [p for p in self.params if p.sampled]

    def sample(self, trial: Any) -> dict[str, Any]:
        """Suggest every sampled key; returns ``{key: value}`` for every key of the space.

        ``quant_type`` is suggested only when ``quant_bits`` is 4; ``alpha`` from a ratio is
        ``ratio × rank``.
        """
        return self._sample(trial, lambda key: True)

    def _sample(self, trial: Any, wanted: Callable[[str], bool]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for p in (p for p in self.params if wanted(p.key)):
            if p.key == "quant_type" and p.sampled and values.get("quant_bits", LORA_DEFAULTS["quant_bits"]) != 4:
                continue
            if p.kind == "fixed":
                values[p.key] = _decode_choice(p.key, p.value)
            elif p.kind == "ratio":
                ratio = p.suggest(trial)
                rank = values.get("rank", LORA_DEFAULTS["rank"])
                values[p.key] = float(ratio) * rank
            else:
                values[p.key] = p.suggest(trial)
        return values

    def grid(self) -> tuple[dict[str, list[Any]], Problems]:
        """The space as GridSampler needs it: every sampled parameter with its values."""
        grid: dict[str, list[Any]] = {}
        problems: Problems = []
        for p in self.sampled:
            if p.kind in ("categorical", "ratio"):
                grid[p.name] = list(p.choices)
            elif p.step is not None or p.kind == "int":
                step = p.step or 1
                n = int(math.floor((p.high - p.low) / step + 1e-9)) + 1
                if n > 1000:
                    problems.append((f"search_space.{p.key}", f"a grid of {n} values is too large; use choices"))
                    continue
                vals = [p.low + i * step for i in range(n)]
                grid[p.name] = [int(v) for v in vals] if p.kind == "int" else [round(v, 12) for v in vals]
            else:
                problems.append((
                    f"search_space.{p.key}",
                    "the grid sampler needs `choices` or a `step` for every sampled parameter",
                ))
        return grid, problems


class _Replay:
    """A trial-like object answering every suggestion from recorded parameters."""

    def __init__(self, params: Mapping[str, Any]):
        self.params = dict(params)

    def suggest_int(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.params[name]

    suggest_float = suggest_categorical = suggest_int


def _ordered(raw: Mapping[str, Any]) -> list[str]:
    first = [k for k in _ORDER if k in raw]
    return first + [k for k in raw if k not in first]


def _compile(key: str, value: Any) -> Param:
    rule = KEYS[key]
    if _plain_value(key, value):
        return Param(key, key, "fixed", value=value)
    if "nested" in value:
        ranks = [int(r) for r in value["nested"]]
        return Param(key, key, "nested", value=ranks[-1], choices=ranks,
                     nested_dropout=bool(value.get("nested_dropout", True)))
    if "ratio" in value:
        choices = [float(r) for r in value["ratio"]]
        return Param(key, "alpha_ratio", "ratio", choices=choices)
    if "choices" in value:
        encoded = [encode_choice(key, c) for c in value["choices"]]
        decoded = {_key(encode_choice(key, c)): _decode_choice(key, c) for c in value["choices"]}
        unique = list(dict.fromkeys(encoded))
        if len(unique) == 1:
            return Param(key, key, "fixed", value=decoded[_key(unique[0])])
        return Param(key, key, "categorical", choices=unique, decoded=decoded)
    kind = value.get("type") or rule.numeric
    low, high = value["low"], value["high"]
    return Param(key, key, kind, low=low, high=high, log=bool(value.get("log", False)), step=value.get("step"))


# -- validation --------------------------------------------------------------------------------

def check_search_space(raw: Mapping[str, Any], study: Mapping[str, Any]) -> Problems:
    """Every problem of the ``search_space`` section, each with its path."""
    problems: Problems = []
    for key, value in raw.items():
        path = f"search_space.{key}"
        if key not in KEYS:
            problems.append((path, "unknown parameter; allowed: " + ", ".join(KEYS)))
            continue
        problems += _check_entry(key, value, path)
    if not problems and isinstance(raw.get("rank"), Mapping) and "nested" in raw["rank"]:
        init = raw.get("init")
        inits = init.get("choices", []) if isinstance(init, Mapping) else [init]
        if "pissa" in inits:  # PiSSA moves the top-R components out of the base weight
            problems.append(("search_space.init", "pissa does not work with nested ranks (the base weight loses all "
                             "R principal components, a truncated adapter puts back only r); use kaiming or gaussian"))
    if not problems and isinstance(study.get("sampler"), Mapping) and study["sampler"].get("type") == "grid":
        problems += SearchSpace([_compile(k, raw[k]) for k in _ordered(raw)]).grid()[1]
    return problems


def _check_entry(key: str, value: Any, path: str) -> Problems:
    rule = KEYS[key]
    too_long = _too_long(key, value, path)
    if too_long:
        return too_long
    if _plain_value(key, value):
        message = rule.check(value)
        return [(path, message)] if message else []
    unknown = sorted(set(value) - _SPEC_KEYS)
    if unknown:
        return [(f"{path}.{unknown[0]}", "unknown key; allowed: type, low, high, log, step (a range), "
                 "choices" + (", ratio" if key == "alpha" else "") + (", nested" if key == "rank" else ""))]
    if "nested" in value or "nested_dropout" in value:
        return _check_nested(key, value, path)
    if "ratio" in value:
        return _check_ratio(key, value, path)
    if "choices" in value:
        return _check_choices(key, value, path)
    return _check_range(key, value, path)


def _too_long(key: str, value: Any, path: str) -> Problems:
    """A list over MAX_CHOICES (choices, ratio, nested) or MAX_LIST_ITEMS (a list value such as
    ``targets`` patterns): refused before any of its items is looked at."""
    def long_value(item: Any, where: str) -> Problems:
        if isinstance(item, list) and len(item) > MAX_LIST_ITEMS:
            return [(where, f"lists {len(item):,} items; a value may list at most {MAX_LIST_ITEMS:,}")]
        return []

    if _plain_value(key, value):
        return long_value(value, path)
    for name in ("choices", "ratio", "nested"):
        items = value.get(name)
        if not isinstance(items, list):
            continue
        if len(items) > MAX_CHOICES:
            return [(f"{path}.{name}", f"lists {len(items):,} values; at most {MAX_CHOICES:,} are allowed (a "
                     "sampler cannot make use of more: give fewer, or a range)")]
        for i, item in enumerate(items):
            problems = long_value(item, f"{path}.{name}[{i}]")
            if problems:
                return problems
    return []


def _check_ratio(key: str, value: Mapping[str, Any], path: str) -> Problems:
    if key != "alpha":
        return [(f"{path}.ratio", "only `alpha` can be given as a ratio of the rank")]
    if set(value) != {"ratio"}:
        return [(path, "`ratio` cannot be combined with other keys")]
    ratios = value["ratio"]
    if not isinstance(ratios, list) or not ratios:
        return [(f"{path}.ratio", f"must be a non-empty list of numbers > 0, got {short(ratios)}")]
    out: Problems = []
    for i, r in enumerate(ratios):
        message = _RATIO.problem(r)
        if message:
            out.append((f"{path}.ratio[{i}]", message))
    return out


def _check_nested(key: str, value: Mapping[str, Any], path: str) -> Problems:
    if key != "rank":
        return [(f"{path}.nested", "only `rank` can be nested")]
    extra = sorted(set(value) - {"nested", "nested_dropout"})
    if extra:
        return [(path, f"`nested` cannot be combined with {', '.join(extra)}; allowed with it: nested_dropout")]
    if "nested" not in value:
        return [(f"{path}.nested", "is required with nested_dropout (a list of ranks, e.g. [4, 8, 16, 32])")]
    ranks = value["nested"]
    if not isinstance(ranks, list) or len(ranks) < 2:
        return [(f"{path}.nested", f"must list at least two ranks in increasing order, e.g. [4, 8, 16, 32]; "
                 f"got {short(ranks)}")]
    out: Problems = []
    for i, r in enumerate(ranks):
        message = KEYS["rank"].check(r)
        if message:
            out.append((f"{path}.nested[{i}]", message))
    if not out and any(a >= b for a, b in zip(ranks, ranks[1:])):
        out.append((f"{path}.nested", f"must list the ranks in increasing order, each once; got {short(ranks)} "
                    f"(e.g. {short(sorted(set(ranks)))})"))
    dropout = value.get("nested_dropout", True)
    if not isinstance(dropout, bool):
        out.append((f"{path}.nested_dropout", f"must be true or false, got {short(dropout)}"))
    return out


def _check_choices(key: str, value: Mapping[str, Any], path: str) -> Problems:
    extra = set(value) - {"choices", "type"}
    if extra or value.get("type", "categorical") != "categorical":
        return [(path, "`choices` cannot be combined with a range (type/low/high/log/step)")]
    choices = value["choices"]
    if not isinstance(choices, list) or not choices:
        return [(f"{path}.choices", f"must be a non-empty list, got {short(choices)}")]
    out: Problems = []
    for i, c in enumerate(choices):
        message = KEYS[key].check(c)
        if message:
            out.append((f"{path}.choices[{i}]", message))
    if not out:
        seen: set[Any] = set()
        for c in choices:
            encoded = _key(encode_choice(key, c))
            if encoded in seen:
                out.append((f"{path}.choices", f"lists the same choice twice: {short(c)} (in {short(choices)})"))
                break
            seen.add(encoded)
    return out


def _check_range(key: str, value: Mapping[str, Any], path: str) -> Problems:
    rule = KEYS[key]
    if rule.numeric is None:
        return [(path, f"`{key}` takes a plain value or `choices: [...]`, not a range")]
    kind = value.get("type", rule.numeric)
    if kind not in ("int", "float"):
        return [(f"{path}.type", f"got {short(kind)}; allowed: int, float (or give `choices`)")]
    if kind == "float" and rule.numeric == "int":
        return [(f"{path}.type", f"`{key}` is an integer setting; use type: int")]
    out: Problems = []
    for bound in ("low", "high"):
        if bound not in value:
            out.append((f"{path}.{bound}", "is required for a range"))
            continue
        v = value[bound]
        if kind == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            out.append((f"{path}.{bound}", f"must be an integer, got {short(v)}"))
            continue
        message = "a range needs a number, got null" if v is None else rule.check(v)
        if message:
            out.append((f"{path}.{bound}", message))
    log, step = value.get("log", False), value.get("step")
    if not isinstance(log, bool):
        out.append((f"{path}.log", f"must be true or false, got {short(log)}"))
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            out.append((f"{path}.step", f"must be a number > 0, got {short(step)}"))
        elif kind == "int" and not isinstance(step, int):
            out.append((f"{path}.step", f"must be an integer for an int range, got {short(step)}"))
        elif log is True:
            out.append((f"{path}.step", "cannot be combined with log: true"))
    if out:
        return out
    low, high = value["low"], value["high"]
    if low > high:
        out.append((f"{path}.high", f"must be ≥ low ({short(low)}), got {short(high)}"))
    if log is True and low <= 0:
        out.append((f"{path}.low", f"must be > 0 with log: true, got {short(low)}"))
    return out


# -- baseline ------------------------------------------------------------------------------------

def baseline_params(space: SearchSpace, train_defaults: Mapping[str, Any], baseline_targets: str) -> tuple[dict[str, Any], Problems]:
    """Trial parameters of the conventional baseline (rank 8, alpha 16, ``baseline_targets``,
    no quantization, the study's defaults for everything else), for ``study.enqueue_trial``.

    Only sampled parameters appear; fixed ones stay fixed. A baseline value the space cannot
    express (a categorical without it, a range that excludes it) is a problem, because then
    the baseline would not be the baseline.
    """
    wanted = dict(BASELINE, targets=baseline_targets)
    params: dict[str, Any] = {}
    problems: Problems = []
    rank = wanted["rank"]
    rank_param = space["rank"]
    if rank_param is not None and rank_param.kind == "nested":
        params["rank"] = rank  # the baseline trains the conventional rank plainly, not nested
    elif rank_param is not None and not rank_param.sampled:
        rank = rank_param.value
    for p in space.sampled:
        path = f"search_space.{p.key}"
        if p.key == "quant_type":
            continue  # conditional on quant_bits == 4; the baseline is unquantized
        if p.kind == "ratio":
            ratio = wanted["alpha"] / rank
            match = next((c for c in p.choices if math.isclose(c, ratio)), None)
            if match is None:
                problems.append((path, _outside("alpha ratio", ratio, p)))
            params[p.name] = match
            continue
        if p.key in wanted:
            value = encode_choice(p.key, wanted[p.key])
            if not _contains(p, value):
                problems.append((path, _outside(p.key, wanted[p.key], p)))
            params[p.name] = value
            continue
        default = train_defaults.get(p.key, LORA_DEFAULTS.get(p.key))
        if p.kind == "categorical":
            value = encode_choice(p.key, default)
            params[p.name] = value if _contains(p, value) else p.choices[0]
        else:
            params[p.name] = _clamp(p, default)
    return params, problems


def _contains(p: Param, value: Any) -> bool:
    if p.kind == "categorical":
        return any(_key(value) == _key(c) for c in p.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return p.low <= value <= p.high


def _clamp(p: Param, value: Any) -> Any:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        value = p.low
    value = min(max(value, p.low), p.high)
    return int(round(value)) if p.kind == "int" else float(value)


def _outside(what: str, value: Any, p: Param) -> str:
    where = f"choices {short(p.choices)}" if p.kind in ("categorical", "ratio") else f"[{p.low}, {p.high}]"
    return (
        f"the baseline needs {what} = {show(value)}, which is outside {where}; "
        "add it to the space or set `study.baseline: false`"
    )
