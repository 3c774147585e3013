"""inject / find_targets / merge / unmerge / merge_and_unload.

``inject`` works in two phases: it first builds every wrapper (initialising the factors,
quantizing base weights, computing PiSSA residuals) without touching the model, and only then
swaps the wrappers in and sets ``requires_grad``. Any error in the first phase therefore
leaves the model exactly as it was.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from lora_tune.errors import ConfigError
from lora_tune.lora.config import LoraConfig
from lora_tune.lora.dora import DORA_KINDS
from lora_tune.lora.layers import (
    ADAPTER_PARAMS,
    LoraConv,
    LoraEmbedding,
    LoraLinear,
    LoraMultiheadAttention,
    LORA_WRAPPERS,
    QKV,
)
from lora_tune.lora.blocks import block_filter, selected_blocks
from lora_tune.lora.experts import LoraExperts
from lora_tune.lora.fused import enabled_sizes, part_slices
from lora_tune.lora.quant import QuantizedWeight
from lora_tune.lora.targets import (
    PRESET_NAMES,
    Pattern,
    Target,
    model_stacks,
    parse_pattern,
    resolve_targets,
    target_presets,
)

__all__ = ["inject", "find_targets", "target_presets", "merge", "unmerge", "merge_and_unload",
           "lora_layers", "InjectReport"]


@dataclass
class InjectReport:
    """What ``inject`` did."""

    targets: list[tuple[str, str]]                 # (module name, type name)
    trainable_before: int
    trainable_after: int
    total_params: int
    adapter_bytes: int
    preset: str | None = None
    resolved_names: list[str] = field(default_factory=list)   # with part selectors, re-injectable
    warnings: list[str] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_after / max(self.total_params, 1)

    def __str__(self) -> str:
        lines = [f"LoRA on {len(self.targets)} module(s)" + (f" (preset {self.preset})" if self.preset else "") + ":"]
        lines += [f"  {n}  [{t}]" for n, t in self.targets]
        lines.append(
            f"trainable parameters: {self.trainable_before:,} -> {self.trainable_after:,} "
            f"({100 * self.trainable_fraction:.3f}% of {self.total_params:,}); adapter {self.adapter_bytes:,} bytes"
        )
        return "\n".join(lines)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, LORA_WRAPPERS):
            yield name, module


def _expand_targets(model: nn.Module, config: LoraConfig) -> tuple[list[str], str | None]:
    if isinstance(config.targets, list):
        return config.targets, None
    name = config.targets
    presets = target_presets(model, config.qkv_sizes)
    if name in presets:
        return presets[name], name
    if name in PRESET_NAMES:
        why = (f"{type(model).__name__} has no expert weight stacks (3-D parameters of a mixture-of-experts "
               "module stating num_experts); it is a dense model: use 'mlp' for its feed-forward layers"
               if name == "experts" else f"The model has no layers for preset {name!r}.")
        raise ConfigError("targets", name, "presets this model has: " + ", ".join(sorted(presets)), why)
    # a single string that is not a preset is one pattern
    looks_like_pattern = any(c in name for c in ".*?[") or name.startswith("re:")
    if looks_like_pattern or any(Pattern(name).matches(n) for n, _ in model.named_modules() if n):
        return [name], None
    raise ConfigError("targets", name, "a preset (" + ", ".join(sorted(presets)) + ") or a list of module-name patterns")


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """Dry run: the (name, type) pairs ``inject`` would adapt with this config."""
    return [(t.name, t.type_name) for t in resolve(model, config)[0]]


def resolve(model: nn.Module, config: LoraConfig) -> tuple[list[Target], str | None]:
    """The targets ``config`` selects in ``model`` and the preset name used, if any; the model
    is not changed."""
    names, preset = _expand_targets(model, config)
    inside = None
    if config.layers is not None or config.layers_pattern is not None:
        stacks = model_stacks(model)
        inside = block_filter(stacks, selected_blocks(stacks, config.layers, config.layers_pattern))
    targets = resolve_targets(model, names, config.exclude, config.enable_lora, config.qkv_sizes, inside=inside,
                              layers=config.layers, strict_layers=preset is None)
    return targets, preset


def _lookup(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if parse_pattern(key, "rank_pattern").matches(name):
            return value
    return default


def _init_pair(A: torch.Tensor, B: torch.Tensor, init: str, kind: str, r: int, generator=None) -> None:
    """Standard inits: B = 0 so the adapted model starts equal to the base."""
    with torch.no_grad():
        if kind == "embedding":  # one-hot inputs: A = 0, B random (PEFT's choice)
            A.zero_()
            B.normal_(0.0, 1.0, generator=generator)
            return
        if init == "gaussian":
            A.normal_(0.0, 1.0 / r, generator=generator)
        else:
            flat = A.view(A.shape[0], -1)
            bound = 1.0 / math.sqrt(flat.shape[1])  # kaiming_uniform(a=sqrt(5))
            A.uniform_(-bound, bound, generator=generator)
        B.zero_()


def _pissa(matrix: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA: A, B from the top-r singular triplets so that s * B @ A equals their sum."""
    dtype = torch.promote_types(matrix.dtype, torch.float32)
    U, S, Vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    k = min(r, S.shape[0])
    root = torch.sqrt(S[:k] / scaling)
    A, B = root[:, None] * Vh[:k], U[:, :k] * root[None, :]
    if k < r:  # rank above min(in, out): extra rows of A get the standard init, B's columns stay 0
        extra = torch.empty(r - k, A.shape[1], dtype=dtype)
        _init_pair(extra, torch.zeros(1), "kaiming", "linear", r)
        A = torch.cat([A, extra])
        B = torch.cat([B, torch.zeros(B.shape[0], r - k, dtype=dtype)], dim=1)
    return A, B


