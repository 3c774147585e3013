"""What PEFT's LoraConfig says about *where* LoRA goes: ``target_modules``, ``target_parameters``
(mixture-of-experts weight stacks) and ``layers_to_transform`` / ``layers_pattern`` (which
blocks), and PEFT's key layout for expert stacks. Used by :mod:`lora_tune.lora.peft.adapter_format`
(adapter files) and :mod:`lora_tune.lora.peft.translate` (``to_peft_config``).

**Layers.** PEFT applies ``layers_to_transform`` only to ``target_modules`` entries that match a
module by dotted suffix, finding the block index after ``layers_pattern`` (``layers.3.``); an
entry equal to a full module name, and every ``target_parameters`` entry, ignore it. So with
``LoraConfig.layers`` set, lora-tune writes the targets as their names inside a block
(``self_attn.q_proj``) plus ``layers_to_transform`` and ``layers_pattern`` when PEFT's rule then
matches exactly the adapted modules (checked here, with PEFT's own matching logic), and the exact
module names otherwise (without the layer fields, which PEFT would ignore). Expert stacks are
always written by their full parameter names, which already carry the layer choice.

**Expert stacks.** PEFT's ParamWrapper holds E pairs as one ``lora_A`` (r*E x in, expert e in
rows e*r ... e*r + r - 1) and one ``lora_B`` (out x r*E, expert e in columns j*E + e). Two stacks
of one module are nested wrappers: the first stack in the module's parameter order is innermost,
so its keys carry one more ``base_layer.`` for each stack after it
(``experts.base_layer.lora_A.weight`` is ``gate_up_proj``'s when ``down_proj`` is adapted too).
"""
from __future__ import annotations

import re
from typing import Any
from collections.abc import Sequence

import torch
from torch import nn

from lora_tune.errors import AdapterFormatError
from lora_tune.lora.blocks import locate
from lora_tune.lora.experts import LoraExperts, expert_parameters, num_experts
from lora_tune.lora.targets import model_stacks


# -- PEFT's matching rule (peft.tuners.tuners_utils.check_target_module_exists, 0.21) ------------
def peft_matches(key: str, target_modules: Sequence[str] | str, layers_to_transform: Sequence[int] | None,
                 layers_pattern: Sequence[str] | None) -> bool:
    """Whether PEFT would adapt module ``key`` (exclude_modules and modules_to_save aside)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True  # an exact name: PEFT skips the layer filter
    if not any(key.endswith(f".{t}") for t in target_modules):
        return False
    if not layers_to_transform:
        return True
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return match is not None and int(match["idx"]) in layers_to_transform


def exact_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """``target_modules`` that PEFT matches to exactly ``names``: the list of names where no other
    module's name ends with ``.NAME`` (PEFT matches a list by dotted suffix), else one regex
    (PEFT fullmatches a string)."""
    wanted = set(names)
    if not any(k not in wanted and any(k.endswith("." + n) for n in names) for k, _ in model.named_modules()):
        return list(names)
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _layer_form(model: nn.Module, names: list[str]) -> dict[str, Any] | None:
    """``target_modules`` as names inside a block + ``layers_to_transform`` + ``layers_pattern``,
    when PEFT's rule matches exactly ``names`` with them; else None."""
    stacks = model_stacks(model)
    inner, indices, patterns = [], set(), []
    for name in names:
        where = locate(name, stacks)
        if where is None:
            return None
        stack, index = where
        rel = name[len(stack.block(index)) + 1:]
        if not rel:
            return None
        inner.append(rel)
        indices.add(index)
        patterns.append(stack.attr)
    inner, patterns, blocks = list(dict.fromkeys(inner)), list(dict.fromkeys(patterns)), sorted(indices)
    hits = [k for k, _ in model.named_modules() if k and peft_matches(k, inner, blocks, patterns)]
    if sorted(hits) != sorted(names):
        return None
    return {"target_modules": inner, "layers_to_transform": blocks, "layers_pattern": patterns}


