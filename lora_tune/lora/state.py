"""Adapter weights: the LoRA-only state dict, and saving / loading it.

Two on-disk formats, both a directory holding a JSON config and one safetensors file (never
pickle):

* ``lora-tune``: ``adapter_config.json`` (format version, lora-tune version, the LoraConfig,
  the resolved target names with part selectors, and per-module rank / alpha / scaling) and
  ``adapter.safetensors`` whose keys are the model's own parameter names
  (``encoder.layer.0.attention.self.query.lora_A``).
* ``peft``: what ``peft.PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained``
  reads -- see :mod:`lora_tune.lora.peft_format`.

``load_adapter`` detects the format. It loads into a model that already carries LoRA layers,
or injects them first from the saved config. Every check (keys, shapes, scaling) happens
before anything is changed, so a refused adapter leaves the model as it was.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lora_tune.errors import AdapterFormatError, ConfigError
from lora_tune.lora.adapter_sites import (  # noqa: F401 - re-exported: lora_tune.lora.state.X keeps working
    LORA_SUFFIXES,
    LoadPlan,
    Site,
    _is_lora_key,
    _meta_copy,
    _model_config,
    _short,
    adapted_sites,
    check_tensors,
    exact_targets,
    expected_after_inject,
    inject_exact,
    lora_state_dict,
    saved_part_sizes,
)
from lora_tune.lora.config import LoraConfig
from lora_tune.lora.fused import out_features
from lora_tune.lora.targets import fused_sizes

__all__ = ["lora_state_dict", "save_adapter", "load_adapter", "FORMATS"]

FORMATS = ("lora-tune", "peft")
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"


# -- the config to record ------------------------------------------------------------------------


def config_for(model: nn.Module, sites: list[Site], config: LoraConfig | None) -> LoraConfig:
    """The config to record: the given/recorded one, or one reconstructed from the wrappers."""
    config = _model_config(model, config)
    if config is not None:
        return config
    ranks = Counter(s.r for s in sites)
    rank = ranks.most_common(1)[0][0]
    alpha = Counter(s.alpha for s in sites if s.r == rank).most_common(1)[0][0]
    rslora = any(s.r > 1 and math.isclose(s.scaling, s.alpha / math.sqrt(s.r)) for s in sites)
    first = sites[0].wrapper
    quant = None
    for s in sites:
        q = s.wrapper.base_weight_q
        q = next(iter(q.values()), None) if isinstance(q, nn.ModuleDict) else q
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


# -- saving -------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | os.PathLike, format: str = "lora-tune",
                 config: LoraConfig | None = None, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter of ``model`` to the directory ``path`` (created if needed).

    ``format="lora-tune"`` keeps everything lora-tune can express; ``format="peft"`` writes what
    ``peft.PeftModel.from_pretrained`` loads with identical outputs, and refuses (with
    AdapterFormatError) layers PEFT cannot represent faithfully. Returns the directory."""
    if format not in FORMATS:
        raise ConfigError("format", format, "one of " + ", ".join(repr(f) for f in FORMATS))
    sites = adapted_sites(model)
    if not sites:
        raise AdapterFormatError("the model has no LoRA layers to save; call lora_tune.inject(model, config) first")
    cfg = config_for(model, sites, config)
    tensors = lora_state_dict(model, cfg)
    if format == "peft":
        from lora_tune.lora.peft_format import to_peft  # noqa: PLC0415

        meta, tensors, weights_file = to_peft(model, sites, cfg, tensors, base_model_name_or_path)
    else:
        from lora_tune import __version__  # noqa: PLC0415

        meta = {
            "format": "lora-tune", "format_version": FORMAT_VERSION, "lora_tune_version": __version__,
            "lora_config": cfg.to_dict(), "target_modules": [n for s in sites for n in s.target_names],
            "modules": {s.name: s.meta() for s in sites},
            "extra_keys": sorted(k for k in tensors if not _is_lora_key(k)),
        }
        weights_file = WEIGHTS_FILE
    return _write(Path(path), meta, tensors, weights_file)


def _write(path: Path, meta: dict, tensors: dict[str, torch.Tensor], weights_file: str) -> Path:
    """Each file written whole, through a temporary name nobody can predict (lora_tune.files)."""
    from safetensors.torch import save  # noqa: PLC0415

    from lora_tune.files import write_atomic  # noqa: PLC0415

    if path.exists() and not path.is_dir():
        raise AdapterFormatError(f"{path} exists and is not a directory; save_adapter writes a directory")
    path.mkdir(parents=True, exist_ok=True)
    plain = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    write_atomic(path / weights_file, save(plain, metadata={"format": "pt"}))
    write_atomic(path / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


# -- loading ------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(format, config dict, tensors) of an adapter directory, checked for shape only."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not path.is_dir() or not cfg_path.is_file():
        raise AdapterFormatError(f"{path}: not an adapter directory (expected {CONFIG_FILE} inside it)")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"{cfg_path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise AdapterFormatError(f"{cfg_path}: expected a JSON object")
    if "peft_type" in meta:
        fmt, weights = "peft", "adapter_model.safetensors"
        if meta["peft_type"] != "LORA":
            raise AdapterFormatError(f"{cfg_path}: peft_type {meta['peft_type']!r}; only 'LORA' adapters can be loaded")
    elif meta.get("format") == "lora-tune":
        fmt, weights = "lora-tune", WEIGHTS_FILE
        if meta.get("format_version") != FORMAT_VERSION:
            raise AdapterFormatError(f"{cfg_path}: format_version {meta.get('format_version')!r}; "
                                     f"this lora-tune reads version {FORMAT_VERSION}")
    else:
        raise AdapterFormatError(f"{cfg_path}: neither a lora-tune adapter (\"format\": \"lora-tune\") "
                                 "nor a PEFT one (\"peft_type\")")
    w_path = path / weights
    if not w_path.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" Found {pickled}: pickled weights are never loaded; re-save them as safetensors." if pickled else ""
        raise AdapterFormatError(f"{path}: missing {weights}.{hint}")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{w_path}: not a readable safetensors file ({exc})") from None
    return fmt, meta, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter directory (lora-tune or PEFT format, detected) into ``model``.

    If the model has no LoRA layers yet they are injected from the saved config first. Keys,
    shapes and scaling are checked against the model before anything is copied; any mismatch
    raises AdapterFormatError naming the missing / unexpected keys or the shape. Returns the model."""
    fmt, meta, tensors = read_adapter(path)
    if fmt == "peft":
        from lora_tune.lora.peft_format import peft_plan  # noqa: PLC0415

        plan = peft_plan(model, meta, tensors, str(path))
    else:
        plan = _lora_tune_plan(model, meta, tensors, str(path))
    plan.apply(model)
    return model


def _saved_targets(modules_meta: dict) -> list[str]:
    """Exact patterns for the modules of a saved lora-tune adapter (expert stacks by parameter)."""
    out = []
    for name, m in modules_meta.items():
        parts = tuple(m["parts"]) if m.get("parts") else None
        if m.get("kind") == "experts":
            out += exact_targets([(f"{name}.{p}", None) for p in parts])
        else:
            out += exact_targets([(name, parts)])
    return out


def _lora_tune_plan(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], source: str) -> LoadPlan:
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
        scaling = cfg.scale_for(int(m["r"]), float(m["alpha"]))
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
            _same_split(name, s.part_sizes, saved_part_sizes(m, s.wrapper.out_features), source)


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