def build_wrapper(target: Target, config: LoraConfig, warn: list[str]) -> nn.Module:
    """The initialised wrapper around ``target.module`` (not yet swapped into the model);
    rank warnings are appended to ``warn``."""
    name, module, kind = target.name, target.module, target.kind
    r = _lookup(config.rank_pattern, name, config.rank)
    alpha = _lookup(config.alpha_pattern, name, config.alpha)
    kw = dict(rslora=config.rslora, dropout=config.dropout, method=config.method)
    if config.use_dora:
        if kind not in DORA_KINDS:
            raise ConfigError("use_dora", True, "true only for Linear, fused qkv, GPT-2 Conv1D, Conv1d/2d/3d and "
                              "Embedding targets", f"{name!r} is a {target.type_name} ({kind}), which has no DoRA; "
                              "exclude it (exclude: [...]) or set use_dora: false")
        kw["use_dora"] = True
    if kind == "mha":
        parts = target.parts or ("q", "k", "v", "o")
        in_parts = tuple(p in parts for p in QKV)
        wrapper = LoraMultiheadAttention(module, r, alpha, in_parts=in_parts, adapt_out="o" in parts, **kw)
        dims = [module.embed_dim]
    elif kind in ("linear", "fused", "conv1d_gpt2"):
        transposed = type(module).__name__ == "Conv1D" and not isinstance(module, nn.Linear)
        parts = tuple(p in target.parts for p in QKV) if kind == "fused" else None
        wrapper = LoraLinear(module, r, alpha, transposed=transposed, parts=parts, part_sizes=target.part_sizes, **kw)
        dims = [wrapper.in_features, *(enabled_sizes(parts, wrapper.part_sizes) if parts else [wrapper.out_features])]
    elif kind == "experts":
        wrapper = LoraExperts(module, r, alpha, params=target.parts, **kw)
        dims = [min(p.lora_A.shape[-1], p.lora_B.shape[-2]) for p in wrapper.projections().values()]
    elif kind == "embedding":
        if module.max_norm is not None:
            raise ConfigError("targets", name, "embeddings without max_norm",
                              "nn.Embedding(max_norm=...) renormalises its weight in place, which LoRA cannot track")
        wrapper = LoraEmbedding(module, r, alpha, **kw)
        dims = list(module.weight.shape)
    else:
        wrapper = LoraConv(module, r, alpha, **kw)
        dims = [module.weight.shape[0], module.weight[0].numel()]
    if r > min(dims):
        msg = f"rank {r} is larger than min(in, out) = {min(dims)} of layer {name!r}; the extra rank adds parameters but no expressiveness"
        warn.append(msg)
        warnings.warn(msg, stacklevel=3)
    _init_wrapper(wrapper, config, kind)
    return wrapper


