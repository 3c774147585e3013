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
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from torch import nn

from lora_tune.errors import ConfigError, NoMatchingModulesError, UnsupportedLayerError
from lora_tune.lora.fused import Sizes, has_fused_name, qkv_sizes, split_problem

_SELECTOR = re.compile(r"^(?P<pattern>.*?)\[(?P<parts>[qkvo](?:\s*,\s*[qkvo])*)\]$")
_GLOB_CHARS = set("*?[")

Q_NAMES = {"q", "query", "q_proj", "q_lin", "wq", "to_q", "queries", "q_attn"}
K_NAMES = {"k", "key", "k_proj", "k_lin", "wk", "to_k", "keys"}
V_NAMES = {"v", "value", "v_proj", "v_lin", "wv", "to_v", "values"}
O_NAMES = {"o", "o_proj", "out_proj", "out_lin", "wo", "to_out", "attn_out"}
HEAD_NAMES = {"lm_head", "classifier", "score", "head", "out_head", "qa_outputs", "fc_out", "output_layer",
              "decoder", "predictions"}
MLP_NAMES = {"fc1", "fc2", "c_fc", "linear1", "linear2", "up_proj", "down_proj", "gate_proj", "gate_up_proj",
             "lin1", "lin2",
             "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h", "wi", "wo_ffn", "fc_in", "fc_out_ffn"}
MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "experts")
ATTN_WORDS = ("attn", "attention", "self_attn", "mha")


def supported_kind(module: nn.Module) -> str | None:
    """The wrapper family for a module, or None when the injector cannot adapt it."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, nn.Linear):
        # bitsandbytes' Linear4bit / Linear8bitLt hold integer weights: use quant_bits instead
        return "linear" if module.weight is not None and module.weight.is_floating_point() else None
    if isinstance(module, nn.Embedding):
        # a subclass with its own forward (Gemma's scaled embedding, OPT's learned positions) is
        # not a plain table lookup, so a delta on its table is not what it computes
        return "embedding" if type(module).forward is nn.Embedding.forward else None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers") and hasattr(module, "nf"):
        return "conv1d_gpt2"
    return None


SUPPORTED_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention",
                   "transformers Conv1D (GPT-2)")


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
    parts: tuple[str, ...] | None = None          # q/k/v(/o) for fused qkv and MHA
    type_name: str = ""
    part_sizes: Sizes | None = None                # output rows of q, k, v of a fused qkv layer
    notes: list[str] = field(default_factory=list)


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
    """Supported modules, skipping the insides of LoRA wrappers and of nn.MultiheadAttention."""
    from lora_tune.lora.layers import LORA_WRAPPERS  # noqa: PLC0415

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
    return out


def _mha_children(model: nn.Module) -> dict[str, str]:
    """out_proj name -> its nn.MultiheadAttention's name."""
    return {f"{n}.out_proj": n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def resolve_targets(model: nn.Module, targets: list[str], exclude: list[str], default_parts: list[str] | None,
                    qkv_overrides: Mapping[str, Sequence[int]] | None = None) -> list[Target]:
    """Turn patterns into Targets (or raise a typed error naming the patterns and candidates).

    ``default_parts`` (``LoraConfig.enable_lora``) are the parts of fused layers and
    nn.MultiheadAttention adapted when a pattern has no selector; ``qkv_overrides``
    (``LoraConfig.qkv_sizes``) give the split of fused layers."""
    patterns = [parse_pattern(t) for t in targets]
    excl = [parse_pattern(t, "exclude") for t in exclude]
    candidates = named_candidates(model)
    _check_overrides(qkv_overrides or {}, candidates)
    by_name = {n: (m, k) for n, m, k in candidates}
    mha_of = _mha_children(model)
    modules = dict(model.named_modules())
    wrappers = {n for n, m in modules.items() if _is_wrapper(m)}

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
            parts = parts if parts is not None else tuple((default_parts or ["q", "k", "v"])) + ("o",)
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
        if name in chosen and chosen[name].parts and parts:
            merged = tuple(p for p in ("q", "k", "v", "o") if p in chosen[name].parts or p in parts)
            chosen[name].parts = merged
            return
        chosen[name] = Target(name, module, kind, parts, type(module).__name__, part_sizes=sizes)

    all_names = [n for n, _, _ in candidates] + list(mha_of)
    matched: set[int] = set()
    for name in all_names:
        ancestors = [name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)]
        excluded = any(e.matches(n) for e in excl for n in [name, *ancestors])
        for i, p in enumerate(patterns):
            # a pattern naming a container (not itself adaptable) selects the layers inside it
            if not (p.matches(name) or any(a not in by_name and p.matches(a) for a in ancestors)):
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
    if not chosen:
        raise NoMatchingModulesError(targets, names, exclude)
    unmatched = [t for i, t in enumerate(targets) if i not in matched]
    if unmatched:  # a typo next to a valid pattern must not pass silently
        raise NoMatchingModulesError(unmatched, names, exclude)
    return [chosen[n] for n in sorted(chosen, key=list(modules).index)]


