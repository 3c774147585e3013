"""``study.serve``: the search space restricted to adapters the serving engine loads, by the rules
of :mod:`lora_tune.serving`. Choices it refuses are removed (and listed), a rank range is clipped to
``max_lora_rank``; a fixed value it refuses, or a key whose every choice it refuses, is a problem
naming the key and what is allowed. The restricted space is what the study stores, so every
trial, baseline and warm start is sampled from it."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_tune import serving
from lora_tune.lora.config import BIASES, INITS, LoraConfig
from lora_tune.serving import value_text
from lora_tune.settings import defaults_of
from lora_tune.study.schema.space_keys import Problems, plain_value

# the search-space keys serving rules read (modules_to_save is the task's: saved_modules_problems)
SERVE_KEYS = ("rank", "use_dora", "bias", "init", "rslora", "targets")
_DOMAINS: dict[str, tuple[Any, ...]] = {"use_dora": (False, True), "rslora": (False, True), "bias": BIASES,
                                        "init": INITS}
_DEFAULTS = defaults_of(LoraConfig)


@dataclass
class Restriction:
    """``space``: the ``search_space`` mapping restricted; ``removed``: one line per choice removed
    or range clipped (``use_dora: true removed: vLLM does not serve DoRA adapters (...)``);
    ``problems``: fixed values the engine cannot serve and keys it leaves without a choice."""

    space: dict[str, Any]
    removed: list[str] = field(default_factory=list)
    problems: Problems = field(default_factory=list)


def restriction_of(spec: Any) -> Restriction:
    """The restriction of a :class:`~lora_tune.study.schema.spec.StudySpec`'s search space by its
    ``study.serve``."""
    serve = spec.study.serve
    return restrict(spec.search_space, serve.engine, serve.rank_limit)


def serve_of(study: Mapping[str, Any]) -> tuple[tuple[str, int | None] | None, Problems]:
    """``((engine, rank limit), [])`` from a raw ``study`` section's ``serve`` (its defaults when
    absent), or ``(None, problems)`` when it is not valid (the schema says the same of a whole file)."""
    serve = study.get("serve", {}) if isinstance(study, Mapping) else {}
    if not isinstance(serve, Mapping):
        return None, [("study.serve", f"must be a mapping (engine, max_lora_rank), got {value_text(serve)}")]
    engine, given = serve.get("engine", "any"), serve.get("max_lora_rank")
    if engine not in serving.ENGINES:
        return None, [("study.serve.engine", f"got {value_text(engine)}; allowed: {', '.join(serving.ENGINES)}")]
    problem = serving.max_rank_problem(engine, given) if given is not None else None
    if problem:
        return None, [("study.serve.max_lora_rank", problem)]
    return (engine, given if given is not None else serving.rules(engine).default_max_lora_rank), []


def restrict(raw: Mapping[str, Any], engine: str, max_lora_rank: int | None) -> Restriction:
    """``raw`` (a checked ``search_space`` mapping) restricted to what ``engine`` serves with ranks up
    to ``max_lora_rank`` (None: no limit)."""
    out = Restriction(dict(raw))
    if engine == "any" and max_lora_rank is None:
        return out
    for key in SERVE_KEYS:
        path = f"search_space.{key}"
        if key not in raw:
            why = _why(key, _DEFAULTS[key], engine, max_lora_rank)
            if why:
                out.problems.append((path, f"not given, so every trial takes LoraConfig's default "
                                           f"{value_text(_DEFAULTS[key])}: {why[0]}; give `{key}`: "
                                           f"{_allowed(key, engine, max_lora_rank)}"))
            continue
        value = raw[key]
        if plain_value(key, value):
            why = _why(key, value, engine, max_lora_rank)
            if why:
                out.problems.append((path, f"got {value_text(value)}: {why[0]}; allowed with study.serve.engine "
                                           f"{engine}: {_allowed(key, engine, max_lora_rank)}"))
        elif "choices" in value:
            _choices(out, key, value, engine, max_lora_rank)
        elif "nested" in value:
            _nested(out, value, engine, max_lora_rank)
        elif "low" in value and "high" in value:
            _range(out, key, value, engine, max_lora_rank)
    return out


def saved_modules_problems(modules_to_save: Sequence[str], engine: str, max_lora_rank: int | None) -> Problems:
    """The task's ``modules_to_save`` (trained fully, beside the adapter) against ``engine``."""
    return [("task.modules_to_save", f"{text}; this task trains them fully, so choose study.serve.engine "
                                     f"any (or a task without modules_to_save)")
            for text in serving.unservable({"modules_to_save": list(modules_to_save)}, engine, max_lora_rank)]