def _pairs(wrapper: nn.Module):
    """(key of the base weight, module holding lora_A/lora_B and its parts) per adapted weight."""
    if isinstance(wrapper, (LoraMultiheadAttention, LoraExperts)):
        yield from wrapper.projections().items()
    else:
        yield wrapper.weight_name, wrapper


def _init_wrapper(wrapper: nn.Module, config: LoraConfig, kind: str) -> None:
    r = wrapper.r
    pending = {}
    for key, holder in _pairs(wrapper):
        A, B = holder.lora_A, holder.lora_B
        if kind == "experts":
            pending.update(_init_experts(wrapper, key, holder, config.init))
            continue
        if config.init != "pissa":
            _init_pair(A, B, config.init, kind, r)
            continue
        # PiSSA on the matrix view of the base weight, part by part; the base keeps the residual.
        w0 = wrapper._base_param(key)
        matrix = _weight_to_matrix(wrapper, w0)
        parts = getattr(holder, "parts", None) or (True,)
        rows = part_slices(getattr(holder, "part_sizes", None) or (matrix.shape[0],))
        As, Bs = [], []
        residual = matrix.clone().to(torch.promote_types(matrix.dtype, torch.float32))
        for block in (block for block, on in zip(rows, parts) if on):
            a, b = _pissa(matrix[block], r, wrapper.scaling)
            As.append(a)
            Bs.append(b)
            residual[block] -= wrapper.scaling * (b.to(B.dtype).to(a.dtype) @ a.to(A.dtype).to(a.dtype))
        with torch.no_grad():
            A.copy_(torch.cat(As).view_as(A).to(A.dtype))
            B.copy_(torch.cat(Bs).view_as(B).to(B.dtype))
        pending[key] = _matrix_to_weight(wrapper, residual).to(w0.dtype)
    wrapper._pending_base = pending  # applied to the model only when inject commits


def _init_experts(wrapper: LoraExperts, key: str, pairs: nn.Module, init: str) -> dict[str, torch.Tensor]:
    """Per-expert init of one expert stack: A kaiming-uniform (bound 1/sqrt(in), as for a Linear)
    or gaussian, B = 0; or PiSSA on each expert's matrix, the stack keeping the residuals."""
    A, B = pairs.lora_A, pairs.lora_B
    with torch.no_grad():
        if init == "gaussian":
            A.normal_(0.0, 1.0 / wrapper.r)
            B.zero_()
            return {}
        if init == "kaiming":
            bound = 1.0 / math.sqrt(A.shape[-1])
            A.uniform_(-bound, bound)
            B.zero_()
            return {}
        w0 = wrapper._base_param(key)
        matrices = w0.transpose(1, 2) if wrapper.transposed else w0
        residual = matrices.to(torch.promote_types(w0.dtype, torch.float32)).clone()
        for e in range(matrices.shape[0]):
            a, b = _pissa(matrices[e], wrapper.r, wrapper.scaling)
            A[e].copy_(a.to(A.dtype))
            B[e].copy_(b.to(B.dtype))
            residual[e] -= wrapper.scaling * (B[e].to(a.dtype) @ A[e].to(a.dtype))
    residual = residual.transpose(1, 2) if wrapper.transposed else residual
    return {key: residual.to(w0.dtype).contiguous()}


