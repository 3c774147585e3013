"""Saving and loading adapters, above both on-disk formats: it dispatches to lora-tune's own
(:mod:`lora_tune.lora.native_format`) or PEFT's (:mod:`lora_tune.lora.peft.adapter_format`),
neither of which imports this module. Both formats are a directory holding ``adapter_config.json``
and one safetensors file (never pickle).

``load_adapter`` detects the format. It loads into a model that already carries LoRA layers,
or injects them first from the saved config. Every check (keys, shapes, scaling) happens
before anything is changed, so a refused adapter leaves the model as it was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lora_tune.errors import AdapterFormatError, ConfigError
from lora_tune.safe_files import write_atomic
from lora_tune.lora.adapter_sites import CONFIG_FILE, adapted_sites, config_for, lora_state_dict
from lora_tune.lora.config import LoraConfig
from lora_tune.lora.native_format import WEIGHTS_FILE, check_version, native_files, native_plan
from lora_tune.lora.peft.adapter_format import PEFT_WEIGHTS, peft_files, peft_plan

__all__ = ["lora_state_dict", "save_adapter", "load_adapter", "FORMATS"]

FORMATS = ("lora-tune", "peft")


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
        meta, tensors, weights_file = peft_files(model, sites, cfg, tensors, base_model_name_or_path)
    else:
        meta, tensors, weights_file = native_files(sites, cfg, tensors)
    return _write(Path(path), meta, tensors, weights_file)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter directory (lora-tune or PEFT format, detected) into ``model``.

    If the model has no LoRA layers yet they are injected from the saved config first. Keys,
    shapes and scaling are checked against the model before anything is copied; any mismatch
    raises AdapterFormatError naming the missing / unexpected keys or the shape. Returns the model."""
    fmt, meta, tensors = read_adapter(path)
    plan = (peft_plan if fmt == "peft" else native_plan)(model, meta, tensors, str(path))
    plan.apply(model)
    return model


def _write(path: Path, meta: dict, tensors: dict[str, torch.Tensor], weights_file: str) -> Path:
    """Each file written whole, through a temporary name nobody can predict (lora_tune.safe_files)."""
    from safetensors.torch import save  # noqa: PLC0415

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
        fmt, weights = "peft", PEFT_WEIGHTS
        if meta["peft_type"] != "LORA":
            raise AdapterFormatError(f"{cfg_path}: peft_type {meta['peft_type']!r}; only 'LORA' adapters can be loaded")
    elif meta.get("format") == "lora-tune":
        fmt, weights = "lora-tune", WEIGHTS_FILE
        check_version(meta, str(cfg_path))
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
