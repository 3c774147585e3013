"""LoraConfig: what to adapt and how. Validated at construction; imports nothing but the stdlib."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

from lora_tune.errors import ConfigError

METHODS = ("parallel", "merged")
INITS = ("kaiming", "gaussian", "pissa")
BIASES = ("none", "all", "lora_only")
QUANT_BITS = (None, 4, 8, 16, 32)
QUANT_TYPES = ("nf4", "fp4")
QKV_PARTS = ("q", "k", "v")


@dataclass
class LoraConfig:
    """How to adapt a model with LoRA.

    ``scale`` is ``alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``).
    ``targets`` is a preset name (see :func:`lora_tune.target_presets`) or a list of
    module-name patterns: exact names, ``.suffix`` matches, globs, or ``re:`` regexes.
    ``enable_lora`` picks the parts (q/k/v) of fused qkv layers adapted by default, and
    ``qkv_sizes`` (pattern -> [q_rows, k_rows, v_rows]) says how a fused layer's output splits
    where lora-tune cannot read it from the model's head counts.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    exclude: list[str] = field(default_factory=list)
    method: str = "parallel"
    quant_bits: int | None = None
    quant_type: str = "nf4"
    double_quant: bool = True
    rslora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    enable_lora: list[str] | None = None
    qkv_sizes: dict[str, list[int]] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rank = _positive_int("rank", self.rank)
        self.alpha = _positive_float("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= float(self.dropout) < 1.0
        ):
            raise ConfigError("dropout", self.dropout, "a number p with 0 <= p < 1")
        self.dropout = float(self.dropout)
        if isinstance(self.targets, str):
            if not self.targets.strip():
                raise ConfigError("targets", self.targets, "a preset name or a non-empty list of patterns")
        elif isinstance(self.targets, (list, tuple)) and self.targets and all(
            isinstance(t, str) and t for t in self.targets
        ):
            self.targets = list(self.targets)
        else:
            raise ConfigError("targets", self.targets, "a preset name or a non-empty list of module-name patterns")
        self.exclude = _str_list("exclude", self.exclude)
        self.modules_to_save = _str_list("modules_to_save", self.modules_to_save)
        _choice("method", self.method, METHODS)
        if isinstance(self.quant_bits, bool) or self.quant_bits not in QUANT_BITS:
            raise ConfigError("quant_bits", self.quant_bits, "None, 16 or 32 (no quantization), 8, or 4")
        if self.quant_bits in (16, 32):
            self.quant_bits = None
        _choice("quant_type", self.quant_type, QUANT_TYPES)
        _bool("double_quant", self.double_quant)
        _bool("rslora", self.rslora)
        _choice("init", self.init, INITS)
        _choice("bias", self.bias, BIASES)
        if not isinstance(self.rank_pattern, Mapping):
            raise ConfigError("rank_pattern", self.rank_pattern, "a mapping of module pattern -> rank (int >= 1)")
        self.rank_pattern = {str(k): _positive_int(f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items()}
        if not isinstance(self.alpha_pattern, Mapping):
            raise ConfigError("alpha_pattern", self.alpha_pattern, "a mapping of module pattern -> alpha (> 0)")
        self.alpha_pattern = {
            str(k): _positive_float(f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()
        }
        if self.enable_lora is not None:
            parts = self.enable_lora
            if isinstance(parts, str) or not isinstance(parts, (list, tuple)) or not parts or any(
                p not in QKV_PARTS for p in parts
            ) or len(set(parts)) != len(parts):
                raise ConfigError("enable_lora", parts, "None (all parts) or a non-empty list drawn from ['q', 'k', 'v']")
            self.enable_lora = [p for p in QKV_PARTS if p in parts]
        self.qkv_sizes = _sizes_map("qkv_sizes", self.qkv_sizes)

    # -- helpers ---------------------------------------------------------------
    def scale_for(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    @property
    def scale(self) -> float:
        return self.scale_for(self.rank, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], data[unknown[0]], "fields of LoraConfig: " + ", ".join(sorted(known)))
        return cls(**dict(data))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, "an integer >= 1")
    return int(value)


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(name, value, "a finite number > 0")
    return float(value)


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(name, value, "one of " + ", ".join(repr(a) for a in allowed))


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "true or false")


def _sizes_map(name: str, value: Any) -> dict[str, list[int]]:
    allowed = "a mapping of module pattern -> [q_rows, k_rows, v_rows] (three integers >= 1)"
    if not isinstance(value, Mapping):
        raise ConfigError(name, value, allowed)
    out = {}
    for key, sizes in value.items():
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) != len(QKV_PARTS):
            raise ConfigError(f"{name}[{key!r}]", sizes, allowed)
        out[str(key)] = [_positive_int(f"{name}[{key!r}]", s) for s in sizes]
    return out


def _str_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(name, value, "a list of module-name patterns")
    return list(value)
