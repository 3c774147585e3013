"""lora-tune: a correct LoRA injector and hyperparameter search over it.

Public names are loaded lazily, so ``import lora_tune`` stays cheap for the CLI.
"""
from __future__ import annotations

import importlib
from typing import Any

from lora_tune.quiet import quiet_bitsandbytes

__version__ = "0.1.0"
quiet_bitsandbytes()

_EXPORTS = {
    "LoraConfig": "lora_tune.lora.config",
    "SearchSpace": "lora_tune.study.schema.space",
    "inject": "lora_tune.lora.inject",
    "InjectReport": "lora_tune.lora.inject",
    "find_targets": "lora_tune.lora.inject",
    "target_presets": "lora_tune.lora.inject",
    "target_coverage": "lora_tune.lora.coverage",
    "merge": "lora_tune.lora.inject",
    "unmerge": "lora_tune.lora.inject",
    "merge_and_unload": "lora_tune.lora.inject",
    "detach": "lora_tune.lora.inject",
    "lora_layers": "lora_tune.lora.inject",
    "lora_state_dict": "lora_tune.lora.state",
    "save_adapter": "lora_tune.lora.state",
    "load_adapter": "lora_tune.lora.state",
    "AdapterLoRa": "lora_tune.lora.facade",
    "load_config": "lora_tune.export",
    "LoraTuneCallback": "lora_tune.study.integrations.transformers_pruning",
    "LoraTuneLightningCallback": "lora_tune.study.integrations.lightning_pruning",
    "LoraTuneError": "lora_tune.errors",
    "ConfigError": "lora_tune.errors",
    "NoMatchingModulesError": "lora_tune.errors",
    "UnsupportedLayerError": "lora_tune.errors",
    "AdapterFormatError": "lora_tune.errors",
    "QuantizationError": "lora_tune.errors",
    "StudySpecError": "lora_tune.errors",
    "StudyNotFoundError": "lora_tune.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_tune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
