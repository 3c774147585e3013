"""The core injector: imports torch only (bitsandbytes, transformers and peft lazily).

``detach`` (:func:`lora_tune.lora.inject.detach`, loaded on first use) takes the adapters ``inject``
attached off a model again, leaving its base exactly as it was.

The config does not import its translators: PEFT interop is the leaf :mod:`lora_tune.lora.peft`.
``LoraConfig.to_peft(model)`` / ``LoraConfig.from_peft(source)``, the names they had on the config,
are attached here (this package is initialised before any of its modules) as aliases of
:func:`~lora_tune.lora.peft.to_peft_config` / :func:`~lora_tune.lora.peft.from_peft_config` that
load the leaf when called.
"""
from __future__ import annotations

from typing import Any

from lora_tune.lora.config import LoraConfig


def _to_peft(self: LoraConfig, model: Any) -> Any:
    """Alias of :func:`lora_tune.lora.peft.to_peft_config` (this config, ``model``)."""
    from lora_tune.lora.peft import to_peft_config  # noqa: PLC0415 - the leaf (and torch) load on use

    return to_peft_config(self, model)


def _from_peft(cls: type[LoraConfig], source: Any) -> LoraConfig:
    """Alias of :func:`lora_tune.lora.peft.from_peft_config`."""
    from lora_tune.lora.peft import from_peft_config  # noqa: PLC0415 - the leaf (and torch) load on use

    return from_peft_config(source)


LoraConfig.to_peft = _to_peft  # type: ignore[attr-defined]
LoraConfig.from_peft = classmethod(_from_peft)  # type: ignore[attr-defined]


def __getattr__(name: str) -> Any:
    if name == "detach":
        from lora_tune.lora.inject import detach  # noqa: PLC0415 - torch loads on use

        return detach
    raise AttributeError(f"module 'lora_tune.lora' has no attribute {name!r}")
