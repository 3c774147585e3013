"""What share of a model's linear weights a target choice adapts, and where it matches only part
of what it promises.

PEFT users lose days to silent partial matches (peft#3554): a pattern that hits one block in
twelve, or ``all-linear`` on a model whose expert weights are not Linear layers. Before a study
runs, :func:`target_coverage` says for one LoraConfig

* how many modules it adapts and what share of the model's **linear weights** (the elements of
  every nn.Linear, GPT-2 Conv1D, nn.MultiheadAttention projection and expert weight stack, the
  output head included) that is, in all and per role group (attention, mlp, router, head, other,
  unsupported);
* per layer stack, in how many blocks it adapts something;
* warnings: a choice that adapts layers in only some of the blocks it covers (``layers`` counts
  as covering only the blocks it selects; a target list naming block indices is taken as
  meant), and a preset that leaves out layers of the roles it names because lora-tune cannot
  adapt them (bitsandbytes layers, 3-D ``*proj`` / expert weight stacks of modules that do not
  state ``num_experts``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from lora_tune.lora.blocks import locate, selected_blocks
from lora_tune.lora.config import LoraConfig, layers_label
from lora_tune.lora.experts import expert_parameters
from lora_tune.lora.fused import enabled_sizes
from lora_tune.lora.inject import resolve
from lora_tune.lora.quant import QuantizedLinear
from lora_tune.lora.roles import ROLE_GROUPS
from lora_tune.lora.targets import Target, classify, model_stacks, supported_kind

GROUPS = ("attention", "mlp", "router", "head", "other", "unsupported")
PROMISES = {"mlp": "weight stacks", "all-linear": "all"}
"""Presets that promise every linear weight (all-linear) or every expert-like weight stack (mlp)."""
_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


@dataclass(frozen=True)
class LinearWeight:
    """One linear weight of the model: its name, elements, role group, and whether lora-tune can
    adapt it."""

    name: str
    elements: int
    group: str
    adaptable: bool = True
    stack: bool = False       # a 3-D weight stack


@dataclass(frozen=True)
class TargetCoverage:
    """What one target choice adapts (see the module docstring)."""

    targets: str | list[str]
    layers: str                                  # "all", "last:4", ...
    modules: int                                 # wrappers inject would build
    adapted_weights: int                         # elements of linear weights that get a delta
    linear_weights: int                          # elements of every linear weight of the model
    by_group: dict[str, tuple[int, int]]         # role group -> (adapted elements, all elements)
    blocks: dict[str, tuple[int, int]]           # layer stack -> (blocks with LoRA, blocks covered)
    warnings: tuple[str, ...] = field(default=())

    @property
    def share(self) -> float:
        return self.adapted_weights / self.linear_weights if self.linear_weights else 0.0

    @property
    def label(self) -> str:
        targets = self.targets if isinstance(self.targets, str) else "|".join(self.targets)
        return targets if self.layers == "all" else f"{targets} @ layers {self.layers}"

    def describe(self) -> str:
        groups = ", ".join(f"{g} {a / t:.0%}" for g, (a, t) in self.by_group.items() if t and g != "unsupported")
        blocks = "; ".join(f"{s}: {k}/{n} blocks" for s, (k, n) in self.blocks.items())
        return (f"{self.label}: {self.modules} modules, {self.share:.1%} of the linear weights ({groups})"
                + (f"; {blocks}" if blocks else ""))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (what a study stores)."""
        return {"targets": self.targets, "layers": self.layers, "modules": self.modules,
                "adapted_weights": self.adapted_weights, "linear_weights": self.linear_weights,
                "share": self.share, "by_group": {g: list(v) for g, v in self.by_group.items()},
                "blocks": {s: list(v) for s, v in self.blocks.items()}, "warnings": list(self.warnings)}


def linear_weights(model: nn.Module) -> list[LinearWeight]:
    """Every linear weight of the model with its role group (adaptable or not)."""
    out = []
    seen: set[str] = set()
    mha = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for name, module, kind, role in classify(model):
        if kind == "mha":
            out.append(LinearWeight(name, _mha_elements(cast(nn.MultiheadAttention, module)), "attention"))
        elif kind == "expert":
            param = name.rpartition(".")[2]
            out.append(LinearWeight(name, getattr(module, param).numel(), "mlp", stack=True))
        elif kind in ("linear", "conv1d_gpt2", "fused"):
            out.append(LinearWeight(name, _elements(module), ROLE_GROUPS[role]))
        seen.add(name.rpartition(".")[0] if kind == "expert" else name)
    for name, module in model.named_modules():
        if not name or name in seen or name.rpartition(".")[0] in mha:
            continue
        if isinstance(module, nn.Linear) and supported_kind(module) is None:  # bitsandbytes and the like
            out.append(LinearWeight(name, module.in_features * module.out_features, "unsupported", False))
        elif supported_kind(module) is None and not expert_parameters(module):
            for param, p in module.named_parameters(recurse=False):
                if _looks_like_stack(name, param, p):  # expert weights in a module without num_experts
                    out.append(LinearWeight(f"{name}.{param}", p.numel(), "unsupported", False, stack=True))
    return out


def _looks_like_stack(module_name: str, param: str, p) -> bool:
    """A 3-D floating weight named like an expert stack (not ViT's cls_token or a position table)."""
    where = f"{module_name}.{param}".lower()
    return p.dim() == 3 and p.is_floating_point() and p.shape[0] > 1 and ("expert" in where or param.endswith("proj"))


