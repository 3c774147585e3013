"""The ``search_space`` keys (the searchable settings of LoraConfig and TrainConfig), how a
categorical choice is stored in Optuna, and the check of every entry (:func:`check_keys`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Mapping

from lora_tune.errors import ConfigError, short
from lora_tune.lora.config import LoraConfig, layers_label, normalize_layers, quantized_bits
from lora_tune.settings import Setting, settings_of
from lora_tune.train import TrainConfig

Problems = list[tuple[str, str]]
Check = Callable[[Any], "str | None"]

_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices", "ratio", "nested", "nested_dropout"}
# longest lists (of choices / ratios / nested ranks, and in a value such as `targets`), refused
# before they are looked at
MAX_CHOICES = 1_000
MAX_LIST_ITEMS = 10_000


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


def plain_value(key: str, value: Any) -> bool:
    """Whether ``value`` fixes ``key`` (rather than being a range / choices spec)."""
    return not isinstance(value, Mapping) or (key == "layers" and "choices" not in value)


@dataclass(frozen=True)
class KeyRule:
    check: Check
    numeric: str | None  # "int" / "float" when ranges are allowed, else None (choices only)


_OWN_CHECKS: dict[str, Check] = {"targets": _targets, "layers": _layers}  # values the space stores as text
_RATIO = Setting(float, gt=0)  # alpha as a ratio of the rank
KEYS: dict[str, KeyRule] = {key: KeyRule(_OWN_CHECKS.get(key, rule.problem), rule.numeric)
                            for cls in (LoraConfig, TrainConfig) for key, rule in settings_of(cls).items()
                            if rule.searchable}
TRAIN_KEYS = tuple(key for key, rule in settings_of(TrainConfig).items() if rule.searchable)


# -- how a choice is stored -------------------------------------------------------------------

def encode_choice(key: str, value: Any) -> Any:
    """The value Optuna stores for a categorical choice of ``key``."""
    if key == "targets" and isinstance(value, list):
        return "|".join(value)
    if key == "quant_bits":
        return quantized_bits(value) or 0  # 0: not quantized
    if key == "layers":
        return layers_label(value)
    return value


def decode_choice(key: str, value: Any) -> Any:
    if key == "quant_bits":
        return quantized_bits(value)
    if key == "layers":
        return normalize_layers(value)
    return value


def choice_key(v: Any) -> Any:
    # bool and int compare equal in dicts (True == 1); keep them apart.
    return (type(v).__name__, v)


# -- checks ----------------------------------------------------------------------------------------

def check_keys(raw: Mapping[str, Any]) -> Problems:
    """Every problem of the ``search_space`` section's keys and values, each with its path."""
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
    return problems


def _check_entry(key: str, value: Any, path: str) -> Problems:
    rule = KEYS[key]
    too_long = _too_long(key, value, path)
    if too_long:
        return too_long
    if plain_value(key, value):
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
    """A list over MAX_CHOICES or MAX_LIST_ITEMS, found before any item is looked at."""
    def long_value(item: Any, where: str) -> Problems:
        if isinstance(item, list) and len(item) > MAX_LIST_ITEMS:
            return [(where, f"lists {len(item):,} items; a value may list at most {MAX_LIST_ITEMS:,}")]
        return []

    if plain_value(key, value):
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


def _each(items: list[Any], check: Check, path: str) -> Problems:
    return [(f"{path}[{i}]", message) for i, item in enumerate(items) if (message := check(item))]


def _check_ratio(key: str, value: Mapping[str, Any], path: str) -> Problems:
    if key != "alpha":
        return [(f"{path}.ratio", "only `alpha` can be given as a ratio of the rank")]
    if set(value) != {"ratio"}:
        return [(path, "`ratio` cannot be combined with other keys")]
    ratios = value["ratio"]
    if not isinstance(ratios, list) or not ratios:
        return [(f"{path}.ratio", f"must be a non-empty list of numbers > 0, got {short(ratios)}")]
    return _each(ratios, _RATIO.problem, f"{path}.ratio")


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
    out = _each(ranks, KEYS["rank"].check, f"{path}.nested")
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
    out = _each(choices, KEYS[key].check, f"{path}.choices")
    if not out:
        seen: set[Any] = set()
        for c in choices:
            encoded = choice_key(encode_choice(key, c))
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
