"""inject / find_targets / merge / unmerge / merge_and_unload.

``inject`` reads as resolve -> build -> commit. It resolves the targets; builds every wrapper
(the family the dispatch table :data:`lora_tune.lora.layers.WRAPPERS` gives, its factors
initialised, PiSSA's residual base weights, quantized copies, DoRA magnitudes) without touching
the model; and only then commits: swaps the wrappers in, installs the residuals as new base
parameters, drops the quantized base weights and sets ``requires_grad``, recording each change
in the model's undo record (:mod:`lora_tune.lora.attachment`). An error before the commit
leaves the model exactly as it was: there is no half-injected model. ``detach`` undoes the
record: the base comes back bit for bit, ready for the next trial's adapters.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple, cast
from collections.abc import Iterator

import torch
from torch import nn

from lora_tune.errors import ConfigError
from lora_tune.lora.config import LoraConfig
from lora_tune.lora.blocks import block_filter, selected_blocks
from lora_tune.lora.adapter_base import requantized
from lora_tune.lora.layers import ADAPTER_PARAMS, LORA_WRAPPERS, WRAPPER_OF_KIND, LoraLayer, _LoraState
from lora_tune.lora.quant import QuantizedWeight
from lora_tune.lora.attachment import CONFIG_ATTR, Attachment, attached, forget, keep, undo_all
from lora_tune.lora.targets import (
    PRESET_NAMES,
    Pattern,
    Target,
    model_stacks,
    parse_pattern,
    resolve_targets,
    selectors,
    target_presets,
)

__all__ = ["inject", "find_targets", "target_presets", "merge", "unmerge", "merge_and_unload", "detach",
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


def lora_layers(model: nn.Module) -> Iterator[tuple[str, _LoraState]]:
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
    raise ConfigError("targets", name,
                      "a preset (" + ", ".join(sorted(presets)) + ") or a list of module-name patterns")


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


class Built(NamedTuple):
    """A wrapper ready to be swapped in, and what committing it writes into its base layer."""

    target: Target
    wrapper: _LoraState
    residuals: dict[str, torch.Tensor]           # base weight key -> PiSSA's residual (not quantized)
    quantized: dict[str, QuantizedWeight]        # base weight key -> its quantized copy (PiSSA's: of the residual)


def new_wrapper(target: Target, config: LoraConfig, warn: list[str]) -> _LoraState:
    """The wrapper around ``target.module`` (factors not initialised, not swapped into the model);
    rank warnings are appended to ``warn``."""
    family = WRAPPER_OF_KIND[target.kind]
    r = _lookup(config.rank_pattern, target.name, config.rank)
    alpha = _lookup(config.alpha_pattern, target.name, config.alpha)
    kw = dict(rslora=config.rslora, dropout=config.dropout, method=config.method)
    if config.use_dora:
        if not family.supports_dora:
            raise ConfigError("use_dora", True, "true only for Linear, fused qkv, GPT-2 Conv1D, Conv1d/2d/3d and "
                              "Embedding targets", f"{target.name!r} is a {target.type_name} ({target.kind}), which "
                              "has no DoRA; exclude it (exclude: [...]) or set use_dora: false")
        kw["use_dora"] = True
    wrapper = family.for_target(target, r, alpha, **kw)
    if r > wrapper.max_useful_rank:
        msg = (f"rank {r} is larger than min(in, out) = {wrapper.max_useful_rank} of layer {target.name!r}; "
               "the extra rank adds parameters but no expressiveness")
        warn.append(msg)
        warnings.warn(msg, stacklevel=4)
    return wrapper


def build(target: Target, config: LoraConfig, warn: list[str], shared: bool) -> Built:
    """The initialised wrapper for ``target``; the model is not touched. ``shared``: its weight is
    tied to another module (merged out of place)."""
    wrapper = new_wrapper(target, config, warn)
    residuals = wrapper.init_lora(config.init)
    quantized = {}
    for key in wrapper.pairs():
        own = wrapper.prequantized(key)
        if own is not None:  # loaded quantized: used as is; PiSSA's residual gets a new quantized copy
            if key in residuals:
                quantized[key] = requantized(own, residuals.pop(key))
        elif config.quant_bits in (4, 8):
            weight = residuals.pop(key) if key in residuals else wrapper._base_param(key)
            quantized[key] = wrapper.quantize(key, weight, config.quant_bits, config.quant_type, config.double_quant)
    if config.use_dora:  # m = ||W0 + s*B@A|| of the weight the layer will compute with
        layer = cast(LoraLayer, wrapper)  # only single-weight wrappers support DoRA (new_wrapper checks)
        key = layer.weight_name
        layer.init_magnitude(quantized[key].dequantize() if key in quantized else residuals.get(key))
    wrapper.shared_base = shared
    return Built(target, wrapper, residuals, quantized)


def inject(model: nn.Module, config: LoraConfig) -> InjectReport:
    """Wrap the layers ``config.targets`` selects, in place; only LoRA factors (plus biases per
    ``config.bias`` and ``config.modules_to_save``) stay trainable. Every change is recorded on
    the model, so that :func:`detach` takes the adapters off again and leaves the base exactly as
    it was. A layer of a base loaded quantized (QuantizedLinear) keeps its own quantization
    whatever ``config.quant_bits`` says."""
    if not isinstance(config, LoraConfig):
        raise ConfigError("config", type(config).__name__, "a lora_tune.LoraConfig")
    trainable_before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targets, preset = resolve(model, config)
    saved = _modules_to_save(model, config, targets)
    shared = _tied(model, config, targets)
    aliases = {t.name: _aliases(model, t.module) for t in targets}
    warn: list[str] = []
    built = [build(t, config, warn, t.name in shared) for t in targets]
    _commit(model, config, built, aliases, saved)
    return InjectReport(
        targets=[(t.name, t.type_name) for t in targets],
        trainable_before=trainable_before,
        trainable_after=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()) + sum(
            int(torch.tensor(q.shape).prod()) for _, q in _quantized(model)),
        adapter_bytes=sum(p.numel() * p.element_size() for p in _lora_params(model)),
        preset=preset,
        resolved_names=[name for t in targets for name in selectors(t.name, t.kind, t.parts)],
        warnings=warn,
    )


def _modules_to_save(model: nn.Module, config: LoraConfig, targets: list[Target]) -> list[str]:
    save_patterns = [parse_pattern(p, "modules_to_save") for p in config.modules_to_save]
    saved = [n for n, _ in model.named_modules() if n and any(p.matches(n) for p in save_patterns)]
    if config.modules_to_save and not saved:
        raise ConfigError("modules_to_save", config.modules_to_save,
                          "names of modules in the model, e.g. "
                          + ", ".join(n for n, _ in list(model.named_children())[:8]))
    target_names = {t.name for t in targets}
    clash = [n for n in saved
             if n in target_names or any(n.startswith(t + ".") or t.startswith(n + ".") for t in target_names)]
    if clash:
        raise ConfigError("modules_to_save", clash, "modules that are not also LoRA targets")
    return saved


def _tied(model: nn.Module, config: LoraConfig, targets: list[Target]) -> set[str]:
    """Targets whose weight is tied to another module (e.g. GPT-2's wte and lm_head): merged out of
    place, and PiSSA, which rewrites the base weight, is refused on them."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = {t.name for t in targets if any(uses[id(p)] > 1 for p in t.module.parameters(recurse=False))}
    if shared and config.init == "pissa":
        raise ConfigError("init", "pissa", "kaiming or gaussian for layers whose weight is tied to another module",
                          f"PiSSA rewrites the base weight, which {sorted(shared)} share(s) with other modules")
    return shared


def _commit(model: nn.Module, config: LoraConfig, built: list[Built], aliases: dict[str, list[str]],
            saved: list[str]) -> None:
    """Swap the built wrappers in and set what trains, every change through the undo record kept on
    the model (:mod:`lora_tune.lora.attachment`; ``detach`` reverts it). A failure on the way
    reverts what was done. (LoRA factors of an earlier inject keep training.)"""
    record = Attachment.begin(model)
    try:
        _apply(model, config, built, aliases, saved, record)
    except BaseException:
        record.undo()
        raise
    keep(model, record)


def _apply(model: nn.Module, config: LoraConfig, built: list[Built], aliases: dict[str, list[str]],
           saved: list[str], record: Attachment) -> None:
    for n, p in model.named_parameters():
        if not n.endswith(ADAPTER_PARAMS):
            record.set_requires_grad(p, False)
    modules = dict(model.named_modules())
    for owner in modules.values():  # running statistics (BatchNorm's) change in training, frozen or not
        for leaf in owner._buffers:
            if leaf not in owner._non_persistent_buffers_set:
                record.snapshot(owner, "_buffers", leaf)
    for target, wrapper, residuals, quantized in built:
        wrapper.install_base(residuals, quantized, record.replace_param)
        for alias in aliases[target.name]:  # a module registered under several names is wrapped at each
            parent, _, child = alias.rpartition(".")
            record.swap(model.get_submodule(parent) if parent else model, child, wrapper)
        for owner, leaf, p in _owned(wrapper):
            if leaf.endswith(ADAPTER_PARAMS):  # the wrapper's own
                p.requires_grad_(True)
            elif config.bias == "lora_only" and leaf.endswith("bias"):
                record.train(owner, leaf)
    if config.bias == "all":
        for owner, leaf, _ in _owned(model):
            if leaf.endswith("bias"):
                record.train(owner, leaf)
    for n in saved:
        for owner, leaf, _ in _owned(modules[n]):
            record.train(owner, leaf)
        for owner in modules[n].modules():  # the non-persistent buffers too
            for leaf in owner._buffers:
                record.snapshot(owner, "_buffers", leaf)
    for m in model.modules():  # torch's nested-tensor encoder fast path reads raw weights
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
            record.set_attr(m, "use_nested_tensor", False)
    # read by save_adapter (bias mode, modules_to_save, init)
    record.set_attr(model, CONFIG_ATTR, config)


def _owned(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter]]:
    """(owner, name, parameter) of every parameter under ``module``, each once."""
    seen: set[int] = set()
    for _, owner in module.named_modules():
        for leaf, p in owner._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield owner, leaf, p