def _weight_to_matrix(wrapper, w0: torch.Tensor) -> torch.Tensor:
    if isinstance(wrapper, LoraLinear):
        return w0.t() if wrapper.transposed else w0
    if isinstance(wrapper, LoraEmbedding):
        return w0.t()
    return w0.reshape(w0.shape[0], -1)


def _matrix_to_weight(wrapper, m: torch.Tensor) -> torch.Tensor:
    if isinstance(wrapper, (LoraLinear, LoraEmbedding)):
        return m.t() if (isinstance(wrapper, LoraEmbedding) or wrapper.transposed) else m
    if isinstance(wrapper, LoraConv):
        return m.view(wrapper.base_layer.weight.shape)
    return m


def _quantize(wrapper: nn.Module, config: LoraConfig) -> dict[str, QuantizedWeight]:
    out = {}
    for key, _ in _pairs(wrapper):
        w = wrapper._pending_base.get(key, wrapper._base_param(key))
        if isinstance(wrapper, LoraExperts):
            out[key] = wrapper.quantize(key, w, config.quant_bits, config.quant_type, config.double_quant)
        else:
            out[key] = QuantizedWeight(w, config.quant_bits, config.quant_type, config.double_quant)
    return out


def inject(model: nn.Module, config: LoraConfig) -> InjectReport:
    """Wrap the layers ``config.targets`` selects, in place; only LoRA factors (plus biases per
    ``config.bias`` and ``config.modules_to_save``) stay trainable."""
    if not isinstance(config, LoraConfig):
        raise ConfigError("config", type(config).__name__, "a lora_tune.LoraConfig")
    trainable_before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targets, preset = resolve(model, config)
    save_patterns = [parse_pattern(p, "modules_to_save") for p in config.modules_to_save]
    saved = [n for n, _ in model.named_modules() if n and any(p.matches(n) for p in save_patterns)]
    if config.modules_to_save and not saved:
        raise ConfigError("modules_to_save", config.modules_to_save,
                          "names of modules in the model, e.g. " + ", ".join(n for n, _ in list(model.named_children())[:8]))
    target_names = {t.name for t in targets}
    clash = [n for n in saved if n in target_names or any(n.startswith(t + ".") or t.startswith(n + ".") for t in target_names)]
    if clash:
        raise ConfigError("modules_to_save", clash, "modules that are not also LoRA targets")

    # Weights tied to another module (e.g. GPT-2's wte and lm_head) are merged out of place, and
    # PiSSA, which rewrites the base weight, is refused on them.
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = {t.name for t in targets if any(uses[id(p)] > 1 for p in t.module.parameters(recurse=False))}
    if shared and config.init == "pissa":
        raise ConfigError("init", "pissa", "kaiming or gaussian for layers whose weight is tied to another module",
                          f"PiSSA rewrites the base weight, which {sorted(shared)} share(s) with other modules")
    aliases = {t.name: [n for n, m in model.named_modules(remove_duplicate=False) if m is t.module] for t in targets}

    # Phase 1: build everything; the model is not touched.
    warn: list[str] = []
    built: list[tuple[Target, nn.Module, dict]] = []
    for t in targets:
        wrapper = build_wrapper(t, config, warn)
        quant = _quantize(wrapper, config) if config.quant_bits in (4, 8) else {}
        if config.use_dora:  # m = ||W0 + s*B@A|| of the weight the layer will compute with
            key = wrapper.weight_name
            wrapper.init_magnitude(quant[key].dequantize() if quant else wrapper._pending_base.get(key))
        built.append((t, wrapper, quant))

    # Phase 2: commit. (LoRA factors of an earlier inject keep training.)
    for n, p in model.named_parameters():
        if not n.endswith(ADAPTER_PARAMS):
            p.requires_grad_(False)
    modules = dict(model.named_modules())
    for t, wrapper, quant in built:
        for key, value in wrapper._pending_base.items():
            param = wrapper._base_param(key)
            with torch.no_grad():
                param.copy_(value)
        del wrapper._pending_base
        for key, qw in quant.items():
            _drop_base_param(wrapper, key)
            if isinstance(wrapper, (LoraMultiheadAttention, LoraExperts)):
                wrapper.base_weight_q[key.replace(".", "__")] = qw
            else:
                wrapper.base_weight_q = qw
        wrapper.shared_base = t.name in shared
        for alias in aliases[t.name]:  # a module registered under several names is wrapped at each
            parent_name, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
        for n, p in wrapper.named_parameters():
            if n.endswith(ADAPTER_PARAMS):
                p.requires_grad_(True)
            elif config.bias == "lora_only" and n.endswith("bias"):
                p.requires_grad_(True)
    if config.bias == "all":
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.requires_grad_(True)
    for n in saved:
        for p in modules[n].parameters():
            p.requires_grad_(True)
    for m in model.modules():  # torch's nested-tensor encoder fast path reads raw weights
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
            m.use_nested_tensor = False

    adapter = _lora_params(model)
    model._lora_tune_config = config  # read by save_adapter (bias mode, modules_to_save, init)
    resolved = [name for t in targets for name in _resolved_names(t)]
    return InjectReport(
        targets=[(t.name, t.type_name) for t in targets],
        trainable_before=trainable_before,
        trainable_after=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()) + sum(
            int(torch.tensor(q.shape).prod()) for _, q in _quantized(model)),
        adapter_bytes=sum(p.numel() * p.element_size() for p in adapter),
        preset=preset,
        resolved_names=resolved,
        warnings=warn,
    )


