"""The search space: a study file's ``search_space`` section (its forms: README.md) -> the
``trial.suggest_*`` calls, with the trial parameters of docs/architecture.md. The keys, their
checks and encodings are :mod:`.space_keys`'s. ``trial`` is anything with Optuna's
``suggest_*`` methods; this module does not import optuna.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from collections.abc import Callable, Mapping

from lora_tune.errors import ConfigError, StudySpecError, short
from lora_tune.lora.config import LoraConfig
from lora_tune.lora.nested import NestedRanks
from lora_tune.settings import defaults_of, show
from lora_tune.study.schema.serve_space import restrict, serve_of
from lora_tune.study.schema.space_keys import (
    KEYS, TRAIN_KEYS, Problems, check_keys, choice_key, decode_choice, encode_choice, plain_value,
)
from lora_tune.study.schema.yaml_file import load_yaml, read_spec_text

LORA_DEFAULTS: Mapping[str, Any] = MappingProxyType(defaults_of(LoraConfig))  # one source: LoraConfig
# A mapping with any of these keys is a whole study file: StudySpec's sections (spec.py imports
# this module, so the names are written here; tests/study/test_spec_settings.py checks they agree).
STUDY_SECTIONS = ("study", "task", "search_space", "train", "constraints")
BASELINE = {"rank": 8, "alpha": 16.0, "quant_bits": None}  # plus the task's baseline targets
_ORDER = ("rank", "alpha", "targets", "layers", "quant_bits", "quant_type", "method", "dropout", "rslora")


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
        return self.decoded.get(choice_key(encoded), encoded)


@dataclass
class SearchSpace:
    """The compiled ``search_space`` of a study file: one :class:`Param` per key."""

    params: list[Param]

    @classmethod
    def from_spec(cls, raw: Mapping[str, Any]) -> SearchSpace:
        """From a validated-or-not ``search_space`` mapping; raises StudySpecError with every problem."""
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> SearchSpace:
        """From a whole study file as a dict or from its ``search_space`` mapping; raises
        StudySpecError listing every problem (``source`` names the file)."""
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
        serve, serve_problems = serve_of(study)
        problems += serve_problems
        if problems:
            raise StudySpecError(problems, source=source)
        if serve is not None:  # a whole study file: the space its study.serve engine serves
            raw = restrict(raw, *serve).space
        return cls([_compile(key, raw[key]) for key in _ordered(raw)])

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SearchSpace:
        """From a study file's ``search_space`` section (or a file holding only that); only that
        section is checked, so the ``task`` needs nothing installed."""
        data = load_yaml(read_spec_text(path), source=str(path))
        return cls.from_dict(data, source=str(path))

    def suggest(self, trial: Any, **fixed: Any) -> LoraConfig:
        """The trial's :class:`lora_tune.LoraConfig` as lora-tune's studies suggest it; other fields
        at their defaults or as ``fixed`` gives them (a key the space sets is an error)."""
        clash = sorted(set(fixed) & {p.key for p in self.params})
        if clash:
            raise ConfigError(clash[0], fixed[clash[0]], "LoraConfig fields the search space does not set",
                              f"the search space already sets {short(clash[0])}; give it in one place")
        values = self._sample(trial, lambda key: key not in TRAIN_KEYS)
        return LoraConfig.from_dict({**values, **fixed})

    def suggest_training(self, trial: Any) -> dict[str, Any]:
        """The trial's training settings (:data:`TRAIN_KEYS`) the space has, as ``{key: value}``."""
        return self._sample(trial, lambda key: key in TRAIN_KEYS)

    def nested_ranks(self, params: Mapping[str, Any]) -> NestedRanks | None:
        """The nested ranks a trial with these ``trial.params`` trains, or None (no nested rank, or
        not the largest: an enqueued baseline or warm start trains its own rank plainly)."""
        p = self["rank"]
        if p is None or p.kind != "nested" or params.get("rank") != p.value:
            return None
        at = [self.at_rank(params, r) for r in p.choices]
        return NestedRanks(tuple(p.choices), tuple(float(v.get("alpha", LORA_DEFAULTS["alpha"])) for v in at),
                           rslora=bool(at[-1].get("rslora", LORA_DEFAULTS["rslora"])), sample=p.nested_dropout)

    def at_rank(self, params: Mapping[str, Any], rank: int) -> dict[str, Any]:
        """What :meth:`sample` gives for these trial parameters with ``rank`` instead (a ratio's
        alpha follows it): the values of a nested rank's own result."""
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
        return [p.decoded.get(choice_key(c), c) for c in p.choices]

    def __getitem__(self, key: str) -> Param | None:
        return next((p for p in self.params if p.key == key), None)

    @property
    def sampled(self) -> list[Param]:
        return [p for p in self.params if p.sampled]

    def sample(self, trial: Any) -> dict[str, Any]:
        """Suggest every sampled key (``quant_type`` only with 4 bits); ``{key: value}`` for every key."""
        return self._sample(trial, lambda key: True)

    def _sample(self, trial: Any, wanted: Callable[[str], bool]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for p in (p for p in self.params if wanted(p.key)):
            if p.key == "quant_type" and p.sampled and values.get("quant_bits", LORA_DEFAULTS["quant_bits"]) != 4:
                continue
            if p.kind == "fixed":
                values[p.key] = decode_choice(p.key, p.value)
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
    if plain_value(key, value):
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
        decoded = {choice_key(encode_choice(key, c)): decode_choice(key, c) for c in value["choices"]}
        unique = list(dict.fromkeys(encoded))
        if len(unique) == 1:
            return Param(key, key, "fixed", value=decoded[choice_key(unique[0])])
        return Param(key, key, "categorical", choices=unique, decoded=decoded)
    kind = value.get("type") or rule.numeric
    low, high = value["low"], value["high"]
    return Param(key, key, kind, low=low, high=high, log=bool(value.get("log", False)), step=value.get("step"))


# -- validation --------------------------------------------------------------------------------

def check_search_space(raw: Mapping[str, Any], study: Mapping[str, Any]) -> Problems:
    """Every problem of the ``search_space`` section, each with its path (a grid sampler also
    needs every sampled parameter to have finitely many values; ``study.serve``'s engine must
    leave every key a value it serves: :mod:`.serve_space`)."""
    problems = check_keys(raw)
    if not problems and isinstance(study.get("sampler"), Mapping) and study["sampler"].get("type") == "grid":
        problems += SearchSpace([_compile(k, raw[k]) for k in _ordered(raw)]).grid()[1]
    serve = serve_of(study)[0] if not problems else None  # an invalid serve section is the schema's problem
    if serve is not None:
        problems += restrict(raw, *serve).problems
    return problems


# -- baseline ------------------------------------------------------------------------------------

def baseline_params(space: SearchSpace, train_defaults: Mapping[str, Any],
                    baseline_targets: str) -> tuple[dict[str, Any], Problems]:
    """The sampled parameters of the conventional baseline (rank 8, alpha 16, ``baseline_targets``,
    no quantization, defaults otherwise) for ``study.enqueue_trial``; a value the space cannot
    express is a problem, since the baseline would not be the baseline."""
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
        return any(choice_key(value) == choice_key(c) for c in p.choices)
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
