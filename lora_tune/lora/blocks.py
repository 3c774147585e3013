"""The model's repeated blocks (layer stacks) and ``LoraConfig.layers``: which of them get LoRA.

A layer stack is an ``nn.ModuleList`` whose entries each hold a layer the injector can adapt
(their types may differ: hybrid models mix attention and other blocks), or an ``nn.Sequential``
of two or more such entries of one type, that is not inside another stack: ``model.layers``
(Llama, Mixtral), ``transformer.h`` (GPT-2), ``bert.encoder.layer``, ``encoder.block`` and
``decoder.block`` (T5), ``model.encoder.layers`` and ``model.decoder.layers`` (BART, Whisper).
A stack nested in a block (old-style expert lists, T5's per-block ``layer`` list) is part of
that block.

``layers`` counts in every stack (or in those ``layers_pattern`` names): ``{"last": 2}`` on a
T5 adapts the last two encoder blocks and the last two decoder blocks. An index or a count a
stack does not have is an error naming the stack and its size, never a silent partial match.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from lora_tune.errors import ConfigError
from lora_tune.lora.config import LAYERS_ALLOWED, layers_label


@dataclass(frozen=True)
class LayerStack:
    """One stack of repeated blocks: ``name`` (``model.decoder.layers``) and how many blocks."""

    name: str
    size: int

    @property
    def attr(self) -> str:
        """The stack's attribute name (``layers``, ``h``, ``block``): PEFT's ``layers_pattern``."""
        return self.name.rsplit(".", 1)[-1]

    def block(self, index: int) -> str:
        return f"{self.name}.{index}"

    def index_of(self, module_name: str) -> int | None:
        """The block ``module_name`` lies in (or is), or None when it is outside this stack."""
        prefix = self.name + "."
        if not module_name.startswith(prefix):
            return None
        head = module_name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None


def layer_stacks(model: nn.Module, adaptable: Callable[[nn.Module], bool]) -> list[LayerStack]:
    """The model's outermost stacks of repeated blocks, in module order. ``adaptable(module)``
    says whether a module is one the injector adapts (or has adapted)."""
    holds: dict[int, bool] = {}

    def holds_adaptable(module: nn.Module) -> bool:
        key = id(module)
        if key not in holds:
            holds[key] = any(adaptable(m) for m in module.modules())
        return holds[key]

    stacks: list[LayerStack] = []
    for name, module in model.named_modules():
        if any(name.startswith(s.name + ".") for s in stacks):
            continue
        children = list(module.children())
        if isinstance(module, nn.ModuleList):
            ok = len(children) >= 1
        elif isinstance(module, nn.Sequential):
            ok = len(children) >= 2 and len({type(c) for c in children}) == 1
        else:
            continue
        if not ok:
            continue
        if all(holds_adaptable(c) for c in children):
            stacks.append(LayerStack(name, len(children)))
    return stacks


def locate(name: str, stacks: Sequence[LayerStack]) -> tuple[LayerStack, int] | None:
    """(stack, block index) of the module ``name``, or None when it is in no stack."""
    for stack in stacks:
        index = stack.index_of(name)
        if index is not None:
            return stack, index
    return None


def select_stacks(stacks: Sequence[LayerStack], layers_pattern: Sequence[str] | None) -> list[LayerStack]:
    """The stacks ``layers`` counts in: those ``layers_pattern`` names (by attribute or full
    name), or all of them."""
    if layers_pattern is None:
        return list(stacks)
    chosen = [s for s in stacks if s.attr in layers_pattern or s.name in layers_pattern]
    unknown = [p for p in layers_pattern if not any(p in (s.attr, s.name) for s in stacks)]
    if unknown:
        raise ConfigError("layers_pattern", list(layers_pattern), "names of the model's layer stacks: "
                          + (_describe(stacks) or "none (the model has no repeated blocks)"))
    return chosen


def selected_blocks(stacks: Sequence[LayerStack], layers: Any,
                    layers_pattern: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Stack name -> the block indices ``layers`` selects in it (every block with ``layers``
    None). Raises ConfigError naming ``layers``, the stack and what it allows when a stack has
    fewer blocks than asked for, or when the model has no stacks at all."""
    chosen = select_stacks(stacks, layers_pattern)
    if layers is None:
        return {s.name: tuple(range(s.size)) for s in chosen}
    label = layers_label(layers)
    if not chosen:
        raise ConfigError("layers", label, "None (the model has no repeated blocks to choose from)",
                          "lora-tune looks for nn.ModuleList / nn.Sequential children of one type that hold "
                          "adaptable layers; name the modules in targets instead")
    out: dict[str, tuple[int, ...]] = {}
    for s in chosen:
        if isinstance(layers, Mapping):
            (side, n), = layers.items()
            if n > s.size:
                raise ConfigError(f"layers.{side}", n, f"1 to {s.size}: {s.name} has {s.size} blocks",
                                  _stacks_hint(chosen))
            out[s.name] = tuple(range(n)) if side == "first" else tuple(range(s.size - n, s.size))
        else:
            bad = [i for i in layers if i >= s.size]
            if bad:
                raise ConfigError("layers", list(layers), f"block indices 0 to {s.size - 1}: {s.name} has "
                                  f"{s.size} blocks, so {bad} {'is' if len(bad) == 1 else 'are'} out of range",
                                  _stacks_hint(chosen) + "; " + LAYERS_ALLOWED)
            out[s.name] = tuple(layers)
    return out


def block_filter(model_stacks: Sequence[LayerStack], selection: Mapping[str, Sequence[int]]) -> Callable[[str], bool]:
    """Whether a module name lies in one of the selected blocks."""
    by_name = {s.name: s for s in model_stacks}

    def inside(name: str) -> bool:
        for stack_name, indices in selection.items():
            index = by_name[stack_name].index_of(name)
            if index is not None:
                return index in indices
        return False
    return inside


def _describe(stacks: Sequence[LayerStack]) -> str:
    return ", ".join(f"{s.name} ({s.attr}, {s.size} blocks)" for s in stacks)


def _stacks_hint(stacks: Sequence[LayerStack]) -> str:
    return "layer stacks: " + _describe(stacks)
