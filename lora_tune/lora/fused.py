"""Fused q/k/v projections: recognising them and telling how their output rows split.

A fused projection computes q, k and v with one weight whose output rows are the three blocks
``[q | k | v]`` one after the other. With multi-head attention the blocks are equal thirds
(GPT-2's ``c_attn``, ViT's ``qkv``); with grouped-query attention they are not: Phi-3's
``qkv_proj`` has ``(H + 2*KV) * head_dim`` rows, ``H * head_dim`` of them for q.

:func:`qkv_sizes` is the one place that decides the split. Everything that splits a fused
layer (part selectors ``name[q,v]``, ``enable_lora``, PiSSA, the PEFT format) uses its answer;
a layer it cannot split is adapted as one plain layer, and asking for parts of it is an error.

The second half is the layout of per-part LoRA factors over such a split, shared by the fused
Linear wrapper and nn.MultiheadAttention's packed in_proj.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from lora_tune.errors import ConfigError
from lora_tune.lora.quant import QuantizedLinear

FUSED_NAMES = {"qkv", "c_attn", "in_proj", "query_key_value", "wqkv", "qkv_proj", "to_qkv", "w_pack"}
"""Last name components of fused q/k/v projections (lower case)."""

INTERLEAVED_QKV_MODEL_TYPES = frozenset(
    {"bloom", "codegen", "falcon", "gpt_neox", "gpt_neox_japanese", "internlm2", "persimmon"})
"""transformers model types whose fused projection interleaves q/k/v rows per head or group
instead of stacking three blocks: their fused layers are adapted whole."""

# attribute names, on an attention module or on its transformers config, in order of preference
_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_n_heads")
_KV_GROUPS = ("num_key_value_groups",)
_HEAD_DIM = ("head_dim",)

Sizes = tuple[int, int, int]


def out_features(module: nn.Module) -> int:
    """Output size of a Linear (a QuantizedLinear too) or of transformers' GPT-2 ``Conv1D`` (weight
    stored in x out)."""
    if isinstance(module, QuantizedLinear):
        return module.out_features
    weight = cast(torch.Tensor, module.weight)
    return weight.shape[0] if isinstance(module, nn.Linear) else weight.shape[1]


def has_fused_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in FUSED_NAMES


def qkv_sizes(model: nn.Module, name: str, module: nn.Module, given: Sequence[int] | None = None) -> Sizes | None:
    """Output rows of q, k and v in the fused projection ``name`` of ``model``, or None when it is
    not a fused projection that lora-tune can split.

    * ``given`` (what ``LoraConfig.qkv_sizes`` says for the layer) wins; it must add up to the
      output size, and is refused for model types that interleave q/k/v rows;
    * a layer whose name is not a fused name, or in a model type that interleaves, gives None;
    * otherwise the head counts of the nearest enclosing module stating them (on itself or its
      transformers ``config``) give ``(H*d, KV*d, KV*d)``, or None if that does not add up to
      the output size;
    * with no head counts anywhere, an output size divisible by 3 gives equal thirds."""
    if given is None and not has_fused_name(name):
        return None
    out = out_features(module)
    enclosing = _enclosing(model, name)
    interleaved = _model_type(enclosing) in INTERLEAVED_QKV_MODEL_TYPES
    if given is not None:
        if interleaved:
            raise ConfigError("qkv_sizes", list(given), "sizes for layers whose q/k/v rows form three blocks",
                              split_problem(model, name, module))
        if sum(given) != out:
            raise ConfigError("qkv_sizes", list(given), f"three sizes adding up to {out}, the output size of {name!r}")
        return cast(Sizes, tuple(int(s) for s in given))  # three sizes (LoraConfig checks the count)
    if interleaved:
        return None
    heads = _head_counts(enclosing)
    if heads is None:
        return cast(Sizes, equal_sizes(out)) if out % 3 == 0 else None
    return _grouped_split(out, *heads)


def split_problem(model: nn.Module, name: str, module: nn.Module) -> str:
    """Why :func:`qkv_sizes` gives no split for ``name`` (for error messages)."""
    out = out_features(module)
    enclosing = _enclosing(model, name)
    model_type = _model_type(enclosing)
    if model_type in INTERLEAVED_QKV_MODEL_TYPES:
        why = f"{model_type!r} models interleave q/k/v rows per head, so they are not three blocks"
    elif (heads := _head_counts(enclosing)) is not None:
        h, kv, d = heads
        why = f"its {out} output rows do not fit {h} query and {kv} key/value heads" + (f" of size {d}" if d else "")
    else:
        why = f"no head counts are known and {out} output rows do not divide into three equal parts"
    return f"lora-tune cannot tell how {name!r} splits into q, k, v: {why}"


def _enclosing(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules around ``name``, innermost first, ending with the model itself."""
    path = name.split(".")[:-1]
    return [model.get_submodule(".".join(path[:i])) for i in range(len(path), -1, -1)]


