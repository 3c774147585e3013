"""LoraConfig: what to adapt and how. Validated at construction (each field's facts declared once,
as a :func:`lora_tune.settings.setting`); imports nothing but the stdlib."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from collections.abc import Mapping, Sequence

from lora_tune.errors import ConfigError
from lora_tune.settings import check_settings, setting

METHODS = ("parallel", "merged")
INITS = ("kaiming", "gaussian", "pissa")
BIASES = ("none", "all", "lora_only")
QUANT_BITS = (None, 4, 8, 16, 32)  # None, 16 and 32: not quantized (see quantized_bits)
QUANT_TYPES = ("nf4", "fp4")
QKV_PARTS = ("q", "k", "v")


def quantized_bits(bits: int | None) -> int | None:
    """What a ``quant_bits`` value means: 4 or 8 (the base is quantized to that many bits), or
    None (not quantized: None, 16 or 32)."""
    return None if bits in (16, 32) else bits


def scale_for(rank: int, alpha: float, rslora: bool) -> float:
    """LoRA's scale: alpha / r, or alpha / sqrt(r) with rsLoRA (the one formula)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass
class LoraConfig:
    """How to adapt a model with LoRA.

    ``scale`` is ``alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``).
    ``targets`` is a preset name (see :func:`lora_tune.target_presets`) or a list of
    module-name patterns: exact names, ``.suffix`` matches, globs, or ``re:`` regexes.
    ``enable_lora`` picks the parts (q/k/v) of fused qkv layers adapted by default, and
    ``qkv_sizes`` (pattern -> [q_rows, k_rows, v_rows]) says how a fused layer's output splits
    where lora-tune cannot read it from the model's head counts.
    ``use_dora`` trains DoRA (weight-decomposed LoRA, see :mod:`lora_tune.lora.dora`): a magnitude
    per output row on top of the low-rank direction, for Linear, fused qkv, GPT-2 Conv1D,
    Conv1d/2d/3d and Embedding targets.
    ``layers`` restricts LoRA to some of the model's repeated blocks: ``{"first": N}``,
    ``{"last": N}`` or a list of block indices, in every layer stack (both stacks of an
    encoder-decoder model); None or ``"all"`` adapts every block. Targets outside the blocks
    (a pooler, a projection between stacks) are then left out. ``layers_pattern`` names the
    stacks ``layers`` counts in (their attribute name, e.g. ``["layers"]`` or ``["block"]``, as
    PEFT's ``layers_pattern``); None means every stack :func:`lora_tune.lora.blocks.layer_stacks`
    finds.
    """

    rank: int = setting(8, int, ge=1, searchable=True)
    alpha: float = setting(16.0, float, gt=0, searchable=True)
    dropout: float = setting(0.0, float, ge=0, lt=1, searchable=True)
    targets: str | list[str] = setting("all-linear", searchable=True)  # checked in __post_init__
    exclude: list[str] = field(default_factory=list)
    method: str = setting("parallel", choices=METHODS, searchable=True)
    quant_bits: int | None = setting(None, choices=QUANT_BITS, searchable=True,
                                     describe="null/None, 16 or 32 (no quantization), 8 or 4")
    quant_type: str = setting("nf4", choices=QUANT_TYPES, searchable=True)
    double_quant: bool = setting(True, bool, searchable=True)
    rslora: bool = setting(False, bool, searchable=True)
    init: str = setting("kaiming", choices=INITS, searchable=True)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = setting("none", choices=BIASES, searchable=True)
    enable_lora: list[str] | None = None
    qkv_sizes: dict[str, list[int]] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    use_dora: bool = setting(False, bool, searchable=True)
    layers: dict[str, int] | list[int] | None = setting(None, searchable=True)  # normalize_layers
    layers_pattern: list[str] | None = None

    def __post_init__(self) -> None:
        check_settings(self)
        self.alpha, self.dropout = float(self.alpha), float(self.dropout)
        self.quant_bits = quantized_bits(self.quant_bits)
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
                raise ConfigError("enable_lora", parts,
                                  "None (all parts) or a non-empty list drawn from ['q', 'k', 'v']")
            self.enable_lora = [p for p in QKV_PARTS if p in parts]
        self.qkv_sizes = _sizes_map("qkv_sizes", self.qkv_sizes)
        self.layers = normalize_layers(self.layers)
        if self.layers_pattern is not None:
            self.layers_pattern = _str_list("layers_pattern", self.layers_pattern)
            if not self.layers_pattern:
                raise ConfigError("layers_pattern", self.layers_pattern,
                                  "None or a non-empty list of layer-stack names")

    # -- helpers ---------------------------------------------------------------
    def scale_for(self, rank: int, alpha: float) -> float:
        return scale_for(rank, alpha, self.rslora)

    @property
    def scale(self) -> float:
        return self.scale_for(self.rank, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
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


LAYERS_ALLOWED = "None or 'all' (every block), {'first': N} or {'last': N} (N >= 1), or a list of block indices (>= 0)"


def layers_label(layers: Any) -> str:
    """How a ``layers`` value is written in trial parameters and reports: ``all``, ``first:2``,
    ``last:4``, ``0|1|2`` (:func:`normalize_layers` reads these back)."""
    layers = normalize_layers(layers)
    if layers is None:
        return "all"
    if isinstance(layers, Mapping):
        (side, n), = layers.items()
        return f"{side}:{n}"
    return "|".join(str(i) for i in layers)


def normalize_layers(value: Any) -> dict[str, int] | list[int] | None:
    """``LoraConfig.layers`` checked and normalised: None, ``{"first": N}``, ``{"last": N}`` or a
    sorted list of distinct block indices. ``"all"`` becomes None, and the labels of
    :func:`layers_label` (``"last:4"``, ``"0|1|2"``) their values."""
    if value is None or value == "all":
        return None
    if isinstance(value, str):
        side, colon, n = value.partition(":")
        if colon and side in ("first", "last") and n.strip().isdigit():
            value = {side: int(n)}
        elif all(part.strip().isdigit() for part in value.split("|")):
            value = [int(part) for part in value.split("|")]
        else:
            raise ConfigError("layers", value,
                              LAYERS_ALLOWED + ", or such a value written 'last:4', 'first:2', '0|1|2'")
    if isinstance(value, Mapping):
        if len(value) != 1 or next(iter(value)) not in ("first", "last"):
            raise ConfigError("layers", dict(value), LAYERS_ALLOWED)
        (side, n), = value.items()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"layers.{side}", n, "an integer >= 1 (how many blocks)")
        return {side: int(n)}
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    ):
        if len(set(value)) != len(value):
            raise ConfigError("layers", list(value), "a list of distinct block indices")
        return sorted(int(i) for i in value)
    raise ConfigError("layers", value, LAYERS_ALLOWED)


def _str_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(name, value, "a list of module-name patterns")
    return list(value)