def _aliases(model: nn.Module, module: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _lora_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if n.endswith(ADAPTER_PARAMS)]


def _quantized(model: nn.Module):
    """The quantized weights the model computes with (not those of a base loaded quantized that
    a PiSSA wrapper replaced by its residual's)."""
    unused = set()
    for _, w in lora_layers(model):
        own = w.prequantized(w.weight_name) if isinstance(w, LoraLayer) else None
        if own is not None and w.base_weight_q is not own:
            unused.add(id(own))
    for n, m in model.named_modules():
        if isinstance(m, QuantizedWeight) and id(m) not in unused:
            yield n, m


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
    quantized base). Returns the model, which no longer contains any LoRA module; it keeps what
    was trained (biases, modules_to_save), so nothing is attached any more (see :func:`detach`)."""
    for _, wrapper in list(lora_layers(model)):
        names = _aliases(model, wrapper)
        base = wrapper.unloaded()
        for name in names:
            _set_module(model, name, base)
    forget(model)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Take the adapters off (PEFT's ``unload()``): the base model back exactly as it was before
    ``inject`` (every inject stacked on it too), so that the next trial can attach fresh adapters
    to the same resident base and get bit for bit what it would get on a fresh copy.

    A merged model is unmerged first; then every wrapped module is swapped back, every base
    parameter object inject replaced (PiSSA's residual, a weight quantized at inject) is put
    back, the values of the base parameters that trained (biases, modules_to_save) and their
    gradients are restored, and so are requires_grad, every module's training flag, the
    nested-tensor flags and the recorded config. Afterwards the model has no LoRA module and its
    ``state_dict()`` equals the one before inject bit for bit, with the same Parameter objects.
    A model with nothing attached (never injected, detached already, or merged and unloaded):
    ConfigError. Returns the model."""
    if attached(model) is None:
        raise ConfigError("model", type(model).__name__, "a model with adapters attached by lora_tune.inject",
                          "nothing is attached to it: it was never injected, was detached already, or "
                          "merge_and_unload made its adapters part of it")
    unmerge(model)
    undo_all(model)
    return model
