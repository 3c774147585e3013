"""The resident base: a task's frozen model, built once per base variant and lent to one trial at
a time.

A trial leases the base (:meth:`ResidentBase.lease`), attaches its adapters (``inject``), trains,
saves its adapter and gives the base back (:meth:`ResidentBase.give_back`), which detaches the
adapters (:func:`lora_tune.lora.detach`): every module, parameter, value and flag the trial
changed is restored, so the next trial on the same object computes exactly what it would on a
freshly built base (``tests/tasks/test_resident.py``). The base is never deep-copied.

A base variant is what of a trial's config changes the frozen weights themselves: the
quantization (``quant_bits`` / ``quant_type`` / ``double_quant``) and the device. One variant is
kept at a time: a trial of another variant frees the resident one before building its own. A
base whose give-back fails (or a trial that may have left it dirty) is dropped, never lent again.
"""
from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class BaseVariant:
    """What a trial's LoRA config changes in the frozen base (None bits: not quantized)."""

    quant_bits: int | None = None
    quant_type: str = "nf4"
    double_quant: bool = True
    device: str = "cpu"

    @classmethod
    def of(cls, config: Any, device: Any = "cpu") -> BaseVariant:
        """The variant a :class:`~lora_tune.lora.LoraConfig` trains on, on ``device``."""
        if config.quant_bits in (4, 8):
            return cls(config.quant_bits, config.quant_type if config.quant_bits == 4 else "int8",
                       bool(config.double_quant) if config.quant_bits == 4 else False, str(device))
        return cls(device=str(device))


Build = Callable[[BaseVariant], "tuple[nn.Module, str]"]  # variant -> (model, "built" | "cache")


class ResidentBase:
    """The frozen base of a task, kept across trials; see the module docstring.

    ``build(variant)`` makes the base of a variant (a new object, or the same in-memory model for
    every variant when quantization happens at inject) and says how (``built`` or ``cache``)."""

    def __init__(self, build: Build):
        self._build = build
        self._variant: BaseVariant | None = None
        self._model: nn.Module | None = None
        self._lent = False
        self._checkpointing = False
        self.last_load: str | None = None

    @property
    def model(self) -> nn.Module | None:
        """The resident model (None before the first lease or after a drop)."""
        return self._model

    def lease(self, variant: BaseVariant) -> tuple[nn.Module, str]:
        """The base of ``variant`` and how it was had (``built``, ``cache`` or ``resident``)."""
        if self._lent:
            raise RuntimeError("the resident base is lent to another trial")
        if self._model is None or self._variant != variant:
            self.drop()
            model, how = self._build(variant)
            self._model, self._variant = model, variant
        else:
            how = "resident"
        self._lent = True
        self._checkpointing = _checkpointing(self._model)
        self.last_load = how
        return self._model, how

    def give_back(self, model: nn.Module, clean: bool = True) -> None:
        """Detach the trial's adapters and keep the base for the next trial; ``clean=False`` (the
        trial may have left it inconsistent) or a failed detach drops it instead."""
        if not self._lent or model is not self._model:
            return  # not a lease of this base (e.g. a task's own fresh copy)
        self._lent = False
        if not clean:
            self.drop()
            return
        try:
            _detach_all(model)
            if _checkpointing(model) and not self._checkpointing:
                model.gradient_checkpointing_disable()
            model.eval()
        except Exception:
            self.drop()
            raise

    def drop(self) -> None:
        """Forget the resident base (its memory is freed once no trial holds it)."""
        held = self._model is not None
        self._model, self._variant, self._lent = None, None, False
        if held:  # its modules may sit in reference cycles: free them before the next base is built
            gc.collect()


def _checkpointing(model: nn.Module) -> bool:
    """Whether a Hugging Face model recomputes activations (the property's name changed in v5)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(model), name, None), property):
            return bool(getattr(model, name))
    return False


def _detach_all(model: nn.Module) -> None:
    from lora_tune.lora import detach
    from lora_tune.lora.attachment import attached
    from lora_tune.lora.inject import lora_layers

    if attached(model) is not None:  # a trial that stopped before inject attached nothing
        detach(model)
    if any(True for _ in lora_layers(model)):  # adapters no record of inject knows: never lend it again
        raise RuntimeError("LoRA layers are left on the resident base after detach")


def directory_base(ref: str, *, auto_class: str, dtype: Any, skip: list[str], cache_root: Callable[[], Any],
                   prepare: Callable[[nn.Module], None] | None = None) -> ResidentBase:
    """A resident base read from the model directory ``ref`` by the streaming loader
    (:func:`lora_tune.tasks.base_loader.load_base`): each variant loads straight into its final
    form (4/8-bit Linears quantized as they are read, on the trial's device, kept in the disk cache
    of quantized bases under ``cache_root()``), never holding the model in full precision. ``prepare`` runs on each
    freshly loaded base (e.g. the task's checks that need real weights)."""

    def build(variant: BaseVariant) -> tuple[nn.Module, str]:
        from lora_tune.tasks.base_loader import QuantSpec, load_base

        quant = None
        if variant.quant_bits == 8:
            quant = QuantSpec(8)
        elif variant.quant_bits == 4:
            quant = QuantSpec(4, variant.quant_type, variant.double_quant)
        loaded = load_base(ref, auto_class=auto_class, dtype=dtype, quant=quant, skip=skip, device=variant.device,
                           cache_dir=cache_root() if quant is not None else None)
        if prepare is not None:
            prepare(loaded.model)
        return loaded.model, loaded.how

    return ResidentBase(build)
