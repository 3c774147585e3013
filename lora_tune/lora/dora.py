"""DoRA (weight-decomposed LoRA, Liu et al. 2024) for the single-weight wrappers.

The adapted weight is ``W' = m * (W0 + s*B@A) / ||W0 + s*B@A||``: the direction of the LoRA
weight, rescaled per output row to the trainable magnitude ``m`` (``lora_magnitude``). The norm
is detached (the paper's section 4.3, and PEFT): it follows B and A but passes no gradient.

Conventions, identical to PEFT 0.21 (so that adapters move both ways with the same outputs):

* the norm is taken per row of the low-rank matrix ``B @ A`` laid over the base weight (the
  wrapper's ``_to_matrix`` view): per output feature for Linear, GPT-2 Conv1D and Conv (over
  ``in/groups * kernel``), and per *embedding dimension* for nn.Embedding (over the vocabulary,
  PEFT's choice), so ``m`` has ``lora_B.shape[0]`` entries;
* ``m`` starts at ``||W0 + s*B@A||`` of the base the layer really computes with (the residual
  after PiSSA, the dequantized weight of a 4/8-bit base), so the adapted model starts equal to
  the base model;
* a fused qkv layer with only some parts adapted (``c_attn[q,v]``) has a magnitude for the rows
  of its adapted parts only; the other parts' rows keep ``W0`` exactly, as they get no delta;
* ``parallel`` computes ``m/n * (W0 x + s*B A x) + bias`` from the base layer's own output, and
  with dropout in training PEFT's form ``base(x) + (m/n - 1) * W0 drop(x) + m/n * s*B A drop(x)``;
  ``merged`` builds ``W'`` (from a dropped A when dropout is on; the norm always uses the
  undropped factors) and calls the layer once;
* a quantized base is dequantized for the norm, without autograd (the dense copy is freed at
  once; the parallel base output still goes through the re-dequantizing autograd function).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lora_tune.lora.quant import QuantizedWeight


class DoraMixin:
    """DoRA for :class:`lora_tune.lora.layers.LoraLayer`. It uses the wrapper's layout methods:
    ``_to_matrix`` (base weight -> rows of ``B @ A``), ``_weight_view`` / ``_out_view`` (a per-row
    vector shaped to broadcast over the weight / the output), ``_rows`` / ``_full_rows`` (the
    adapted rows of a full-row vector and back), ``_base_out`` and ``_add_bias``."""

    lora_magnitude: nn.Parameter | None

    if TYPE_CHECKING:  # what the wrapper it is mixed into (an nn.Module) provides
        training: bool
        use_dora: bool
        lora_B: nn.Parameter
        lora_dropout: nn.Module
        base_weight_q: QuantizedWeight | None

        def base_weight(self, key: str | None = None) -> torch.Tensor: ...
        def delta_weight(self, key: str | None = None) -> torch.Tensor: ...
        def _to_matrix(self, weight: torch.Tensor) -> torch.Tensor: ...
        def _weight_view(self, rows: torch.Tensor) -> torch.Tensor: ...
        def _out_view(self, rows: torch.Tensor) -> torch.Tensor: ...
        def _rows(self, full: torch.Tensor) -> torch.Tensor: ...
        def _full_rows(self, rows: torch.Tensor) -> torch.Tensor: ...
        def _base_out(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor: ...
        def _add_bias(self, out: torch.Tensor) -> torch.Tensor: ...
        def _lora_branch(self, x: torch.Tensor) -> torch.Tensor: ...

    def _add_magnitude(self) -> None:
        """Called by each wrapper once ``lora_B`` exists; ``inject`` sets the values."""
        if self.use_dora:
            self.lora_magnitude = nn.Parameter(self.lora_B.new_ones(self.lora_B.shape[0]))

    @torch.no_grad()
    def weight_norm(self, w0: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> torch.Tensor:
        """``||W0 + delta||`` per adapted row, without gradient. ``w0`` defaults to the base weight
        (dequantized), ``delta`` (in the weight's layout) to ``scaling * B @ A``."""
        fresh = w0 is None and self.base_weight_q is not None
        w0 = self.base_weight() if w0 is None else w0
        delta = self.delta_weight() if delta is None else delta
        delta = delta.to(w0.dtype)
        w = w0.add_(delta) if fresh else w0 + delta
        return self._rows(torch.linalg.vector_norm(self._to_matrix(w), dim=1))

    @torch.no_grad()
    def init_magnitude(self, w0: torch.Tensor | None = None) -> None:
        """``m = ||W0 + s*B@A||``: outputs start unchanged. ``w0``: the base weight as the layer will
        compute with it (``inject`` passes the dequantized or PiSSA-residual weight before committing)."""
        assert self.lora_magnitude is not None, "init_magnitude needs use_dora"
        self.lora_magnitude.copy_(self.weight_norm(w0))

    def dora_scale(self, w0: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> torch.Tensor:
        """``m / ||W0 + delta||`` over every output row (1 on rows of fused parts not adapted)."""
        norm = self.weight_norm(w0, delta)
        m = self.lora_magnitude
        assert m is not None, "dora_scale needs use_dora"
        return self._full_rows(m / norm.to(m.dtype))

    def _dora_weight(self, w0: torch.Tensor, delta: torch.Tensor, fresh: bool,
                     norm_delta: torch.Tensor | None = None) -> torch.Tensor:
        """``W'`` in the base weight's layout; the norm uses ``norm_delta`` (default ``delta``)."""
        scale = self._weight_view(self.dora_scale(w0, delta if norm_delta is None else norm_delta))
        delta = delta.to(w0.dtype)
        return (w0.add_(delta) if fresh else w0 + delta) * scale.to(w0.dtype)

    def _dora_parallel(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._out_view(self.dora_scale())
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            # PEFT's form: the dropped input also feeds the correction of the base output
            xd = self.lora_dropout(x)
            base = self._base_out(x)
            scale = scale.to(base.dtype)  # the base output's dtype (autocast's, if on)
            return base + (scale - 1) * self._base_out(xd, bias=False) + scale * self._lora_branch(xd)
        y = self._base_out(x, bias=False)  # fresh, saved by nothing: the branch is added in place
        y = y.add_(self._lora_branch(x))
        return self._add_bias(y * scale.to(y.dtype))  # y is saved for the magnitude's gradient
