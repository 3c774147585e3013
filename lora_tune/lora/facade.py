"""AdapterLoRa: the seed project's workflow as a thin facade over LoraConfig / inject.

    model = nn.TransformerEncoderLayer(d_model=512, nhead=8)
    adapter = AdapterLoRa(model, method="LoRa", Rank=4)
    adapter.add_layer("self_attn")
    adapter.add_layer("linear1")
    adapter.add_layer("linear2")
    adapter.reconstruct_model()
    model = adapter.implement_lora(verbose=True)

``method`` names, case-insensitive: ``"LoRa"`` / ``"parallel"`` (loralib's side branch,
h = base(x) + s*B(A(x))), ``"LoRa-Torch"`` / ``"merged"`` (loratorch's h = layer(x; W0 + s*BA)),
``"QLoRa"`` (parallel on a 4-bit NF4 base). ``alpha`` defaults to ``Rank`` (scale 1).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lora_tune.errors import ConfigError
from lora_tune.lora.config import LoraConfig
from lora_tune.lora.inject import InjectReport, find_targets, inject
from lora_tune.lora.state import save_adapter

__all__ = ["AdapterLoRa", "FACADE_METHODS"]

# facade method name (lower case) -> LoraConfig fields
FACADE_METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": "parallel"},
    "parallel": {"method": "parallel"},
    "lora-torch": {"method": "merged"},
    "merged": {"method": "merged"},
    "qlora": {"method": "parallel", "quant_bits": 4, "quant_type": "nf4"},
}
_ALLOWED = "'LoRa' or 'parallel', 'LoRa-Torch' or 'merged', 'QLoRa' (4-bit NF4 base); case-insensitive"


class AdapterLoRa:
    """Collect layer names, build the config, inject. Every step validates its input."""

    def __init__(self, model: nn.Module, method: str = "LoRa", Rank: int = 4, *, alpha: float | None = None,
                 **config: Any):
        if not isinstance(model, nn.Module):
            raise ConfigError("model", type(model).__name__, "a torch.nn.Module")
        if not isinstance(method, str) or method.lower() not in FACADE_METHODS:
            raise ConfigError("method", method, _ALLOWED)
        if isinstance(Rank, bool) or not isinstance(Rank, int) or Rank < 1:
            raise ConfigError("Rank", Rank, "an integer >= 1")
        clash = sorted({"rank", "targets", "method"} & set(config))
        if clash:
            raise ConfigError(clash[0], config[clash[0]], "set through Rank, add_layer() and method instead")
        self.model = model
        self.method = method
        self.Rank = Rank
        self.alpha = float(Rank) if alpha is None else alpha
        self._extra = {**FACADE_METHODS[method.lower()], **config}
        self.layers: list[str] = []
        self.config: LoraConfig | None = None
        self.targets: list[tuple[str, str]] = []
        self.report: InjectReport | None = None

    def add_layer(self, *names: str) -> AdapterLoRa:
        """Add module-name patterns to adapt (``"self_attn"``, ``"linear1"``, ``"layers.*.fc"``)."""
        if not names:
            raise ConfigError("add_layer", names, "one or more module-name patterns")
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise ConfigError("add_layer", name, "a non-empty module-name pattern such as 'self_attn'")
            if name.startswith("nn."):
                raise ConfigError("add_layer", name, "module names such as 'self_attn' or 'linear1', not layer types",
                                  "The layer type is detected from the module itself")
            if name not in self.layers:
                self.layers.append(name)
        self.config = None
        return self

    def reconstruct_model(self) -> AdapterLoRa:
        """Build the LoraConfig and resolve the layers (a dry run: the model is not changed)."""
        if self.report is not None:
            raise ConfigError("reconstruct_model", "called after implement_lora", "a model not yet adapted")
        if not self.layers:
            raise ConfigError("layers", [], "at least one layer added with add_layer('name')")
        self.config = LoraConfig(rank=self.Rank, alpha=self.alpha, targets=list(self.layers), **self._extra)
        self.targets = find_targets(self.model, self.config)
        return self

    def implement_lora(self, verbose: bool = False) -> nn.Module:
        """Wrap the resolved layers in place and return the model (only LoRA factors trainable)."""
        if self.report is not None:
            return self.model
        if self.config is None:
            self.reconstruct_model()
        assert self.config is not None  # reconstruct_model sets it
        before = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.report = inject(self.model, self.config)
        self.model._lora_tune_config = self.config  # type: ignore[assignment]  # torch's __setattr__ stub is too narrow
        after = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if verbose:
            print(f"Total trainable parameters before LoRA: {before}")
            print(f"Total trainable parameters after LoRA: {after}")
        return self.model

    def save(self, path: str | os.PathLike, format: str = "lora-tune") -> Path:
        """Save the adapter (see :func:`lora_tune.save_adapter`)."""
        if self.report is None:
            raise ConfigError("save", str(path), "a model adapted with implement_lora() first")
        return save_adapter(self.model, path, format=format, config=self.config)

    def __repr__(self) -> str:
        state = "implemented" if self.report is not None else ("reconstructed" if self.config else "collecting")
        return f"AdapterLoRa(method={self.method!r}, Rank={self.Rank}, layers={self.layers}, {state})"