def _elements(module: nn.Module) -> int:
    """Elements of the weight of a Linear (a QuantizedLinear's: as if dense), a GPT-2 Conv1D or a
    fused qkv layer."""
    if isinstance(module, QuantizedLinear):
        return module.in_features * module.out_features
    return cast(torch.Tensor, module.weight).numel()


def _mha_elements(module: nn.MultiheadAttention) -> int:
    e = module.embed_dim
    inner = 3 * e * e if module._qkv_same_embed_dim else e * (e + module.kdim + module.vdim)
    return inner + e * e


def adapted_elements(t: Target) -> int:
    """Elements of the linear weight(s) of ``t`` that get a delta (0 for embeddings and convs)."""
    m = t.module
    if t.kind in ("linear", "conv1d_gpt2"):
        return _elements(m)
    if t.kind == "fused":
        assert t.parts is not None and t.part_sizes is not None, "a fused target has parts and their sizes"
        enabled = [p in t.parts for p in "qkv"]
        rows = sum(enabled_sizes(enabled, t.part_sizes))
        inputs = _elements(m) // sum(t.part_sizes)
        return rows * inputs
    if t.kind == "experts":
        assert t.parts is not None, "an experts target names its stacks"
        return sum(getattr(m, p).numel() for p in t.parts)
    if t.kind == "mha":
        m = cast(nn.MultiheadAttention, m)
        e, parts = m.embed_dim, t.parts or ("q", "k", "v", "o")
        dims = {"q": e, "k": m.kdim, "v": m.vdim}
        return sum(e * dims[p] for p in "qkv" if p in parts) + (e * e if "o" in parts else 0)
    return 0


def target_coverage(model: nn.Module, config: LoraConfig, weights: list[LinearWeight] | None = None
                    ) -> TargetCoverage:
    """The coverage of ``config``'s targets and layers on ``model`` (which is not changed); raises
    what ``inject`` would raise for a choice that does not fit. ``weights`` (from
    :func:`linear_weights`) saves recomputing them for several choices."""
    weights = linear_weights(model) if weights is None else weights
    targets, preset = resolve(model, config)
    stacks = model_stacks(model)
    covered = selected_blocks(stacks, config.layers, config.layers_pattern)
    group_of = {w.name: w.group for w in weights}
    totals = {g: sum(w.elements for w in weights if w.group == g) for g in GROUPS}
    adapted = dict.fromkeys(GROUPS, 0)
    touched: dict[str, set[int]] = {s.name: set() for s in stacks}
    for t in targets:
        if t.kind == "experts":
            assert t.parts is not None, "an experts target names its stacks"
            names = [f"{t.name}.{p}" for p in t.parts]
        else:
            names = [t.name]
        group = group_of.get(names[0])
        if group is not None:
            adapted[group] += adapted_elements(t)
        for n in names:
            where = locate(n, stacks)
            if where is not None:
                touched[where[0].name].add(where[1])
    blocks = {s: (len(touched[s] & set(idx)), len(idx)) for s, idx in covered.items() if touched[s]}
    label = layers_label(config.layers)
    warnings = _partial_blocks(config, touched, covered) + _broken_promise(config, preset, weights)
    return TargetCoverage(
        targets=config.targets, layers=label, modules=len(targets),
        adapted_weights=sum(adapted.values()), linear_weights=sum(totals.values()),
        by_group={g: (adapted[g], totals[g]) for g in GROUPS if totals[g]}, blocks=blocks,
        warnings=tuple(warnings))


def _names_blocks(config: LoraConfig) -> bool:
    """Whether an explicit target list names block indices itself (then fewer blocks are meant)."""
    return isinstance(config.targets, list) and any(
        re.search(r"\d", t) if t.startswith("re:") else _INDEX.search(t.split("[")[0]) for t in config.targets)


def _partial_blocks(config: LoraConfig, touched: dict[str, set[int]], covered: dict[str, tuple[int, ...]]) -> list[str]:
    if _names_blocks(config):
        return []
    out = []
    what = f"targets {config.targets!r}" if isinstance(config.targets, str) else f"targets {config.targets}"
    for stack, indices in covered.items():
        hit = sorted(touched.get(stack, set()) & set(indices))
        if 0 < len(hit) < len(indices):
            scope = "the blocks `layers` selects" if config.layers is not None else "its blocks"
            out.append(f"{what} adapt layers in only {len(hit)} of the {len(indices)} blocks of {stack} "
                       f"({scope}; with LoRA: {_short(hit)}): a partial match. If that is meant, say so with "
                       "`layers`; otherwise the patterns miss the other blocks")
    return out


def _broken_promise(config: LoraConfig, preset: str | None, weights: list[LinearWeight]) -> list[str]:
    if preset not in PROMISES:
        return []
    missing = [w for w in weights if not w.adaptable and (PROMISES[preset] == "all" or w.stack)]
    if not missing:
        return []
    total = sum(w.elements for w in weights)
    lost = sum(w.elements for w in missing)
    return [f"{preset!r} leaves out {len(missing)} linear weight(s) lora-tune cannot adapt ({lost / total:.0%} of the "
            f"model's linear weights), e.g. {', '.join(w.name for w in missing[:3])}: bitsandbytes layers must be "
            "loaded unquantized (use quant_bits), weight stacks need a module stating num_experts"]


def _short(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:8])) + (" ..." if len(indices) > 8 else "")
