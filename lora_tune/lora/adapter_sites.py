"""What an adapter is made of, shared by both adapter formats (lora-tune's in
:mod:`lora_tune.lora.native_format`, PEFT's in :mod:`lora_tune.lora.peft.adapter_format`): the
adapted modules (sites), the config to record, the LoRA-only state dict, checking an adapter's
tensors against a model, and the plan that loads them. Both format modules import this one;
neither imports the other, nor :mod:`lora_tune.lora.state`, which dispatches to them.
"""
from __future__ import annotations

import copy
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import nn

from lora_tune.errors import AdapterFormatError, ConfigError
from lora_tune.lora.adapter_base import _LoraState
from lora_tune.lora.config import scale_for
from lora_tune.lora.config import LoraConfig
from lora_tune.lora.fused import equal_sizes, given_sizes
from lora_tune.lora.inject import inject, lora_layers, new_wrapper, resolve
from lora_tune.lora.layers import ADAPTER_PARAMS, LoraLinear
from lora_tune.lora.quant import QuantizedWeight
from lora_tune.lora.targets import parse_pattern, selectors

LORA_SUFFIXES = ADAPTER_PARAMS  # lora_A, lora_B and DoRA's lora_magnitude
CONFIG_FILE = "adapter_config.json"  # both formats' config file


@dataclass
class Site:
    """One adapted module: its name, wrapper family, rank, alpha, scaling, parts and (fused qkv)
    the rows of each part."""

    name: str
    wrapper: _LoraState
    kind: str                      # linear | fused | conv1d_gpt2 | embedding | conv | mha | experts
    r: int
    alpha: float
    scaling: float
    parts: tuple[str, ...] | None  # q/k/v for fused qkv; q/k/v/o for MultiheadAttention; stacks for experts

    @property
    def use_dora(self) -> bool:
        return bool(self.wrapper.use_dora)

    @property
    def part_names(self) -> tuple[str, ...]:
        """``parts`` of a site that has them (fused qkv, nn.MultiheadAttention, expert stacks)."""
        assert self.parts is not None, f"{self.name!r} ({self.kind}) has no parts"
        return self.parts

    @property
    def selector_name(self) -> str:
        return f"{self.name}[{','.join(self.parts)}]" if self.parts else self.name

    @property
    def target_names(self) -> list[str]:
        """Patterns that select exactly this site (expert stacks by their parameter names)."""
        return selectors(self.name, self.kind, self.parts)

    @property
    def part_sizes(self) -> tuple[int, ...] | None:
        """Output rows of q, k and v of a fused qkv layer (enabled or not); None for other kinds."""
        return tuple(given_sizes(cast(LoraLinear, self.wrapper).part_sizes)) if self.kind == "fused" else None

    def meta(self) -> dict[str, Any]:
        base = self.wrapper.base_layer
        sizes = self.part_sizes
        return {"kind": self.kind, "type": type(base).__name__, "r": self.r, "alpha": self.alpha,
                "scaling": self.scaling, "parts": list(self.parts) if self.parts else None,
                "part_sizes": list(sizes) if sizes else None, "use_dora": self.use_dora}


def saved_part_sizes(entry: dict, out: int) -> tuple[int, ...] | None:
    """The q/k/v rows a saved fused module was trained with (adapters saved before lora-tune
    recorded them split every fused layer into equal thirds); None if that cannot be."""
    if entry.get("part_sizes"):
        return tuple(int(s) for s in entry["part_sizes"])
    try:
        return equal_sizes(out)
    except ValueError:
        return None


def adapted_sites(model: nn.Module) -> list[Site]:
    return [Site(name, w, w.kind, int(w.r), float(w.lora_alpha), float(w.scaling), w.adapted_parts)
            for name, w in lora_layers(model)]


def _model_config(model: nn.Module, config: LoraConfig | None) -> LoraConfig | None:
    if config is not None and not isinstance(config, LoraConfig):
        raise ConfigError("config", type(config).__name__, "a lora_tune.LoraConfig or None")
    return config if config is not None else getattr(model, "_lora_tune_config", None)


def config_for(model: nn.Module, sites: list[Site], config: LoraConfig | None) -> LoraConfig:
    """The config to record: the given/recorded one, or one reconstructed from the wrappers."""
    config = _model_config(model, config)
    if config is not None:
        return config
    ranks = Counter(s.r for s in sites)
    rank = ranks.most_common(1)[0][0]
    alpha = Counter(s.alpha for s in sites if s.r == rank).most_common(1)[0][0]
    rslora = any(s.r > 1 and math.isclose(s.scaling, scale_for(s.r, s.alpha, True)) for s in sites)
    first = sites[0].wrapper
    quant: QuantizedWeight | None = None
    for s in sites:
        q = s.wrapper.base_weight_q
        q = cast("QuantizedWeight | None", next(iter(q.values()), None)) if isinstance(q, nn.ModuleDict) else q
        if q is not None:
            quant = q
            break
    extras = [k for k, p in model.named_parameters() if p.requires_grad and not _is_lora_key(k)]
    biases = [k for k in extras if k.endswith("bias")]
    owners = sorted({k.rsplit(".", 1)[0] for k in extras if not k.endswith("bias")})
    all_biases = [k for k, _ in model.named_parameters() if k.endswith("bias")]
    bias = "none" if not biases else ("all" if len(biases) == len(all_biases) else "lora_only")
    return LoraConfig(
        rank=rank, alpha=alpha, dropout=float(getattr(first, "dropout_p", 0.0)),
        targets=[s.selector_name for s in sites], method=first.method,
        quant_bits=quant.bits if quant is not None else None,
        quant_type=quant.quant_type if quant is not None and quant.bits == 4 else "nf4",
        double_quant=bool(getattr(getattr(quant, "_state", None), "nested", True)),
        rslora=rslora, bias=bias, modules_to_save=["re:" + re.escape(o) for o in owners],
        use_dora=any(s.use_dora for s in sites),
    )