def _check_overrides(overrides: Mapping[str, Sequence[int]], candidates: list[tuple[str, nn.Module, str]]) -> None:
    """A ``qkv_sizes`` pattern that names no Linear-like layer of the model is a typo."""
    linear = [n for n, _, k in candidates if k in ("linear", "conv1d_gpt2")]
    for pattern in overrides:
        if not any(parse_pattern(pattern, "qkv_sizes").matches(n) for n in linear):
            raise ConfigError("qkv_sizes", pattern, "patterns naming fused qkv layers of the model",
                              "Linear layers of the model: " + ", ".join(linear[:20]) + (" ..." if len(linear) > 20 else ""))


def _refuse_parts(model: nn.Module, name: str, module: nn.Module, kind: str, parts: tuple[str, ...] | None,
                  pattern: Pattern, default_parts: list[str] | None) -> None:
    """Part selection on a layer that has no parts to select is an error (for a fused qkv layer
    whose split is unknown: adapting it whole would also adapt the parts not asked for)."""
    unsplittable = kind in ("linear", "conv1d_gpt2") and has_fused_name(name)
    fix = f"set LoraConfig.qkv_sizes={{{name!r}: [q_rows, k_rows, v_rows]}}, or drop the part selection to adapt it whole"
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


def _is_wrapper(module: nn.Module) -> bool:
    from lora_tune.lora.layers import LORA_WRAPPERS  # noqa: PLC0415

    return isinstance(module, LORA_WRAPPERS)


def _role(model: nn.Module, name: str, module: nn.Module, qkv_sizes: Mapping[str, Sequence[int]] | None) -> str:
    last = name.rsplit(".", 1)[-1].lower()
    path = name.lower()
    if fused_sizes(model, name, module, qkv_sizes) is not None:
        return "qkv"
    if has_fused_name(name):
        return "qkv_whole"  # a fused projection whose split is unknown: adapted as one layer
    if last in Q_NAMES:
        return "q"
    if last in K_NAMES:
        return "k"
    if last in V_NAMES:
        return "v"
    in_attn = any(w in path.split(".")[i] for i in range(len(path.split(".")) - 1) for w in ATTN_WORDS)
    if last in O_NAMES or (in_attn and last in {"dense", "c_proj", "proj", "out", "output"}):
        return "o"
    parts_ = path.split(".")
    in_mlp = any(w in part for part in parts_[:-1] for w in MLP_WORDS)
    if not in_mlp and (last in HEAD_NAMES or path.startswith(("cls.", "lm_head", "classifier", "head."))):
        return "head"
    parts = path.split(".")
    if last in MLP_NAMES or any(w in part for part in parts[:-1] for w in MLP_WORDS) or (
        last == "dense" and len(parts) > 1 and parts[-2] == "output"
    ):
        return "mlp"
    return "other"  # e.g. a patch embedding or a pooler: in all-linear only


def target_presets(model: nn.Module, qkv_sizes: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[str]]:
    """Presets discovered from module names and types; each is a concrete list of target names.

    ``attention-qv``, ``attention``, ``mlp``, ``all-linear`` (every Linear-like layer but the
    output head), ``embeddings``, ``conv``. Fused qkv layers and nn.MultiheadAttention appear
    with a part selector (``name[q,v]``); a fused layer whose q/k/v split is unknown is in
    ``attention`` (whole) but not in ``attention-qv``; ``qkv_sizes`` (``LoraConfig.qkv_sizes``)
    gives splits lora-tune cannot read from the model. Output heads are in none of them.
    Empty presets are left out."""
    qv, attn, mlp, linear, emb, conv = [], [], [], [], [], []
    for name, module, kind in named_candidates(model):
        if kind == "mha":
            qv.append(f"{name}[q,v]")
            attn.append(name)
            linear.append(name)
            continue
        if kind == "embedding":
            emb.append(name)
            continue
        if kind == "conv":
            conv.append(name)
            continue
        role = _role(model, name, module, qkv_sizes)
        if role == "head":
            continue
        linear.append(name)
        if role == "qkv":
            qv.append(f"{name}[q,v]")
            attn.append(name)
        elif role in ("q", "v"):
            qv.append(name)
            attn.append(name)
        elif role in ("k", "o", "qkv_whole"):
            attn.append(name)
        elif role == "mlp":
            mlp.append(name)
    presets = {"attention-qv": qv, "attention": attn, "mlp": mlp, "all-linear": linear,
               "embeddings": emb, "conv": conv}
    return {k: v for k, v in presets.items() if v}


PRESET_NAMES = ("attention-qv", "attention", "mlp", "all-linear", "embeddings", "conv")
