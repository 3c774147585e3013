"""Which modules to adapt: supported layer types, name patterns, and presets.

A target pattern is one of
* an exact module name (``encoder.layer.0.attention.self.query``), which also matches as a
  dotted suffix (``query`` matches ``...self.query``), as in PEFT;
* ``.suffix``: names ending with that suffix (``.q_proj``);
* a glob (``layers.*.q_proj``), matched against the full name;
* ``re:REGEX``, matched with ``re.fullmatch`` against the full name.
Any pattern may end with a part selector ``[q,v]`` (drawn from q, k, v, o) that picks parts of
a fused qkv projection (split as :func:`lora_tune.lora.fused.qkv_sizes` says) or of
nn.MultiheadAttention (``o`` = its out_proj).

Expert weight stacks of mixture-of-experts modules (:mod:`lora_tune.lora.experts`) are matched
by the name of the parameter: ``model.layers.0.mlp.experts.gate_up_proj`` (so ``.gate_up_proj``,
``experts`` or ``mlp`` select them too), and adapted by one wrapper per experts module.
Presets come from each layer's role (:mod:`lora_tune.lora.roles`), and ``LoraConfig.layers``
keeps the targets inside the chosen blocks (:mod:`lora_tune.lora.blocks`).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from lora_tune.errors import ConfigError, NoMatchingModulesError, UnsupportedLayerError
from lora_tune.lora.blocks import LayerStack, layer_stacks
from lora_tune.lora.experts import expert_parameters
from lora_tune.lora.fused import Sizes, has_fused_name, qkv_sizes, split_problem
from lora_tune.lora.layers import LORA_WRAPPERS, wrapper_for
from lora_tune.lora.roles import layer_role

_SELECTOR = re.compile(r"^(?P<pattern>.*?)\[(?P<parts>[qkvo](?:\s*,\s*[qkvo])*)\]$")
_GLOB_CHARS = set("*?[")

def supported_kind(module: nn.Module) -> str | None:
    """The kind of a module the injector can adapt (the dispatch table's answer), or None."""
    found = wrapper_for(module)
    return found[0] if found is not None else None


SUPPORTED_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention",
                   "transformers Conv1D (GPT-2)",
                   "expert weight stacks (3-D parameters of a module stating num_experts)")


@dataclass(frozen=True)
class Pattern:
    text: str
    parts: tuple[str, ...] | None = None

    def matches(self, name: str) -> bool:
        p = self.text
        if p.startswith("re:"):
            return re.fullmatch(p[3:], name) is not None
        if p.startswith("."):
            return name.endswith(p) or name == p[1:]
        if _GLOB_CHARS & set(p):
            return fnmatch.fnmatchcase(name, p)
        return name == p or name.endswith("." + p)


def parse_pattern(text: str, field_name: str = "targets") -> Pattern:
    m = _SELECTOR.match(text)
    if m and m.group("pattern"):
        parts = tuple(dict.fromkeys(p.strip() for p in m.group("parts").split(",")))
        return Pattern(m.group("pattern"), parts)
    if text.startswith("re:"):
        try:
            re.compile(text[3:])
        except re.error as exc:
            raise ConfigError(field_name, text, "a valid regular expression after 're:'", str(exc)) from None
    return Pattern(text)


@dataclass
class Target:
    """One module the injector will wrap."""

    name: str
    module: nn.Module
    kind: str
    parts: tuple[str, ...] | None = None          # q/k/v(/o) for fused qkv and MHA; stack names for experts
    type_name: str = ""
    part_sizes: Sizes | None = None                # output rows of q, k, v of a fused qkv layer
    notes: list[str] = field(default_factory=list)


def selectors(name: str, kind: str, parts: tuple[str, ...] | None) -> list[str]:
    """Patterns that select exactly the adapted module ``name`` again (expert stacks by their
    parameter names, fused qkv and nn.MultiheadAttention with their part selector)."""
    if kind == "experts":
        assert parts is not None, "an experts module names its stacks"
        return [f"{name}.{p}" for p in parts]
    return [f"{name}[{','.join(parts)}]" if parts else name]