def _is_lora_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in LORA_SUFFIXES


def lora_state_dict(model: nn.Module, config: LoraConfig | None = None) -> dict[str, torch.Tensor]:
    """Every ``lora_A`` / ``lora_B`` of the model, plus the biases that ``config.bias`` makes
    trainable and the whole state of ``config.modules_to_save``, keyed by the model's own names.

    The config is ``config`` or the one ``inject`` recorded on the model; without either, the
    extra entries are the trainable parameters that are not LoRA factors."""
    config = _model_config(model, config)
    out: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    for key, p in params.items():
        if _is_lora_key(key):
            out[key] = p.detach()
    if config is None:
        out.update({k: p.detach() for k, p in params.items() if p.requires_grad and k not in out})
        return out
    if config.bias == "all":
        out.update({k: p.detach() for k, p in params.items() if k.endswith("bias")})
    elif config.bias == "lora_only":
        for name, wrapper in lora_layers(model):
            for k, p in wrapper.named_parameters(prefix=name):
                if k.endswith("bias"):
                    out[k] = p.detach()
    patterns = [parse_pattern(p, "modules_to_save") for p in config.modules_to_save]
    for name, module in model.named_modules():
        if name and any(p.matches(name) for p in patterns):
            out.update({k: t.detach() for k, t in module.state_dict(prefix=name + ".").items()})
    return out


@dataclass
class LoadPlan:
    """What load_adapter will do once every check has passed."""

    tensors: dict[str, torch.Tensor]     # model key -> value
    config: LoraConfig | None = None     # inject this first (the model has no LoRA layers yet)
    plain_fused: tuple[str, ...] = ()    # fused qkv names to adapt as one plain pair (PEFT adapters)
    record: LoraConfig | None = None     # the config to record on the model (default: ``config``)

    def apply(self, model: nn.Module) -> None:
        if self.config is not None:
            inject_exact(model, self.config, self.plain_fused)
            recorded = self.record or self.config
            model._lora_tune_config = recorded  # type: ignore[assignment]  # torch's __setattr__ stub is too narrow
        merged = [w for _, w in lora_layers(model) if w.merged]
        for w in merged:
            w.unmerge()
        targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        with torch.no_grad():
            for key, value in self.tensors.items():
                targets[key].copy_(value.to(dtype=targets[key].dtype, device=targets[key].device))
        for w in merged:
            w.merge()


def exact_targets(names_with_parts: list[tuple[str, tuple[str, ...] | None]]) -> list[str]:
    return ["re:" + re.escape(n) + (f"[{','.join(p)}]" if p else "") for n, p in names_with_parts]


def inject_exact(model: nn.Module, config: LoraConfig, plain_fused: tuple[str, ...] = ()) -> None:
    """inject(), then (for PEFT adapters) turn the named fused qkv wrappers into one plain pair."""
    inject(model, config)
    modules = dict(model.named_modules())
    for name in plain_fused:
        old = modules[name]
        new = LoraLinear(old.base_layer, old.r, old.lora_alpha, transposed=old.transposed,
                         rslora=config.rslora, dropout=config.dropout, method=config.method,
                         use_dora=config.use_dora)  # the magnitude (all rows either way) is loaded
        new.scaling = old.scaling
        if old.base_weight_q is not new.base_weight_q:  # (a QuantizedLinear's own is shared already)
            new._set_quantized(new.weight_name, old.base_weight_q)
        new.to(old.lora_A.device)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, new)
    model._lora_tune_config = config  # type: ignore[assignment]  # torch's __setattr__ stub is too narrow


def expected_after_inject(model: nn.Module, config: LoraConfig,
                          plain_fused: tuple[str, ...] = ()) -> dict[str, torch.Size]:
    """Parameter names and shapes the model would have after injecting ``config`` (and turning
    ``plain_fused`` into plain pairs, as :func:`inject_exact` does) -- found by resolving the
    targets on the model itself, then building their wrappers around weightless (meta-device)
    copies of the target modules."""
    dry = LoraConfig.from_dict({**config.to_dict(), "quant_bits": None, "init": "kaiming",
                                "modules_to_save": [], "bias": "none"})
    try:
        targets, _ = resolve(model, dry)
        shapes = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real inject repeats any rank warning
            for t in targets:
                t = replace(t, module=_meta_copy(t.module))
                if t.name in plain_fused:
                    t = replace(t, kind="linear", parts=None, part_sizes=None)
                wrapper = new_wrapper(t, dry, [])
                shapes.update({f"{t.name}.{k}": p.shape for k, p in wrapper.named_parameters()})
    except ConfigError as exc:
        raise AdapterFormatError(f"the saved adapter does not fit this model: {exc}") from None
    # parameters of non-target modules keep their names
    target_set = {t.name for t in targets}
    for k, t in model.state_dict(keep_vars=True).items():
        if not any(k.startswith(n + ".") for n in target_set):
            shapes[k] = t.shape
    return shapes


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta_t = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta_t, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta_t
    return copy.deepcopy(module, memo)


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], required: set[str],
                  source: str, hint: str = "") -> None:
    """Strict comparison of an adapter's tensors with what the model expects."""
    missing = sorted(required - set(tensors))
    unexpected = sorted(k for k in tensors if k not in expected)
    shapes = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
                    for k, v in tensors.items() if k in expected and tuple(v.shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_short(shapes)}")
    if problems:
        raise AdapterFormatError(f"{source}: adapter does not match the model; " + "; ".join(problems) + hint)


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items) - n} more)" if len(items) > n else "")
