"""The PEFT (0.21) LoRA adapter format, written and read without importing peft.

A PEFT adapter directory holds ``adapter_config.json`` (``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``target_modules``, ``rank_pattern`` / ``alpha_pattern`` as regexes matched
against the end of module names, ...) and ``adapter_model.safetensors`` with keys

* ``base_model.model.<module>.lora_A.weight`` (r x in; conv: r x in x *k) and ``.lora_B.weight``
  (out x r; conv: out x r x 1...) for Linear, GPT-2 Conv1D (``fan_in_fan_out``) and Conv;
* ``base_model.model.<module>.lora_embedding_A`` (r x vocab) / ``lora_embedding_B`` (dim x r);
* with ``use_dora``, ``base_model.model.<module>.lora_magnitude_vector``: lora-tune's
  ``lora_magnitude`` (one entry per row of B @ A), shaped (1, out, 1, ...) for Conv;
* biases and ``modules_to_save`` state under their model names with the same prefix.

Without the ``base_model.model.`` prefix PEFT silently keeps its random init, so writing it is
mandatory and reading a file without it is refused.

A fused qkv layer with all of q, k, v adapted (GPT-2's ``c_attn``) is written as one pair of
rank 3r whose B is block-diagonal -- the same function; a PEFT pair of rank r over such a layer
(PEFT's own recipe) loads into lora-tune's per-part pairs of rank r with A repeated per part.
Layers PEFT computes differently from lora-tune are refused with the reason. The config fields
are also what :func:`lora_tune.lora.peft.to_peft_config` builds (see :mod:`lora_tune.lora.peft.translate`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from lora_tune.errors import AdapterFormatError, ConfigError
from lora_tune.lora.config import LoraConfig
from lora_tune.lora.adapter_sites import (
    LoadPlan,
    Site,
    adapted_sites,
    check_tensors,
    exact_targets,
    expected_after_inject,
    lora_state_dict,
)
from lora_tune.lora.adapter_base import ADAPTER_PARAMS
from lora_tune.lora.config import scale_for
from lora_tune.lora.fused import enabled_sizes, given_sizes, part_slices
from lora_tune.lora.layers import LoraLayer
from lora_tune.lora.peft.matching import (
    expert_entries,
    experts_to_peft,
    nesting,
    peft_pattern_keys,
    peft_target_fields,
)
from lora_tune.lora.targets import fused_sizes, parse_pattern, supported_kind

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
INITS_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}
# PEFT LoraConfig fields that lora-tune reads, and those that do not change what is computed
# (metadata, runtime settings, PEFT's own layout flags, options read only with a refused one).
# Any other field set to a true value is an option lora-tune does not have.
PEFT_READ_FIELDS = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                    "use_rslora", "bias", "modules_to_save", "init_lora_weights", "rank_pattern", "alpha_pattern",
                    "use_dora", "target_parameters", "layers_to_transform", "layers_pattern")
PEFT_IGNORED_FIELDS = ("peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
                       "fan_in_fan_out", "runtime_config", "megatron_core", "qalora_group_size", "layers_pattern")
_SUGGEST = " Save it with format='lora-tune' instead (lora_tune.load_adapter reads it back)."


# -- writing ------------------------------------------------------------------------------------
def _conv_reason(base: nn.Module) -> str | None:
    conv = cast(nn.modules.conv._ConvNd, base)
    if conv.groups != 1:
        return f"Conv with groups={conv.groups}: PEFT factors grouped convs differently (A over all input channels)"
    if any(d != 1 for d in conv.dilation):
        return f"Conv with dilation={conv.dilation}: PEFT's LoRA conv ignores dilation"
    if conv.padding_mode != "zeros":
        return f"Conv with padding_mode={conv.padding_mode!r}: PEFT's LoRA conv ignores padding_mode"
    return None


def _unrepresentable(site: Site, init: str) -> str | None:
    if site.kind == "mha":
        return ("nn.MultiheadAttention: PEFT 0.21 applies its out_proj delta twice (W + 2*dW) and has no "
                "per-part q/k/v selection, so PeftModel would compute a different function")
    if site.kind == "fused" and len(site.part_names) != 3:
        return (f"fused qkv with enable_lora parts {list(site.part_names)}: PEFT has no per-part LoRA; it would "
                "adapt (and train) the disabled parts too")
    if site.kind == "conv" and (why := _conv_reason(site.wrapper.base_layer)):
        return why
    if site.use_dora and site.kind == "fused" and len(site.part_names) != 3:
        return "DoRA on some parts of a fused qkv layer: PEFT's magnitude would rescale the other parts too"
    if init == "pissa" and site.kind not in ("linear", "conv1d_gpt2"):
        return f"init='pissa' on a {site.kind} layer: PEFT would rebuild the PiSSA residual differently"
    return None


def _peft_rank(site: Site) -> int:
    return site.r * len(site.part_names) if site.kind == "fused" else site.r


def _peft_alpha(site: Site, rslora: bool) -> float:
    if site.kind != "fused":
        return site.alpha
    rank = _peft_rank(site)
    return site.scaling * (math.sqrt(rank) if rslora else rank)


def _block_diagonal_B(B: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per-part B factors (stacked rows of ``sizes``) -> one B of rank len(sizes)*r."""
    return torch.block_diag(*B.split(sizes))