def _why(key: str, value: Any, engine: str, max_lora_rank: int | None) -> list[str]:
    return [why for k, _, why in serving.reasons({key: value}, engine, max_lora_rank) if k == key]


def _allowed(key: str, engine: str, max_lora_rank: int | None) -> str:
    if key == "rank":
        return f"a rank ≤ {max_lora_rank} (study.serve.max_lora_rank)"
    if key == "targets":
        refused = serving.rules(engine).refused_targets
        return f"a preset other than {', '.join(refused)}, or a list of module-name patterns"
    return ", ".join(value_text(v) for v in _DOMAINS[key] if not _why(key, v, engine, max_lora_rank))


def _choices(out: Restriction, key: str, value: Mapping[str, Any], engine: str, max_lora_rank: int | None) -> None:
    kept, first_why = [], None
    for choice in value["choices"]:
        why = _why(key, choice, engine, max_lora_rank)
        if why:
            out.removed.append(f"{key}: {value_text(choice)} removed: {why[0]}")
            first_why = first_why or why[0]
        else:
            kept.append(choice)
    if not kept:
        listed = value_text(list(value["choices"]))
        out.problems.append((f"search_space.{key}.choices",
                             f"study.serve.engine {engine} removes every choice ({listed}): {first_why}; "
                             f"allowed: {_allowed(key, engine, max_lora_rank)}"))
    elif len(kept) < len(value["choices"]):
        out.space[key] = {**value, "choices": kept}


def _nested(out: Restriction, value: Mapping[str, Any], engine: str, max_lora_rank: int | None) -> None:
    ranks = list(value["nested"])
    kept = [r for r in ranks if not _why("rank", r, engine, max_lora_rank)]
    if len(kept) == len(ranks):
        return
    why = _why("rank", ranks[-1], engine, max_lora_rank)[0]
    out.removed += [f"rank: nested {r} removed: {why}" for r in ranks if r not in kept]
    if not kept:
        out.problems.append(("search_space.rank.nested", f"study.serve.engine {engine} removes every rank "
                             f"({value_text(ranks)}): {why}; allowed: {_allowed('rank', engine, max_lora_rank)}"))
    elif len(kept) == 1:
        out.space["rank"] = kept[0]
        out.removed.append(f"rank: nested ranks {value_text(ranks)} became the plain rank {kept[0]}")
    else:
        out.space["rank"] = {**value, "nested": kept}


def _range(out: Restriction, key: str, value: Mapping[str, Any], engine: str, max_lora_rank: int | None) -> None:
    low, high = value["low"], value["high"]
    if not _why(key, high, engine, max_lora_rank):
        return
    if _why(key, low, engine, max_lora_rank):
        out.problems.append((f"search_space.{key}.low", f"got {value_text(low)}: "
                             f"{_why(key, low, engine, max_lora_rank)[0]}; allowed: "
                             f"{_allowed(key, engine, max_lora_rank)}"))
        return
    assert max_lora_rank is not None  # only ranks have ranges among SERVE_KEYS
    step = value.get("step") or 1
    new_high = low + math.floor((max_lora_rank - low) / step) * step
    new_high = int(new_high) if isinstance(low, int) and isinstance(step, int) else new_high
    out.space[key] = {**value, "high": new_high}
    out.removed.append(f"{key}: range [{value_text(low)}, {value_text(high)}] clipped to "
                       f"[{value_text(low)}, {value_text(new_high)}]: {_why(key, high, engine, max_lora_rank)[0]}")
