"""lora-tune's own adapter format: a directory holding ``adapter_config.json`` (format version,
lora-tune version, the LoraConfig, the resolved target names with part selectors, and per-module
kind / rank / alpha / scaling / parts) and ``adapter.safetensors`` whose keys are the model's own
parameter names (``encoder.layer.0.attention.self.query.lora_A``). It keeps everything lora-tune
can express. Saving and loading dispatch here from :mod:`lora_tune.lora.state`.
"""
from __future__ import annotations

import math
import re
from typing import Any, cast

import torch
from torch import nn

from lora_tune import __version__
from lora_tune.errors import AdapterFormatError, ConfigError
from lora_tune.lora.adapter_sites import (
    LoadPlan,
    Site,
    _is_lora_key,
    _short,
    adapted_sites,
    check_tensors,
    exact_targets,
    expected_after_inject,
    lora_state_dict,
    saved_part_sizes,
)
from lora_tune.lora.config import scale_for
from lora_tune.lora.config import LoraConfig
from lora_tune.lora.fused import out_features
from lora_tune.lora.layers import LoraLinear
from lora_tune.lora.targets import fused_sizes

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"


def native_files(sites: list[Site], cfg: LoraConfig, tensors: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(adapter_config.json's content, the tensors, the weights file name) of an adapter."""
    meta = {
        "format": "lora-tune", "format_version": FORMAT_VERSION, "lora_tune_version": __version__,
        "lora_config": cfg.to_dict(), "target_modules": [n for s in sites for n in s.target_names],
        "modules": {s.name: s.meta() for s in sites},
        "extra_keys": sorted(k for k in tensors if not _is_lora_key(k)),
    }
    return meta, tensors, WEIGHTS_FILE


def check_version(meta: dict, source: str) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{source}: format_version {meta.get('format_version')!r}; "
                                 f"this lora-tune reads version {FORMAT_VERSION}")


def _saved_targets(modules_meta: dict) -> list[str]:
    """Exact patterns for the modules of a saved lora-tune adapter (expert stacks by parameter)."""
    out = []
    for name, m in modules_meta.items():
        parts = tuple(m["parts"]) if m.get("parts") else None
        if m.get("kind") == "experts":
            assert parts is not None, f"saved experts module {name!r} without its stacks"
            out += exact_targets([(f"{name}.{p}", None) for p in parts])
        else:
            out += exact_targets([(name, parts)])
    return out


def native_plan(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], source: str) -> LoadPlan:
    """What loading a lora-tune adapter (its config and tensors) into ``model`` does, checked."""
    modules_meta = meta.get("modules")
    if not isinstance(modules_meta, dict) or not modules_meta:
        raise AdapterFormatError(f"{source}: adapter_config.json has no 'modules' table")
    try:
        saved_cfg = LoraConfig.from_dict(meta["lora_config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise AdapterFormatError(f"{source}: invalid lora_config in adapter_config.json ({exc})") from None
    sites = adapted_sites(model)
    if sites:
        _check_sites(sites, modules_meta, source)
        expected = {**{k: t.shape for k, t in model.state_dict(keep_vars=True).items()},
                    **{k: p.shape for k, p in model.named_parameters()}}
        required = set(lora_state_dict(model))
        check_tensors(tensors, expected, required, source)
        return LoadPlan(tensors)
    cfg = LoraConfig.from_dict({
        **saved_cfg.to_dict(), "targets": _saved_targets(modules_meta), "exclude": [], "enable_lora": None,
        "layers": None, "layers_pattern": None,
        "rank_pattern": {"re:" + re.escape(n): int(m["r"]) for n, m in modules_meta.items()},
        "alpha_pattern": {"re:" + re.escape(n): float(m["alpha"]) for n, m in modules_meta.items()},
    })
    for name, m in modules_meta.items():
        scaling = scale_for(int(m["r"]), float(m["alpha"]), cfg.rslora)
        if not math.isclose(scaling, float(m.get("scaling", float("nan"))), rel_tol=1e-6):
            raise AdapterFormatError(f"{source}: module {name!r}: the saved config gives scaling {scaling:g} but the "
                                     f"adapter was trained with {m.get('scaling')}; "
                                     "adapter_config.json is inconsistent")
    _check_part_sizes(model, cfg, modules_meta, source)
    expected = expected_after_inject(model, cfg)
    required = {k for k in expected if _is_lora_key(k)} | set(meta.get("extra_keys") or [])
    check_tensors(tensors, expected, required, source)
    return LoadPlan(tensors, config=cfg, record=saved_cfg)


def _check_sites(sites: list[Site], modules_meta: dict, source: str) -> None:
    have = {s.name: s for s in sites}
    missing = sorted(set(modules_meta) - set(have))
    extra = sorted(set(have) - set(modules_meta))
    if missing or extra:
        raise AdapterFormatError(
            f"{source}: the adapter adapts other modules than the model; only in the adapter: {_short(missing)}; "
            f"only in the model: {_short(extra)}")
    for name, m in modules_meta.items():
        s = have[name]
        saved_parts = tuple(m["parts"]) if m.get("parts") else None
        if s.kind != m.get("kind") or s.parts != saved_parts or s.r != m.get("r"):
            raise AdapterFormatError(
                f"{source}: module {name!r} is adapted as {s.kind} r={s.r} parts={s.parts} in the model but as "
                f"{m.get('kind')} r={m.get('r')} parts={saved_parts} in the adapter")
        if s.use_dora != bool(m.get("use_dora", False)):
            raise AdapterFormatError(
                f"{source}: module {name!r} is adapted with use_dora={s.use_dora} in the model but "
                f"use_dora={bool(m.get('use_dora', False))} in the adapter; inject with the adapter's config "
                "or load into a fresh model")
        if not math.isclose(s.scaling, float(m.get("scaling", float("nan"))), rel_tol=1e-6):
            raise AdapterFormatError(
                f"{source}: module {name!r} has scaling {s.scaling:g} in the model but {m.get('scaling')} in the "
                "adapter (alpha / rank / rslora differ); inject with the adapter's config or load into a fresh model")
        if s.kind == "fused":
            rows = cast(LoraLinear, s.wrapper).out_features
            _same_split(name, s.part_sizes, saved_part_sizes(m, rows), source)


def _check_part_sizes(model: nn.Module, cfg: LoraConfig, modules_meta: dict, source: str) -> None:
    """Fused layers of the adapter must split in the model as they did when it was trained."""
    modules = dict(model.named_modules())
    for name, m in modules_meta.items():
        if m.get("kind") != "fused" or name not in modules:
            continue
        module = modules[name]
        try:
            here = fused_sizes(model, name, module, cfg.qkv_sizes)
        except ConfigError as exc:
            raise AdapterFormatError(f"{source}: the saved adapter does not fit this model: {exc}") from None
        _same_split(name, here, saved_part_sizes(m, out_features(module)), source)


def _same_split(name: str, here: tuple[int, ...] | None, saved: tuple[int, ...] | None, source: str) -> None:
    if here is None or saved is None or tuple(here) != tuple(saved):
        raise AdapterFormatError(
            f"{source}: fused module {name!r} splits into q/k/v rows {list(saved) if saved else None} in the adapter "
            f"but {list(here) if here else 'not at all'} in this model; the adapter was trained for another layout "
            "(set LoraConfig.qkv_sizes if lora-tune reads this model's head counts wrongly)")