def _outermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def peft_key(name: str) -> str:
    """A rank_pattern / alpha_pattern key that PEFT matches to ``name`` only: PEFT matches keys as
    ``(.*\\.)?KEY$``, so a bare ``0`` would also hit module ``1.0``."""
    return "^" + re.escape(name)


def peft_modules_to_save(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The outermost modules ``cfg.modules_to_save`` selects in ``model``."""
    patterns = [parse_pattern(p, "modules_to_save") for p in cfg.modules_to_save]
    return _outermost([n for n, _ in model.named_modules() if n and any(p.matches(n) for p in patterns)])


def peft_meta(model: nn.Module, sites: list[Site], cfg: LoraConfig, base_model_name_or_path: str | None, *,
              fused_rank: str, inference_mode: bool) -> dict[str, Any]:
    """The PEFT LoraConfig fields for adapting ``sites`` of ``model`` as ``cfg`` says.

    A fused qkv layer adapted on q, k and v becomes one PEFT pair: of rank 3r with the same
    scaling (``fused_rank="blocks"``, which holds lora-tune's per-part pairs as a block-diagonal B:
    what a saved adapter needs), or of rank r (``"shared"``: PEFT's own recipe for such a layer)."""
    rank_of: Callable[[Site], int]
    alpha_of: Callable[[Site], float]
    if fused_rank == "blocks":
        rank_of, alpha_of = _peft_rank, (lambda s: _peft_alpha(s, cfg.rslora))
    else:
        rank_of, alpha_of = (lambda s: s.r), (lambda s: s.alpha)
    if base_model_name_or_path is None:
        hf_config = getattr(model, "config", None)
        base_model_name_or_path = (getattr(hf_config, "name_or_path", None)
                                   or getattr(hf_config, "_name_or_path", None) or None)
    saved = peft_modules_to_save(model, cfg)
    where = peft_target_fields(model, sites, cfg.layers)
    experts = any(s.kind == "experts" for s in sites)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        # PEFT refuses dropout on expert stacks; a saved adapter (for inference) does not need it
        "lora_dropout": 0.0 if experts and inference_mode else cfg.dropout,
        "target_modules": where["target_modules"],
        "target_parameters": where["target_parameters"],
        "exclude_modules": None,
        "use_rslora": cfg.rslora,
        "bias": cfg.bias,
        "modules_to_save": saved or None,
        "rank_pattern": {peft_key(k): rank_of(s) for s in sites if rank_of(s) != cfg.rank
                         for k in peft_pattern_keys(s)},
        "alpha_pattern": {peft_key(k): alpha_of(s) for s in sites if alpha_of(s) != cfg.alpha
                          for k in peft_pattern_keys(s)},
        "fan_in_fan_out": any(s.kind == "conv1d_gpt2" or (s.kind == "fused" and s.wrapper.transposed)
                              for s in sites),
        "init_lora_weights": INITS_TO_PEFT[cfg.init],
        "inference_mode": inference_mode,
        "use_dora": any(s.use_dora for s in sites),
        "lora_bias": False,
        "layers_to_transform": where["layers_to_transform"],
        "layers_pattern": where["layers_pattern"],
        "revision": None,
    }


def unrepresentable_sites(sites: list[Site], init: str) -> list[str]:
    """``"name: why"`` for each site PEFT would compute differently from lora-tune."""
    return [f"{s.name}: {why}" for s in sites if (why := _unrepresentable(s, init))]


def peft_files(model: nn.Module, sites: list[Site], cfg: LoraConfig, tensors: dict[str, torch.Tensor],
               base_model_name_or_path: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(adapter_config.json's content, the tensors under PEFT's keys, the weights file name)."""
    problems = unrepresentable_sites(sites, cfg.init)
    if problems:
        raise AdapterFormatError("format='peft' cannot represent these layers faithfully: "
                                 + "; ".join(problems) + "." + _SUGGEST)
    by_name = {s.name: s for s in sites}
    out: dict[str, torch.Tensor] = {}
    for s in (s for s in sites if s.kind == "experts"):
        for param in s.part_names:
            A, B = experts_to_peft(tensors.pop(f"{s.name}.{param}.lora_A"), tensors.pop(f"{s.name}.{param}.lora_B"))
            path = PEFT_PREFIX + nesting(s.name, s.part_names, param)
            out[f"{path}.lora_A.weight"], out[f"{path}.lora_B.weight"] = A, B
    for key, t in tensors.items():
        module, _, leaf = key.rpartition(".")
        site = by_name.get(module)
        if site is None or leaf not in ADAPTER_PARAMS:
            out[PEFT_PREFIX + key] = t
            continue
        if leaf == "lora_magnitude":
            t = cast(LoraLayer, site.wrapper).peft_magnitude(t)  # only single-weight wrappers have DoRA
        elif site.kind == "fused" and leaf == "lora_B":
            t = _block_diagonal_B(t, list(given_sizes(site.part_sizes)))
        out[f"{PEFT_PREFIX}{module}.{site.wrapper.PEFT_NAMES[leaf]}"] = t
    meta = peft_meta(model, sites, cfg, base_model_name_or_path, fused_rank="blocks", inference_mode=True)
    return meta, out, PEFT_WEIGHTS


# -- reading ------------------------------------------------------------------------------------
def _pattern_value(patterns: dict | None, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _split_keys(tensors: dict[str, torch.Tensor], source: str):
    """PEFT keys -> ({module: {"A": t, "B": t, "M": DoRA magnitude (if any), "embedding": bool}}, {model key: t})."""
    bad = sorted(k for k in tensors if not k.startswith(PEFT_PREFIX))
    if bad:
        raise AdapterFormatError(
            f"{source}: {len(bad)} key(s) lack the {PEFT_PREFIX!r} prefix PEFT requires (e.g. {bad[0]!r}); PEFT "
            "would silently ignore them and keep random LoRA weights, so lora-tune refuses the file")
    pairs: dict[str, dict[str, Any]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        rest = key[len(PEFT_PREFIX):]
        m = re.fullmatch(r"(?P<mod>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB]))", rest)
        magnitude = re.fullmatch(r"(?P<mod>.+)\.lora_magnitude_vector", rest)
        if magnitude:
            pairs.setdefault(magnitude["mod"], {})["M"] = t
        elif m:
            entry = pairs.setdefault(m["mod"], {})
            entry[m["ab"] or m["eab"]] = t
            entry["embedding"] = m["eab"] is not None or entry.get("embedding", False)
        elif ".lora_" in rest or rest.startswith("lora_"):
            raise AdapterFormatError(f"{source}: key {key!r} is a PEFT LoRA variant lora-tune does not support")
        else:
            other[rest] = t
    for mod, entry in pairs.items():
        if "A" not in entry or "B" not in entry:
            raise AdapterFormatError(f"{source}: module {mod!r} has only one of its lora_A / lora_B tensors"
                                     + (" (and a lora_magnitude_vector)" if "M" in entry else ""))
    return pairs, other


def _magnitudes(meta: dict, pairs: dict, source: str) -> bool:
    """Whether the adapter is DoRA; every adapted module must then have a magnitude, and only then."""
    use_dora = bool(meta.get("use_dora", False))
    wrong = sorted(m for m, e in pairs.items() if ("M" in e) != use_dora)
    if wrong:
        have = "lacks the lora_magnitude_vector" if use_dora else "has a lora_magnitude_vector"
        raise AdapterFormatError(f"{source}: use_dora={use_dora} but module {wrong[0]!r} {have}"
                                 + (f" (also {wrong[1:4]})" if len(wrong) > 1 else ""))
    return use_dora


def unsupported_peft_options(meta: dict) -> list[str]:
    """The fields of a PEFT LoraConfig (as a dict) that set an option lora-tune does not have
    (DoRA, LoRA bias, layers_to_transform, target_parameters, LoftQ/EVA/CorDA configs, ...)."""
    known = set(PEFT_READ_FIELDS) | set(PEFT_IGNORED_FIELDS)
    return [f for f, value in meta.items() if f not in known and value]


def _check_peft_fields(meta: dict, source: str) -> str:
    used = unsupported_peft_options(meta)
    if used:
        raise AdapterFormatError(f"{source}: PEFT options lora-tune does not support: " + ", ".join(
            f"{f}={meta[f]!r}" for f in used))
    init = meta.get("init_lora_weights", True)
    if init in (True, False, "kaiming", "true", None):
        return "kaiming"
    if init == "gaussian":
        return "gaussian"
    if isinstance(init, str) and init == "pissa":
        return "pissa"
    raise AdapterFormatError(f"{source}: init_lora_weights={init!r}; lora-tune reads True, 'gaussian' or 'pissa'")


def _refuse_mha(model: nn.Module, names: list[str], source: str) -> None:
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        base = getattr(module, "base_layer", module)
        kind = supported_kind(base) if base is not None else None  # a name the model lacks has no kind
        if base is not None and kind == "conv" and (why := _conv_reason(base)):
            raise AdapterFormatError(f"{source}: module {name!r}: {why}, so PEFT's adapter means something else "
                                     "there than lora-tune would compute")
        if ".base_layer." in f".{name}." or kind == "mha":
            raise AdapterFormatError(
                f"{source}: module {name!r} is (part of) an nn.MultiheadAttention or a nested PEFT wrapper; PEFT "
                "0.21 applies an nn.MultiheadAttention's out_proj delta twice, so this adapter cannot be reproduced "
                "faithfully")


def _unblock(A: torch.Tensor, B: torch.Tensor, site: Site, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A PEFT pair over a fused qkv layer -> lora-tune's per-part factors: a pair of rank g*r whose B
    is block-diagonal (what lora-tune writes), or, with q, k and v all adapted, a pair of rank r
    (PEFT's own: every part gets the same A)."""
    sizes = given_sizes(site.part_sizes)
    enabled = [p in site.part_names for p in "qkv"]
    on = [i for i, p in enumerate(enabled) if p]
    g, r = len(on), site.r
    if g == len(sizes) and A.shape[0] == r and B.shape[1] == r:
        # PEFT's one pair shared by q, k and v (its recipe for a fused layer): each part gets A
        return A.repeat(g, 1), B
    if A.shape[0] != g * r or B.shape[1] != g * r:
        raise AdapterFormatError(
            f"{source}: {site.name!r} has one PEFT pair of rank {A.shape[0]} but the model adapts it as {g} fused "
            f"parts of rank {r}; load into a model without LoRA layers so lora-tune adapts it as PEFT did")
    theirs, ours_rows = part_slices(sizes), part_slices(enabled_sizes(enabled, sizes))
    ours = B.new_zeros(sum(enabled_sizes(enabled, sizes)), r)
    mask = torch.ones_like(B, dtype=torch.bool)
    for k, i in enumerate(on):
        cols = slice(k * r, (k + 1) * r)
        ours[ours_rows[k]] = B[theirs[i], cols]
        mask[theirs[i], cols] = False
    if torch.any(B[mask] != 0):
        raise AdapterFormatError(
            f"{source}: {site.name!r}: the PEFT lora_B is not block-diagonal over the q/k/v parts, so it cannot be "
            "loaded into per-part fused LoRA; load into a model without LoRA layers instead")
    return A, ours


def peft_plan(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], source: str) -> LoadPlan:
    init = _check_peft_fields(meta, source)
    pairs, other = _split_keys(tensors, source)
    if not pairs:
        raise AdapterFormatError(f"{source}: no lora_A / lora_B tensors in {PEFT_WEIGHTS}")
    use_dora = _magnitudes(meta, pairs, source)
    pairs = expert_entries(model, meta, pairs, source)  # expert stacks by parameter name, lora-tune layout
    _refuse_mha(model, [m for m, e in pairs.items() if "site" not in e], source)
    rslora = bool(meta.get("use_rslora", False))
    try:
        base_r, base_alpha = int(meta["r"]), float(meta["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise AdapterFormatError(f"{source}: adapter_config.json needs numeric 'r' and 'lora_alpha'") from None
    ranks, alphas = {}, {}
    for mod, e in pairs.items():
        ranks[mod] = int(e.get("r", e["A"].shape[0]))
        declared = int(_pattern_value(meta.get("rank_pattern"), mod, base_r))
        if ranks[mod] != declared or e["B"].shape[-1 if "site" in e else 1] != ranks[mod]:
            raise AdapterFormatError(f"{source}: {mod!r}: config says rank {declared}, tensors have "
                                     f"lora_A {tuple(e['A'].shape)} and lora_B {tuple(e['B'].shape)}")
        alphas[mod] = float(_pattern_value(meta.get("alpha_pattern"), mod, base_alpha))
    scale = {m: scale_for(ranks[m], alphas[m], rslora) for m in pairs}

    sites = adapted_sites(model)
    mapped = dict(other)
    if sites:
        have = {s.name: s for s in sites}
        theirs = {e.get("site", m) for m, e in pairs.items()}
        missing, extra = sorted(theirs - set(have)), sorted(set(have) - theirs)
        if missing or extra:
            raise AdapterFormatError(f"{source}: the PEFT adapter adapts other modules than the model; only in the "
                                     f"adapter: {missing}; only in the model: {extra}")
        for mod, e in pairs.items():
            site = have[e.get("site", mod)]
            if e["embedding"] != (site.kind == "embedding"):
                raise AdapterFormatError(f"{source}: {mod!r} is a {site.kind} layer in the model but the adapter "
                                         f"stores {'embedding' if e['embedding'] else 'linear/conv'} factors")
            if not math.isclose(site.scaling, scale[mod], rel_tol=1e-6):
                raise AdapterFormatError(f"{source}: {mod!r} has scaling {site.scaling:g} in the model but "
                                         f"{scale[mod]:g} in the adapter (r, lora_alpha, use_rslora)")
            if site.use_dora != use_dora:
                raise AdapterFormatError(f"{source}: {mod!r} is adapted with use_dora={site.use_dora} in the model "
                                         f"but the adapter has use_dora={use_dora}; inject with the adapter's config "
                                         "or load into a fresh model")
            if use_dora and (why := _unrepresentable(site, "kaiming")):
                raise AdapterFormatError(f"{source}: {mod!r}: {why}")
            A, B = _unblock(e["A"], e["B"], site, source) if site.kind == "fused" else (e["A"], e["B"])
            mapped[f"{mod}.lora_A"], mapped[f"{mod}.lora_B"] = A, B
            if use_dora:
                mapped[f"{mod}.lora_magnitude"] = e["M"].reshape(-1)
        expected = {**{k: t.shape for k, t in model.state_dict(keep_vars=True).items()},
                    **{k: p.shape for k, p in model.named_parameters()}}
        check_tensors(mapped, expected, set(lora_state_dict(model)), source)
        return LoadPlan(mapped)

    modules = dict(model.named_modules())
    unknown = sorted(m for m, e in pairs.items() if e.get("site", m) not in modules)
    if unknown:
        raise AdapterFormatError(f"{source}: the adapter names modules this model does not have: {unknown[:8]}")
    plain_fused = tuple(m for m, e in pairs.items()
                        if "site" not in e and fused_sizes(model, m, modules[m]) is not None)
    holder = {m: e.get("site", m) for m, e in pairs.items()}  # rank / alpha are per wrapper: per experts module
    for m in pairs:
        twin = next((o for o in pairs
                     if holder[o] == holder[m] and (ranks[o], alphas[o]) != (ranks[m], alphas[m])), None)
        if twin is not None:
            raise AdapterFormatError(f"{source}: expert stacks {m!r} and {twin!r} have different ranks or alphas; "
                                     "lora-tune adapts the stacks of one experts module with one rank and alpha")
    bias = meta.get("bias", "none")
    save = meta.get("modules_to_save") or []
    try:
        cfg = LoraConfig(
            rank=base_r, alpha=base_alpha, dropout=float(meta.get("lora_dropout", 0.0) or 0.0),
            targets=exact_targets([(m, None) for m in pairs]), rslora=rslora, init=init,
            rank_pattern={"re:" + re.escape(holder[m]): ranks[m] for m in pairs},
            alpha_pattern={"re:" + re.escape(holder[m]): alphas[m] for m in pairs},
            bias=bias if bias in ("none", "all", "lora_only") else "none",
            modules_to_save=list(save) if isinstance(save, (list, tuple)) else [save], use_dora=use_dora,
        )
    except ConfigError as exc:
        raise AdapterFormatError(f"{source}: adapter_config.json has a value lora-tune cannot use: {exc}") from None
    for mod, e in pairs.items():
        mapped[f"{mod}.lora_A"], mapped[f"{mod}.lora_B"] = e["A"], e["B"]
        if use_dora:
            mapped[f"{mod}.lora_magnitude"] = e["M"].reshape(-1)
    expected = expected_after_inject(model, cfg, plain_fused)
    check_tensors(mapped, expected, {k for k in expected if k.rsplit(".", 1)[-1] in ADAPTER_PARAMS}, source)
    if save:
        missing = [p for p in cfg.modules_to_save
                   if not any(parse_pattern(p, "modules_to_save").matches(n) for n in modules if n)]
        if missing:
            raise AdapterFormatError(f"{source}: modules_to_save {missing} are not modules of this model")
    return LoadPlan(mapped, config=cfg, plain_fused=plain_fused)