def _resolved_names(t: Target) -> list[str]:
    """Patterns that select exactly ``t`` again (expert stacks by their parameter names)."""
    if t.kind == "experts":
        return [f"{t.name}.{p}" for p in t.parts]
    return [t.name if t.parts is None or t.kind == "linear" else f"{t.name}[{','.join(t.parts)}]"]


def _lora_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if n.endswith(ADAPTER_PARAMS)]


def _quantized(model: nn.Module):
    for n, m in model.named_modules():
        if isinstance(m, QuantizedWeight):
            yield n, m


def _drop_base_param(wrapper: nn.Module, key: str) -> None:
    owner = wrapper.base_layer
    *path, leaf = key.split(".")
    for part in path:
        owner = getattr(owner, part)
    owner._parameters[leaf] = None  # the quantized copy in the wrapper replaces it


def merge(model: nn.Module) -> None:
    """Fold every LoRA delta into its base weight (forward then costs what the base costs)."""
    for _, m in lora_layers(model):
        m.merge()


def unmerge(model: nn.Module) -> None:
    """Undo ``merge``; non-quantized base weights come back bit for bit."""
    for _, m in lora_layers(model):
        m.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every wrapper by a plain torch layer holding W0 + delta (dequantized for a
    quantized base). Returns the model, which no longer contains any LoRA module."""
    for _, wrapper in list(lora_layers(model)):
        for key in wrapper._adapted_keys():
            w = wrapper._merged_dense.get(key)
            if w is None:
                # an in-place merge already holds the delta
                w = wrapper.base_weight(key) if wrapper.merged else wrapper._merged_weight(key)
            _set_param(wrapper.base_layer, key, w)
        aliases = [n for n, m in model.named_modules(remove_duplicate=False) if m is wrapper]
        for alias in aliases:
            parent_name, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper.base_layer)
    return model


def _set_param(owner: nn.Module, key: str, value: torch.Tensor) -> None:
    *path, leaf = key.split(".")
    for part in path:
        owner = getattr(owner, part)
    old = owner._parameters.get(leaf)
    requires_grad = old.requires_grad if old is not None else False
    owner._parameters[leaf] = nn.Parameter(value.detach().clone(), requires_grad=requires_grad)
