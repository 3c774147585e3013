"""PEFT interop, a leaf of the core injector: only the adapter IO (:mod:`lora_tune.lora.state`,
for ``format="peft"``) and the ``LoraConfig.to_peft`` / ``from_peft`` aliases (on call) import it.
:mod:`.translate`: LoraConfig <-> ``peft.LoraConfig``; :mod:`.adapter_format`: PEFT's adapter
directories, without importing peft; :mod:`.matching`: PEFT's rules for where LoRA goes."""
from __future__ import annotations

from lora_tune.lora.peft.translate import from_peft_config, to_peft_config

__all__ = ["to_peft_config", "from_peft_config"]