def peft_target_fields(model: nn.Module, sites: list, layers: Any) -> dict[str, Any]:
    """``target_modules``, ``target_parameters``, ``layers_to_transform`` and ``layers_pattern``
    for adapting ``sites`` (lora-tune's :class:`lora_tune.lora.adapter_sites.Site`) of ``model``;
    ``layers`` is ``LoraConfig.layers``."""
    modules = [s.name for s in sites if s.kind != "experts"]
    params = [name for s in sites if s.kind == "experts" for name in s.target_names]
    fields: dict[str, Any] = {"target_modules": exact_target_modules(model, modules) if modules else [],
                              "target_parameters": params or None,
                              "layers_to_transform": None, "layers_pattern": None}
    if layers is not None and modules and (form := _layer_form(model, modules)) is not None:
        fields.update(form)
    return fields


def peft_pattern_keys(site) -> list[str]:
    """The names PEFT looks a site's rank / alpha up by: the module's, or (expert stacks) each
    stack's parameter name."""
    return site.target_names if site.kind == "experts" else [site.name]


# -- expert stacks in PEFT's layout ----------------------------------------------------------------
def experts_to_peft(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lora-tune's (E x r x in, E x out x r) -> PEFT's (r*E x in, out x r*E)."""
    e, r, i = A.shape
    return A.reshape(e * r, i), B.permute(1, 2, 0).reshape(B.shape[1], r * e)


def experts_from_peft(A: torch.Tensor, B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (r*E x in, out x r*E) -> lora-tune's (E x r x in, E x out x r)."""
    if A.shape[0] % experts or B.shape[1] != A.shape[0]:
        raise ValueError(f"lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not hold {experts} expert pairs")
    r = A.shape[0] // experts
    return A.reshape(experts, r, A.shape[1]), B.reshape(B.shape[0], r, experts).permute(2, 0, 1).contiguous()


def nesting(module: str, params: Sequence[str], param: str) -> str:
    """The PEFT module path of ``param``'s wrapper when ``params`` of ``module`` are adapted."""
    depth = len(params) - 1 - list(params).index(param)
    return module + ".base_layer" * depth


def peft_expert_keys(model: nn.Module, meta: dict, pairs: dict, source: str) -> dict[str, tuple[str, str]]:
    """PEFT pair paths that belong to expert stacks -> (experts module, stack), following
    ``target_parameters`` with PEFT's matching (exact name or dotted suffix)."""
    wanted = meta.get("target_parameters") or []
    if not wanted:
        return {}
    out: dict[str, tuple[str, str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraExperts):  # a model adapted already: read the stacks of its base
            module = module.base_layer
        elif name.endswith(".base_layer") and isinstance(model.get_submodule(name[:-len(".base_layer")]), LoraExperts):
            continue
        hit = [p for p in expert_parameters(module)
               if any(f"{name}.{p}" == t or f"{name}.{p}".endswith("." + t) for t in wanted)]
        for p in hit:
            out[nesting(name, hit, p)] = (name, p)
    other = [k for k in pairs if ".base_layer" in k and k not in out]
    if other:
        raise AdapterFormatError(f"{source}: {other[0]!r} is a nested PEFT wrapper that is not an expert stack "
                                 f"target_parameters={wanted} selects in this model")
    return out




def expert_entries(model: nn.Module, meta: dict, pairs: dict[str, dict], source: str) -> dict[str, dict]:
    """``pairs`` (PEFT module path -> {"A", "B", ...}) with the expert stacks' entries re-keyed by
    the stack's parameter name (``...experts.gate_up_proj``) and their factors in lora-tune's
    layout; such an entry also says its ``site`` (the experts module) and rank ``r``."""
    keys = peft_expert_keys(model, meta, pairs, source)
    modules = dict(model.named_modules())
    out = {}
    for path, entry in pairs.items():
        if path not in keys:
            out[path] = entry
            continue
        module, param = keys[path]
        experts = num_experts(modules[module])
        assert experts is not None, "expert stacks belong to a module stating num_experts"
        try:
            A, B = experts_from_peft(entry["A"], entry["B"], experts)
        except ValueError as exc:
            raise AdapterFormatError(f"{source}: expert stack {module}.{param}: {exc}") from None
        out[f"{module}.{param}"] = {**entry, "A": A, "B": B, "r": A.shape[1], "site": module}
    return out