def fused_sizes(model: nn.Module, name: str, module: nn.Module,
                overrides: Mapping[str, Sequence[int]] | None = None) -> Sizes | None:
    """q/k/v output rows of a supported fused qkv layer (see :func:`lora_tune.lora.fused.qkv_sizes`),
    with ``overrides`` (``LoraConfig.qkv_sizes``: pattern -> sizes) taking precedence; None for
    any other layer."""
    if supported_kind(module) not in ("linear", "conv1d_gpt2"):
        return None
    given = next((v for k, v in (overrides or {}).items() if parse_pattern(k, "qkv_sizes").matches(name)), None)
    return qkv_sizes(model, name, module, given)


def _inside_wrapper(name: str, wrapped_prefixes: set[str]) -> bool:
    return any(name.startswith(p + ".") for p in wrapped_prefixes)


def named_candidates(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Supported modules, skipping the insides of LoRA wrappers and of nn.MultiheadAttention; an
    expert weight stack appears as ``(module name + "." + parameter, experts module, "expert")``."""
    skip: set[str] = set()
    out = []
    for name, module in model.named_modules():
        if not name or _inside_wrapper(name, skip):
            continue
        if isinstance(module, LORA_WRAPPERS):
            skip.add(name)
            continue
        kind = supported_kind(module)
        if kind == "mha":
            skip.add(name)
        if kind is not None:
            out.append((name, module, kind))
        out += [(f"{name}.{param}", module, "expert") for param in expert_parameters(module)]
    return out


def model_stacks(model: nn.Module) -> list[LayerStack]:
    """The model's layer stacks (see :func:`lora_tune.lora.blocks.layer_stacks`)."""
    return layer_stacks(model, lambda m: supported_kind(m) is not None or bool(expert_parameters(m))
                        or isinstance(m, LORA_WRAPPERS))


def _mha_children(model: nn.Module) -> dict[str, str]:
    """out_proj name -> its nn.MultiheadAttention's name."""
    return {f"{n}.out_proj": n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def resolve_targets(model: nn.Module, targets: list[str], exclude: list[str], default_parts: list[str] | None,
                    qkv_overrides: Mapping[str, Sequence[int]] | None = None, *,
                    inside: Callable[[str], bool] | None = None, layers: object = None,
                    strict_layers: bool = True) -> list[Target]:
    """Turn patterns into Targets (or raise a typed error naming the patterns and candidates).

    ``default_parts`` (``LoraConfig.enable_lora``) are the parts of fused layers and
    nn.MultiheadAttention adapted when a pattern has no selector; ``qkv_overrides``
    (``LoraConfig.qkv_sizes``) give the split of fused layers. ``inside(name)`` (from
    ``LoraConfig.layers``, written ``layers``) keeps only layers in the chosen blocks; with
    ``strict_layers`` a pattern whose every match lies outside them is an error naming it."""
    patterns = [parse_pattern(t) for t in targets]
    excl = [parse_pattern(t, "exclude") for t in exclude]
    candidates = named_candidates(model)
    _check_overrides(qkv_overrides or {}, candidates)
    by_name = {n: (m, k) for n, m, k in candidates}
    mha_of = _mha_children(model)
    modules = dict(model.named_modules())
    wrappers = {n for n, m in modules.items() if isinstance(m, LORA_WRAPPERS)}

    # An exact name of something we cannot adapt is an error, not a silent skip.
    for p in patterns:
        if p.text in modules and p.text not in by_name and p.text not in mha_of and supported_kind(
            modules[p.text]
        ) is None and not any(n.startswith(p.text + ".") for n in by_name):
            if p.text in wrappers or _inside_wrapper(p.text, wrappers):
                raise ConfigError("targets", p.text, "modules that are not adapted yet",
                                  f"{p.text!r} already carries LoRA; unmerge/unload before injecting again")
            raise UnsupportedLayerError(p.text, _type_description(modules[p.text]), SUPPORTED_TYPES)

    chosen: dict[str, Target] = {}

    def add(name: str, module: nn.Module, kind: str, parts: tuple[str, ...] | None, pattern: Pattern) -> None:
        sizes = None
        if kind == "mha":
            parts = parts if parts is not None else tuple(default_parts or ["q", "k", "v"]) + ("o",)
            if any(e.matches(f"{name}.out_proj") for e in excl):
                parts = tuple(p for p in parts if p != "o")
            if not parts:
                return
        elif (sizes := fused_sizes(model, name, module, qkv_overrides)) is not None:
            sel = parts if parts is not None else tuple(default_parts or ("q", "k", "v"))
            parts = tuple(p for p in sel if p != "o") or None
            kind = "fused"
            if parts is None:
                return
        else:
            _refuse_parts(model, name, module, kind, parts, pattern, default_parts)
        if kind == "expert":
            holder, _, param = name.rpartition(".")
            if holder in chosen:
                have = chosen[holder].parts
                assert have is not None, "an experts target names its stacks"
                chosen[holder].parts = tuple(p for p in expert_parameters(module) if p in have or p == param)
            else:
                chosen[holder] = Target(holder, module, "experts", (param,), type(module).__name__)
            return
        if name in chosen and (chosen_parts := chosen[name].parts) and parts:
            merged = tuple(p for p in ("q", "k", "v", "o") if p in chosen_parts or p in parts)
            chosen[name].parts = merged
            return
        chosen[name] = Target(name, module, kind, parts, type(module).__name__, part_sizes=sizes)

    all_names = [n for n, _, _ in candidates] + list(mha_of)
    matched: set[int] = set()
    outside: dict[int, str] = {}  # pattern -> a layer it matched outside the chosen blocks
    for name in all_names:
        ancestors = [name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)]
        excluded = any(e.matches(n) for e in excl for n in [name, *ancestors])
        for i, p in enumerate(patterns):
            # a pattern naming a container (not itself adaptable) selects the layers inside it
            if not (p.matches(name) or any(a not in by_name and p.matches(a) for a in ancestors)):
                continue
            if inside is not None and not inside(name):
                outside.setdefault(i, name)
                continue
            matched.add(i)
            if excluded:
                continue
            if name in mha_of:  # out_proj of an nn.MultiheadAttention: fold into the MHA wrapper
                parent = mha_of[name]
                if parent in by_name and not any(e.matches(parent) for e in excl):
                    add(parent, by_name[parent][0], "mha", ("o",), p)
                continue
            module, kind = by_name[name]
            add(name, module, kind, p.parts, p)
    names = [n for n, _, _ in candidates]
    only_outside = [i for i in outside if i not in matched]
    if inside is not None and (not chosen or (strict_layers and only_outside)):
        first = only_outside[0] if only_outside else next(iter(outside), None)
        why = (f"target {targets[first]!r} matches only layers outside them (e.g. {outside[first]!r})"
               if first is not None else "none of the targets lies in them")
        raise ConfigError("layers", layers, "a choice of blocks holding the targets", f"{why}; widen `layers` or "
                          "change the targets")
    if not chosen:
        raise NoMatchingModulesError(targets, names, exclude)
    unmatched = [t for i, t in enumerate(targets) if i not in matched and i not in outside]
    if unmatched:  # a typo next to a valid pattern must not pass silently
        raise NoMatchingModulesError(unmatched, names, exclude)
    return [chosen[n] for n in sorted(chosen, key=list(modules).index)]


def _check_overrides(overrides: Mapping[str, Sequence[int]], candidates: list[tuple[str, nn.Module, str]]) -> None:
    """A ``qkv_sizes`` pattern that names no Linear-like layer of the model is a typo."""
    linear = [n for n, _, k in candidates if k in ("linear", "conv1d_gpt2")]
    for pattern in overrides:
        if not any(parse_pattern(pattern, "qkv_sizes").matches(n) for n in linear):
            raise ConfigError("qkv_sizes", pattern, "patterns naming fused qkv layers of the model",
                              "Linear layers of the model: " + ", ".join(linear[:20])
                              + (" ..." if len(linear) > 20 else ""))


def _refuse_parts(model: nn.Module, name: str, module: nn.Module, kind: str, parts: tuple[str, ...] | None,
                  pattern: Pattern, default_parts: list[str] | None) -> None:
    """Part selection on a layer that has no parts to select is an error (for a fused qkv layer
    whose split is unknown: adapting it whole would also adapt the parts not asked for)."""
    unsplittable = kind in ("linear", "conv1d_gpt2") and has_fused_name(name)
    fix = (f"set LoraConfig.qkv_sizes={{{name!r}: [q_rows, k_rows, v_rows]}}, "
           "or drop the part selection to adapt it whole")
    if parts is not None:
        selector = f"{pattern.text}[{','.join(parts)}]"
        if unsplittable:
            raise ConfigError("targets", selector, "part selectors on fused qkv layers whose split is known",
                              f"{split_problem(model, name, module)}; {fix}")
        raise ConfigError("targets", selector,
                          "part selectors [q,k,v,o] on fused qkv layers and nn.MultiheadAttention only",
                          f"It matched {name!r}, a {type(module).__name__}; drop the selector or name the projections")
    if unsplittable and default_parts and set(default_parts) != {"q", "k", "v"}:
        raise ConfigError("enable_lora", default_parts, "parts of fused qkv layers whose split is known",
                          f"{split_problem(model, name, module)}; {fix}")


def _type_description(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.Embedding):
        return f"{name} (an nn.Embedding subclass with its own forward, which LoRA on its table would not follow)"
    return name


def classify(model: nn.Module, qkv_sizes: Mapping[str, Sequence[int]] | None = None
             ) -> list[tuple[str, nn.Module, str, str]]:
    """(name, module, kind, role) of every adaptable layer, in module order; roles as
    :mod:`lora_tune.lora.roles` gives them (``expert`` for expert stacks, ``mha`` for
    nn.MultiheadAttention, ``embedding`` / ``conv`` for those kinds)."""
    modules = dict(model.named_modules())
    stacks = model_stacks(model)
    out = []
    for name, module, kind in named_candidates(model):
        if kind in ("mha", "embedding", "conv", "expert"):
            role = kind
        else:
            role = layer_role(model, modules, name, module,
                              fused=fused_sizes(model, name, module, qkv_sizes) is not None,
                              fused_name=has_fused_name(name), stacks=stacks,
                              has_experts=lambda m: bool(expert_parameters(m)))
        out.append((name, module, kind, role))
    return out


def target_presets(model: nn.Module, qkv_sizes: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[str]]:
    """Presets from each layer's role (see :mod:`lora_tune.lora.roles`); each is a concrete list of
    target names.

    ``attention-qv`` (q and v), ``attention`` (q, k, v, o and fused qkv, self- and
    cross-attention), ``mlp`` (feed-forward layers and expert stacks), ``experts`` (the expert
    weight stacks of mixture-of-experts blocks), ``all-linear`` (every Linear-like layer and
    expert stack but the output head and the routers), ``embeddings``, ``conv``. Fused qkv layers
    and nn.MultiheadAttention appear with a part selector (``name[q,v]``); a fused layer whose
    q/k/v split is unknown is in ``attention`` (whole) but not in ``attention-qv``; ``qkv_sizes``
    (``LoraConfig.qkv_sizes``) gives splits lora-tune cannot read from the model. Output heads and
    routers are in none of them. Empty presets are left out."""
    qv, attn, mlp, experts, linear, emb, conv = [], [], [], [], [], [], []
    for name, _, _, role in classify(model, qkv_sizes):
        if role == "mha":
            qv.append(f"{name}[q,v]")
            attn.append(name)
            linear.append(name)
        elif role == "embedding":
            emb.append(name)
        elif role == "conv":
            conv.append(name)
        elif role in ("head", "router"):
            continue
        else:
            linear.append(name)
            if role == "qkv":
                qv.append(f"{name}[q,v]")
                attn.append(name)
            elif role in ("q", "v"):
                qv.append(name)
                attn.append(name)
            elif role in ("k", "o", "qkv_whole"):
                attn.append(name)
            elif role in ("mlp", "expert"):
                mlp.append(name)
                if role == "expert":
                    experts.append(name)
    presets = {"attention-qv": qv, "attention": attn, "mlp": mlp, "experts": experts, "all-linear": linear,
               "embeddings": emb, "conv": conv}
    return {k: v for k, v in presets.items() if v}


PRESET_NAMES = ("attention-qv", "attention", "mlp", "experts", "all-linear", "embeddings", "conv")
