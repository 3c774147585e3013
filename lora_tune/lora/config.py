"""LoraConfig: what to adapt and how. Validated at construction (each field's facts declared once,
as a :func:`lora_tune.settings.setting`); imports nothing but the stdlib."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

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
                raise ConfigError("enable_lora", parts, "None (all parts) or a non-empty list drawn from ['q', 'k', 'v']")
            self.enable_lora = [p for p in QKV_PARTS if p in parts]
        self.qkv_sizes = _sizes_map("qkv_sizes", self.qkv_sizes)
        self.layers = normalize_layers(self.layers)
        if self.layers_pattern is not None:
            self.layers_pattern = _str_list("layers_pattern", self.layers_pattern)
            if not self.layers_pattern:
                raise ConfigError("layers_pattern", self.layers_pattern, "None or a non-empty list of layer-stack names")

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

    # -- PEFT (torch and peft are imported on use) -------------------------------
    def to_peft(self, model: Any) -> Any:
        """The ``peft.LoraConfig`` that adapts ``model`` as this config does.

        The targets are resolved on ``model`` by lora-tune's resolver and written as the exact
        module names (a list, or one regex where a name list would also match other modules);
        ranks and alphas that differ from ``rank`` / ``alpha`` go into ``rank_pattern`` /
        ``alpha_pattern`` anchored to one module each. ``dropout``, ``rslora``, ``bias``, ``init``
        (kaiming -> True, gaussian -> "gaussian", pissa -> "pissa") and ``modules_to_save`` map to
        their PEFT fields. Names are relative to ``model``: give the same model (or the same
        architecture) to ``peft.get_peft_model``. ``task_type`` is left None; note that PEFT's
        SEQ_CLS / TOKEN_CLS task types add ``classifier`` / ``score`` to ``modules_to_save``.
        ``use_dora`` maps to PEFT's ``use_dora`` (the same function: see :mod:`lora_tune.lora.dora`).
        Expert weight stacks go into ``target_parameters`` by their full parameter names (the same
        E pairs per stack). With ``layers`` set, the targets are written as their names inside a
        block plus ``layers_to_transform`` / ``layers_pattern`` where PEFT's rule then matches
        exactly the same modules (else as exact names; see :mod:`lora_tune.lora.peft_targets`).

        A fused qkv layer adapted on all of q, k, v (GPT-2's ``c_attn``) becomes PEFT's one pair of
        rank ``r`` over the whole layer, its usual recipe; lora-tune trains one pair per part
        there (A repeated per part reproduces PEFT's pair). To carry weights trained with
        lora-tune into PEFT, use ``save_adapter(model, path, format="peft")``, which writes such
        a layer as one block-diagonal pair of rank 3r.

        ``quant_bits`` does not block: PEFT quantizes at model load, not in its LoraConfig (pass
        ``transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant)``, or ``load_in_8bit=True``, to
        ``from_pretrained``, then ``peft.prepare_model_for_kbit_training``). Call ``to_peft`` on the
        unquantized model or one of the same architecture.

        Raises ConfigError, naming the field, for what PEFT's LoraConfig cannot express:
        ``method="merged"``, nn.MultiheadAttention, fused qkv part selectors (``c_attn[q,v]``,
        ``enable_lora``), grouped / dilated / non-zero-padded convs, ``init="pissa"`` on layers
        other than Linear / Conv1D, ``modules_to_save`` names PEFT would match more widely,
        ``dropout`` with expert stacks (PEFT's target_parameters refuses it), and a model that
        already carries LoRA layers; and whatever ``inject`` would raise.
        """
        from lora_tune.lora.peft_config import to_peft_config  # noqa: PLC0415

        return to_peft_config(self, model)

    @classmethod
    def from_peft(cls, source: Any) -> "LoraConfig":
        """A LoraConfig from a ``peft.LoraConfig``, a dict of its fields, or a PEFT adapter
        directory (its ``adapter_config.json``; the weights are not read -- ``load_adapter``
        loads them).

        ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``bias``, ``init_lora_weights``
        (True, "gaussian", "pissa"), ``target_modules``, ``exclude_modules``, ``modules_to_save``,
        ``rank_pattern``, ``alpha_pattern``, ``use_dora``, ``target_parameters`` (expert stacks),
        ``layers_to_transform`` and ``layers_pattern`` (``layers`` as block indices,
        ``layers_pattern``) are translated with PEFT's matching rules (a name
        list: the module or a dotted suffix; a string: a fullmatched regex; ``"all-linear"``:
        lora-tune's preset of that name; pattern keys: ``(.*\\.)?KEY$``; modules_to_save: any
        name ending with the entry, plus the heads PEFT adds for SEQ_CLS / TOKEN_CLS /
        QUESTION_ANS). A field a dict leaves out takes PEFT's default (``lora_alpha`` 8).
        Metadata (``task_type``, ``base_model_name_or_path``, ``inference_mode``, ...) and
        ``fan_in_fan_out`` (lora-tune reads the layout from the layer) are not needed.

        Raises ConfigError naming the PEFT field for every PEFT option lora-tune lacks:
        ``lora_bias``, ``megatron_config``, ``trainable_token_indices``, ``layer_replication``, LoftQ / EVA /
        CorDA / ... configs, ``init_lora_weights`` other than True / "gaussian" / "pissa", and
        a missing ``target_modules`` (and ``target_parameters``); ``target_parameters`` named without
        their block index together with ``layers_to_transform`` (PEFT adapts those in every block).

        Differences to know: lora-tune's ``all-linear`` also adapts expert stacks and never a
        router (PEFT's adapts Linear routers such as Qwen2-MoE's ``shared_expert_gate``);
        ``layers`` applies to every target, where PEFT ignores ``layers_to_transform`` for exact
        names; lora-tune adapts a fused qkv layer (GPT-2's ``c_attn``) with one pair per q/k/v
        part where PEFT uses one pair for the layer (a superset: PEFT's pair loads into it, see
        ``load_adapter``); each target pattern must match something, where PEFT only needs one of
        them to.
        """
        from lora_tune.lora.peft_config import from_peft_config  # noqa: PLC0415

        return from_peft_config(source)


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
            raise ConfigError("layers", value, LAYERS_ALLOWED + ", or such a value written 'last:4', 'first:2', '0|1|2'")
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