def _read(sources: Sequence[object], names: Sequence[str]) -> int | None:
    for source in sources:
        for attr in names:
            value = getattr(source, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _head_counts(enclosing: list[nn.Module]) -> tuple[int, int, int | None] | None:
    """(query heads, key/value heads, head size or None) from the innermost module stating a
    query head count, each read from the module or else its ``config``."""
    for module in enclosing:
        sources = [module, getattr(module, "config", None)]
        heads = _read(sources, _HEADS)
        if heads is None:
            continue
        kv = _read(sources, _KV_HEADS)
        groups = _read(sources, _KV_GROUPS)
        if kv is None and groups is not None and heads % groups == 0:
            kv = heads // groups
        return heads, kv or heads, _read(sources, _HEAD_DIM)
    return None


def _model_type(enclosing: list[nn.Module]) -> str | None:
    for module in enclosing:
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(model_type, str):
            return model_type
    return None


def _grouped_split(out: int, heads: int, kv: int, head_dim: int | None) -> Sizes | None:
    units = heads + 2 * kv
    if head_dim is None:
        if out % units:
            return None
        head_dim = out // units
    sizes = (heads * head_dim, kv * head_dim, kv * head_dim)
    return sizes if sum(sizes) == out else None


# -- the per-part layout of LoRA factors --------------------------------------------------------
# A fused layer's output is made of parts (q, k, v) of ``sizes`` rows each; the enabled parts
# have one rank-r pair each: A is (n*r, in) and B is (sum of the enabled sizes, r).
def equal_sizes(out: int, n: int = 3) -> tuple[int, ...]:
    """``n`` equal parts of ``out`` rows (nn.MultiheadAttention's packed in_proj, GPT-2's c_attn)."""
    if out % n:
        raise ValueError(f"{out} output rows do not split into {n} equal parts; pass the part sizes")
    return (out // n,) * n


def enabled_sizes(parts: Sequence[bool], sizes: Sequence[int]) -> list[int]:
    return [size for size, on in zip(sizes, parts) if on]


def part_slices(sizes: Sequence[int]) -> list[slice]:
    """The rows of each part: ``sizes`` (8, 2, 2) -> rows 0:8, 8:10, 10:12."""
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    return [slice(end - size, end) for size, end in zip(sizes, ends)]


def parts_matrix(A: torch.Tensor, B: torch.Tensor, parts: Sequence[bool] | None,
                 sizes: Sequence[int] | None = None) -> torch.Tensor:
    """The full (out, in) low-rank matrix of a pair laid out per enabled part (or one pair)."""
    if not parts:
        return B @ A
    assert sizes is not None, "the part sizes of a pair with parts"
    on = enabled_sizes(parts, sizes)
    blocks = torch.cat([b @ a for b, a in zip(B.split(on), A.chunk(len(on)))])
    return scatter_parts(blocks, parts, sizes, dim=0)


def scatter_parts(blocks: torch.Tensor, enabled: Sequence[bool], sizes: Sequence[int], dim: int,
                  fill: float = 0.0) -> torch.Tensor:
    """Place the enabled parts' blocks (stacked along ``dim``) into a full tensor whose parts
    have ``sizes`` entries along ``dim`` and whose disabled parts hold ``fill``, out of place."""
    if all(enabled):
        return blocks
    chunks = iter(blocks.split(enabled_sizes(enabled, sizes), dim=dim))
    out = []
    for size, on in zip(sizes, enabled):
        if on:
            out.append(next(chunks))
        else:
            shape = list(blocks.shape)
            shape[dim] = size
            out.append(blocks.new_full(shape, fill))
    return torch.cat(out, dim=dim)


def gather_parts(full: torch.Tensor, enabled: Sequence[bool], sizes: Sequence[int], dim: int = 0) -> torch.Tensor:
    """The enabled parts of ``full`` (parts of ``sizes`` entries along ``dim``), stacked: the inverse
    of :func:`scatter_parts`."""
    if all(enabled):
        return full
    return torch.cat([full.narrow(dim, s.start, s.stop - s.start)
                      for s, on in zip(part_slices(sizes), enabled) if on], dim=dim)


def given_sizes(sizes: Sequence[int] | None) -> Sequence[int]:
    """The part sizes of a layer with parts (a wrapper sets them whenever it has parts)."""
    assert sizes is not None, "the part sizes of a layer with parts"
    return sizes


def checked_sizes(out: int, parts: tuple[bool, ...] | None, sizes: Sequence[int] | None) -> tuple[int, ...] | None:
    """The part sizes of a wrapper with ``parts`` over ``out`` rows: ``sizes`` checked, or equal parts."""
    if parts is None:
        return None
    if sizes is None:
        return equal_sizes(out, len(parts))
    if len(sizes) != len(parts) or sum(sizes) != out:
        raise ValueError(f"part sizes {list(sizes)} do not split {out} output rows into {len(parts)} parts")
    return tuple(int(s) for s in sizes)
