"""What every LoRA wrapper shares: rank / alpha / scaling / method / dropout, the merge state
(``_LoraState.merge`` / ``unmerge``), and the small helpers of the low-rank algebra.
The wrappers themselves are in :mod:`lora_tune.lora.layers` (one per layer family),
:mod:`lora_tune.lora.attention` (nn.MultiheadAttention) and :mod:`lora_tune.lora.experts`."""
from __future__ import annotations

import math

import torch
from torch import nn

QKV = ("q", "k", "v")
ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_magnitude")
"""Names of the trainable adapter parameters of every wrapper (``lora_magnitude``: DoRA only)."""


# -- low-rank algebra shared by every wrapper --------------------------------------------------
def scale_for(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def active_factor(module: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Nested ranks (DyLoRA; set by :mod:`lora_tune.lora.nested`): ``lora_A`` / ``lora_B`` as the
    forward reads them. With ``module.active_rank = b`` (unset or None: the whole rank r) they
    read as their first b components: B's first b columns, and the first b rows of each of A's
    per-part blocks of r rows. Parameters, state dicts and optimizers still see the whole tensors
    (the first b components get the gradients)."""
    b = module.__dict__.get("active_rank")
    if b is None or name not in ("lora_A", "lora_B"):
        return value
    if name == "lora_B":
        return value[:, :b]
    n = value.shape[0] // module.__dict__["r"]
    return value[:b] if n == 1 else value.unflatten(0, (n, -1))[:, :b].flatten(0, 1)


class _LoraState(nn.Module):
    """r, alpha, scaling, method, dropout and merge state shared by every wrapper.

    A wrapper adapts one or more base weights, each named by a key (``"weight"``,
    ``"in_proj_weight"``, ``"out_proj.weight"``...). ``merge()`` adds each delta to its weight in
    place, keeping a backup for a bit-exact ``unmerge()``; a quantized weight, or one tied to
    another module (``shared_base``), gets a dense merged copy instead.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, rslora: bool, dropout: float, method: str):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = alpha
        self.scaling = scale_for(r, alpha, rslora)
        self.method = method
        self.dropout_p = dropout
        self.merged = False
        self.shared_base = False
        self._merge_backup: dict[str, torch.Tensor] = {}
        self._merged_dense: dict[str, torch.Tensor] = {}

    # subclasses say which weights they adapt and how to read them
    def _adapted_keys(self) -> list[str]:
        raise NotImplementedError

    def _delta_for(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def _merged_weight(self, key: str) -> torch.Tensor:
        """The adapted weight ``key`` as one tensor (what merge() stores), computed from the unmerged base."""
        return _plus(self.base_weight(key), self._delta_for(key), fresh=self._is_quantized(key))

    def _is_quantized(self, key: str) -> bool:
        raise NotImplementedError

    def _base_param(self, key: str) -> torch.Tensor:
        obj = self.base_layer
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # merged copies follow .to(dtype / device) like buffers
        for store in (self._merge_backup, self._merged_dense):
            for key in store:
                store[key] = fn(store[key])
        return self

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for key in self._adapted_keys():
            merged = self._merged_weight(key)
            if self._is_quantized(key) or self.shared_base:
                self._merged_dense[key] = merged.detach()
            else:
                p = self._base_param(key)
                self._merge_backup[key] = p.detach().clone()
                p.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for key, backup in self._merge_backup.items():
            self._base_param(key).copy_(backup)
        self._merge_backup.clear()
        self._merged_dense.clear()
        self.merged = False


def _plus(w0: torch.Tensor, delta: torch.Tensor, fresh: bool) -> torch.Tensor:
    """``w0 + delta`` in ``w0``'s dtype and layout. A ``fresh`` w0 (a dequantized copy that nothing
    else holds) takes the sum in place, which saves a dense weight-sized allocation per call; the
    values are the same either way (same operands, same order)."""
    delta = delta.to(w0.dtype)
    return w0.add_(delta) if fresh else w0 + delta


def _qkey(key: str) -> str:
    """ModuleDict keys cannot contain dots."""
    return key.replace(".", "__")
