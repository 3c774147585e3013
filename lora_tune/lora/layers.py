"""LoRA wrappers, one per layer family.

Every wrapper keeps the original module as ``base_layer`` (frozen) and adds the low-rank
factors ``lora_A`` (r x in) and ``lora_B`` (out x r), so the adapted weight is
``W0 + scaling * (B @ A)`` viewed in the base weight's layout. Two ways to compute it:

* ``parallel`` (loralib): ``base(x) + scaling * B(A(dropout(x)))`` -- a side branch, exact for
  layers that are linear in their weight (Linear, Conv, Embedding, GPT-2 Conv1D);
* ``merged`` (loratorch): ``layer(x; W0 + scaling * B @ A)`` -- the weight is rebuilt out of place
  on every call and passed to the layer's own functional forward, so autograd sees a fresh
  tensor (no in-place edits of saved tensors). Dropout, where asked for, drops entries of A.

``merge()`` folds the delta into the base weight (backing up the original so that
``unmerge()`` restores it bit for bit); with a quantized base the merged weight is kept dense
beside the quantized one instead.

With ``use_dora`` the single-weight wrappers learn a magnitude per output row as well
(``lora_magnitude``; see :mod:`lora_tune.lora.dora`).

This module holds the single-weight wrappers (Linear / GPT-2 Conv1D / fused qkv, Embedding, Conv)
and the dispatch table of every family (:data:`WRAPPERS`); nn.MultiheadAttention's wrapper is in
:mod:`lora_tune.lora.attention`, the expert stacks' in :mod:`lora_tune.lora.experts`, and the
state every wrapper shares (merging, initialisation, base weights) in :mod:`lora_tune.lora.adapter_base`.
Each family knows its weight layout, its inits, its kind, its DoRA support and its PEFT key names.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from lora_tune.errors import ConfigError
from lora_tune.lora.attention import LoraMultiheadAttention, LoraProjection
from lora_tune.lora.adapter_base import (
    ADAPTER_PARAMS,
    QKV,
    FactorPair,
    TargetSpec,
    _LoraState,
    _plus,
    active_factor,
    scale_for,
)
from lora_tune.lora.dora import DoraMixin
from lora_tune.lora.experts import LoraExperts
from lora_tune.lora.fused import (
    checked_sizes,
    enabled_sizes,
    gather_parts,
    given_sizes,
    parts_matrix,
    scatter_parts,
)
from lora_tune.lora.quant import QuantizedLinear, QuantizedWeight, quantized_linear

__all__ = [
    "ADAPTER_PARAMS",
    "LORA_WRAPPERS",
    "QKV",
    "WRAPPERS",
    "LoraConv",
    "LoraEmbedding",
    "LoraExperts",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LoraProjection",
    "active_factor",
    "scale_for",
    "wrapper_for",
]


class LoraLayer(DoraMixin, _LoraState):
    """Common state and merge logic of the single-weight wrappers.

    Subclasses define how the low-rank matrix maps onto the base weight (``_to_weight`` and its
    inverse ``_to_matrix``), the layer's functional forward with an explicit weight
    (``_forward_with``), the cheap parallel branch (``_lora_branch``) and, for DoRA, how a
    per-row vector broadcasts over the weight and the output (``_weight_view``, ``_out_view``).
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    supports_dora = True
    parts: tuple[bool, ...] | None = None          # fused qkv only (LoraLinear)
    part_sizes: tuple[int, ...] | None = None

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, *, rslora: bool = False,
                 dropout: float = 0.0, method: str = "parallel", weight_name: str = "weight",
                 use_dora: bool = False):
        super().__init__(base_layer, r, alpha, rslora, dropout, method)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight_name = weight_name
        self.base_weight_q: QuantizedWeight | None = None
        self.use_dora = use_dora
        self.register_parameter("lora_magnitude", None)

    def pairs(self) -> Mapping[str, FactorPair]:
        return {self.weight_name: self}

    def _is_quantized(self, key: str) -> bool:
        return self.base_weight_q is not None

    def _set_quantized(self, key: str, qweight: QuantizedWeight) -> None:
        self.base_weight_q = qweight

    def peft_magnitude(self, magnitude: torch.Tensor) -> torch.Tensor:
        """``lora_magnitude`` in the shape PEFT keeps it (``lora_magnitude_vector``)."""
        return magnitude.reshape(-1)

    # attributes such as in_features / padding_idx / stride are read from the base layer
    def __getattr__(self, name: str):
        try:
            return active_factor(self, name, super().__getattr__(name))  # nested ranks: see active_factor
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "base_layer" in modules and name not in ("weight",):
                return getattr(modules["base_layer"], name)
            raise

    # -- weights ---------------------------------------------------------------------------
    def base_weight(self, key: str | None = None) -> torch.Tensor:
        if self.base_weight_q is not None:
            return self.base_weight_q.dequantize()
        return getattr(self.base_layer, self.weight_name)

    def lora_matrix(self) -> torch.Tensor:
        """``B @ A`` as an (out, in) matrix, unscaled."""
        return self._matrix_from(self.lora_A)

    def _matrix_from(self, A: torch.Tensor) -> torch.Tensor:
        return self.lora_B.flatten(1) @ A.flatten(1)

    def delta_weight(self, key: str | None = None) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout (``key``: the one weight, whatever is passed)."""
        return self._to_weight(self.lora_matrix().mul_(self.scaling))  # B @ A is fresh: scale it in place

    def _dropped_delta(self) -> torch.Tensor:
        if self._dropout_active():
            A = F.dropout(self.lora_A, self.dropout_p, True)
            return self._to_weight(self._matrix_from(A).mul_(self.scaling))
        return self.delta_weight()

    def _dropout_active(self) -> bool:
        return self.training and isinstance(self.lora_dropout, nn.Dropout)

    def _merged_weight(self, key: str | None = None) -> torch.Tensor:
        w0, fresh = self.base_weight(), self.base_weight_q is not None
        if self.use_dora:
            return self._dora_weight(w0, self.delta_weight(), fresh)
        return _plus(w0, self.delta_weight(), fresh)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``W0 + delta`` (DoRA: ``W'``), for code that reads ``module.weight``."""
        if self.merged:
            return self._merged_dense.get(self.weight_name, self.base_weight())
        return self._merged_weight()

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            dense = self._merged_dense.get(self.weight_name)
            return self.base_layer(x) if dense is None else self._forward_with(x, dense)
        if self.method == "merged":
            w0, fresh = self.base_weight(), self.base_weight_q is not None
            delta = self._dropped_delta()
            if self.use_dora:  # the norm follows the undropped factors
                undropped = self.delta_weight() if self._dropout_active() else delta
                return self._forward_with(x, self._dora_weight(w0, delta, fresh, undropped))
            return self._forward_with(x, _plus(w0, delta, fresh))
        if self.use_dora:
            return self._dora_parallel(x)
        return self._base_out(x) + self._lora_branch(self.lora_dropout(x))

    def _base_out(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The frozen base layer's output, with or without its bias."""
        if self.base_weight_q is not None:
            return self._quantized_base_forward(x) if bias else self._quantized_base_forward(x, bias=False)
        return self.base_layer(x) if bias else self._forward_with(x, self.base_weight(), bias=False)

    def _quantized_base_forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The frozen quantized base's output (wrappers that can re-dequantize in backward
        override this to keep the dense weight out of autograd's saved tensors)."""
        return self._forward_with(x, self.base_weight(), bias)

    def _forward_with(self, x: torch.Tensor, weight: torch.Tensor, bias: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def _weight_view(self, rows: torch.Tensor) -> torch.Tensor:
        """A vector over output rows, shaped to scale the weight row by row (DoRA)."""
        raise NotImplementedError

    def _out_view(self, rows: torch.Tensor) -> torch.Tensor:
        """A vector over output rows, shaped to scale the layer's output (DoRA): its last axis."""
        return rows

    def _add_bias(self, out: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.base_layer, "bias", None)
        return out if bias is None else out.add_(self._out_view(bias))

    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        """The adapted rows of a vector over all output rows (all of them but in fused part layers)."""
        return full

    def _full_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_rows``, with 1 on rows that are not adapted."""
        return rows

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * B(A(x))`` on the (already dropped-out) input; the scale is applied to the rank-r intermediate,
        the smallest tensor on the path, in place: A's output is fresh and saved by nothing
        (B's matmul saves the scaled one), so an out-of-place product would only add a small
        transient per layer, served from the heap, whose holes raise peak RSS."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        q = f", bits={self.base_weight_q.bits}" if self.base_weight_q is not None else ""
        dora = ", dora" if self.use_dora else ""
        return f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:.4g}, method={self.method}{q}{dora}"


class LoraLinear(LoraLayer):
    """nn.Linear, transformers' GPT-2 ``Conv1D`` (``transposed``: weight is in x out), and fused
    qkv projections (``parts``: which of q/k/v get a delta; the others get none at all).

    A fused layer's output rows are q, k, v blocks of ``part_sizes`` rows (equal thirds when not
    given; grouped-query attention has smaller k and v). ``lora_A`` is (n*r, in) and ``lora_B``
    is (rows of the n enabled parts, r) (loralib's MergedLinear layout): each part has its own
    rank-r pair."""

    KINDS = ("linear", "conv1d_gpt2", "fused")

    @classmethod
    def kind_of(cls, module: nn.Module) -> str | None:
        if isinstance(module, QuantizedLinear):  # a base loaded in 4 or 8 bits: its qweight is used as is
            return "linear"
        if isinstance(module, nn.Linear):
            # bitsandbytes' Linear4bit / Linear8bitLt hold integer weights: use quant_bits instead
            return "linear" if module.weight is not None and module.weight.is_floating_point() else None
        if (type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
                and hasattr(module, "nf")):
            return "conv1d_gpt2"
        return None

    @classmethod
    def for_target(cls, target: TargetSpec, r: int, alpha: float, **kw) -> LoraLinear:
        """A fused qkv target (``target.parts``: q/k/v names) has its rows split into ``target.part_sizes``."""
        module, parts = target.module, target.parts if target.kind == "fused" else None
        enabled = tuple(p in parts for p in QKV) if parts is not None else None
        return cls(module, r, alpha, transposed=cls.kind_of(module) == "conv1d_gpt2", parts=enabled,
                   part_sizes=target.part_sizes, **kw)

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, *, transposed: bool = False,
                 parts: Sequence[bool] | None = None, part_sizes: Sequence[int] | None = None, **kw):
        super().__init__(base_layer, r, alpha, **kw)
        if isinstance(base_layer, QuantizedLinear):
            # shared with the base (every trial's wrapper), not registered here and never written
            object.__setattr__(self, "base_weight_q", base_layer.qweight)
            w = base_layer.qweight._dtype_probe  # an empty tensor of the weight's dtype and device
            out_f, in_f = base_layer.out_features, base_layer.in_features
        else:
            w = cast(torch.Tensor, base_layer.weight)  # a Linear's or GPT-2 Conv1D's
            out_f, in_f = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        self.in_features, self.out_features = in_f, out_f
        self.transposed = transposed
        self.parts = tuple(parts) if parts is not None else None
        self.part_sizes = checked_sizes(out_f, self.parts, part_sizes)
        n = sum(self.parts) if self.parts else 1
        rows = sum(enabled_sizes(self.parts, given_sizes(self.part_sizes))) if self.parts else out_f
        self.lora_A = nn.Parameter(w.new_zeros(n * r, in_f))
        self.lora_B = nn.Parameter(w.new_zeros(rows, r))
        self._add_magnitude()

    @property
    def kind(self) -> str:
        return "fused" if self.parts else ("conv1d_gpt2" if self.transposed else "linear")

    @property
    def adapted_parts(self) -> tuple[str, ...] | None:
        return tuple(p for p, on in zip(QKV, self.parts) if on) if self.parts else None

    @property
    def max_useful_rank(self) -> int:
        rows = enabled_sizes(self.parts, given_sizes(self.part_sizes)) if self.parts else [self.out_features]
        return min(self.in_features, *rows)

    def _matrix_from(self, A: torch.Tensor) -> torch.Tensor:
        return parts_matrix(A, self.lora_B, self.parts, self.part_sizes)

    def _to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.t() if self.transposed else matrix

    def _to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.transposed else weight

    def prequantized(self, key: str | None = None) -> QuantizedWeight | None:
        return self.base_layer.qweight if isinstance(self.base_layer, QuantizedLinear) else None

    @torch.no_grad()
    def unloaded(self) -> nn.Module:
        """A plain layer holding ``W0 + delta``; over a QuantizedLinear a new nn.Linear with the
        dequantized sum (and the base's bias)."""
        base = self.base_layer
        if not isinstance(base, QuantizedLinear):
            return super().unloaded()
        w = self._unloaded_weight(self.weight_name)
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if base.bias is not None:
            linear.bias = base.bias
        return linear

    def _weight_view(self, rows):
        return rows.view(1, -1) if self.transposed else rows.view(-1, 1)

    def _rows(self, full):
        return gather_parts(full, self.parts, self.part_sizes) if self.parts else full

    def _full_rows(self, rows):
        return scatter_parts(rows, self.parts, self.part_sizes, dim=0, fill=1.0) if self.parts else rows

    def _forward_with(self, x, weight, bias=True):
        return F.linear(x, weight.t() if self.transposed else weight, self.base_layer.bias if bias else None)

    def _quantized_base_forward(self, x, bias=True):
        return quantized_linear(x, self.base_weight_q, self.base_layer.bias if bias else None, self.transposed)

    def _lora_branch(self, x):
        h = F.linear(x, self.lora_A).mul_(self.scaling)
        if not self.parts:
            return F.linear(h, self.lora_B)
        on = enabled_sizes(self.parts, self.part_sizes)
        out = torch.cat([F.linear(hi, b) for hi, b in zip(h.chunk(len(on), -1), self.lora_B.split(on))], -1)
        return scatter_parts(out, self.parts, self.part_sizes, dim=-1)

    def extra_repr(self) -> str:
        extra = ""
        if self.parts:
            extra = f", parts={[n for n, on in zip(QKV, self.parts) if on]}"
            sizes = given_sizes(self.part_sizes)
            if len(set(sizes)) > 1:
                extra += f", part_sizes={list(sizes)}"
        return f"in={self.in_features}, out={self.out_features}, " + super().extra_repr() + extra


class LoraEmbedding(LoraLayer):
    """nn.Embedding. As in PEFT, ``lora_A`` is (r, num_embeddings) and ``lora_B`` is (dim, r);
    the delta of the table is ``(B @ A).T``. Rows at ``padding_idx`` get no gradient, in both
    methods, exactly as for the base table."""

    KINDS = ("embedding",)
    base_layer: nn.Embedding
    PEFT_NAMES = {**_LoraState.PEFT_NAMES, "lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}

    @classmethod
    def kind_of(cls, module: nn.Module) -> str | None:
        # a subclass with its own forward (Gemma's scaled embedding, OPT's learned positions) is
        # not a plain table lookup, so a delta on its table is not what it computes
        plain = isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
        return "embedding" if plain else None

    @classmethod
    def for_target(cls, target: TargetSpec, r: int, alpha: float, **kw) -> LoraEmbedding:
        if target.module.max_norm is not None:
            raise ConfigError("targets", target.name, "embeddings without max_norm",
                              "nn.Embedding(max_norm=...) renormalises its weight in place, which LoRA cannot track")
        return cls(target.module, r, alpha, **kw)

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, **kw):
        super().__init__(base_layer, r, alpha, **kw)
        self.lora_dropout = nn.Identity()  # dropout on token ids makes no sense; embeddings take none
        w = base_layer.weight
        self.lora_A = nn.Parameter(w.new_zeros(r, w.shape[0]))
        self.lora_B = nn.Parameter(w.new_zeros(w.shape[1], r))
        self._add_magnitude()

    @property
    def max_useful_rank(self) -> int:
        return min(self.base_layer.weight.shape)

    @torch.no_grad()
    def _standard_init(self, pair: FactorPair, init: str) -> None:
        """One-hot inputs: A = 0 and B random, whatever ``init`` says (PEFT's choice)."""
        self.lora_A.zero_()
        self.lora_B.normal_(0.0, 1.0)

    def _to_weight(self, matrix):
        return matrix.t()

    def _to_matrix(self, weight):
        return weight.t()

    def _weight_view(self, rows):  # rows of B @ A are the embedding dimensions: the table's columns
        return rows.view(1, -1)

    def _embed(self, x, weight, padding_idx, max_norm=None):
        e = self.base_layer
        return F.embedding(x, weight, padding_idx, max_norm, e.norm_type, e.scale_grad_by_freq, False)

    def _forward_with(self, x, weight, bias=True):  # an embedding has no bias
        e = self.base_layer
        # the frozen table never needs a sparse gradient; a merged weight cannot take one
        return F.embedding(x, weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, False)

    def _dora_parallel(self, x):
        if self.base_layer.scale_grad_by_freq:  # the frequency scaling applies to the whole weight
            return self._forward_with(x, self._dora_weight(self.base_weight(), self.delta_weight(),
                                                           self.base_weight_q is not None))
        out = super()._dora_parallel(x)
        pad = self.base_layer.padding_idx
        if pad is not None:  # as in the merged reference: no gradient from padding positions, m's included
            out = torch.where((x == pad).unsqueeze(-1), out.detach(), out)
        return out

    def _lora_branch(self, x):
        pad = self.base_layer.padding_idx
        if self.base_layer.scale_grad_by_freq:  # the frequency scaling applies to the whole delta
            return self._embed(x, self.delta_weight(), pad)
        out = self._embed(x, self.lora_A.t(), pad).mul_(self.scaling) @ self.lora_B.t()
        if pad is not None:
            # The merged reference gives the padding row no gradient at all (not even to B).
            out = torch.where((x == pad).unsqueeze(-1), out.detach(), out)
        return out


class LoraConv(LoraLayer):
    """nn.Conv1d/2d/3d with any stride, padding, dilation, groups and padding_mode.

    ``lora_A`` has the shape of a conv kernel (r, in/groups, *k) and ``lora_B`` of a 1x1 kernel
    (out, r, 1, ...), as PEFT shapes them; delta = (B.flat @ A.flat) viewed as the kernel."""

    KINDS = ("conv",)
    base_layer: nn.modules.conv._ConvNd

    @classmethod
    def kind_of(cls, module: nn.Module) -> str | None:
        return "conv" if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else None

    def __init__(self, base_layer: nn.modules.conv._ConvNd, r: int, alpha: float, **kw):
        super().__init__(base_layer, r, alpha, **kw)
        w = base_layer.weight
        self.lora_A = nn.Parameter(w.new_zeros(r, *w.shape[1:]))
        self.lora_B = nn.Parameter(w.new_zeros(w.shape[0], r, *([1] * (w.dim() - 2))))
        self._conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
        self._add_magnitude()

    @property
    def max_useful_rank(self) -> int:
        w = self.base_layer.weight
        return min(w.shape[0], w[0].numel())

    def peft_magnitude(self, magnitude: torch.Tensor) -> torch.Tensor:
        return magnitude.reshape(1, -1, *[1] * (self.lora_A.dim() - 2))  # PEFT keeps a conv's as (1, out, 1, ...)

    def _to_weight(self, matrix):
        return matrix.view(self.lora_B.shape[0], *self.lora_A.shape[1:])

    def _to_matrix(self, weight):
        return weight.reshape(weight.shape[0], -1)

    def _weight_view(self, rows):
        return rows.view(-1, *([1] * (self.lora_A.dim() - 1)))

    def _out_view(self, rows):  # channels come before the spatial axes
        return rows.view(-1, *([1] * (self.lora_A.dim() - 2)))

    def _forward_with(self, x, weight, bias=True):
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias if bias else None)

    def _lora_branch(self, x):
        if self.base_layer.groups == 1:
            # A as a conv with the base layer's geometry, then B as a 1x1 conv.
            return self._conv(self.base_layer._conv_forward(x, self.lora_A, None).mul_(self.scaling), self.lora_B)
        return self.base_layer._conv_forward(x, self.delta_weight(), None)


LORA_WRAPPERS = (_LoraState,)
"""Every wrapper family (these, and :class:`lora_tune.lora.experts.LoraExperts`) derives from _LoraState."""

WRAPPERS: tuple[type[_LoraState], ...] = (LoraMultiheadAttention, LoraLinear, LoraEmbedding, LoraConv, LoraExperts)
"""The dispatch table (PEFT's ``_create_new_module`` walks its dispatchers the same way): the first
family whose ``kind_of`` recognises a torch layer wraps it, and each family builds the target
kinds it lists in ``KINDS`` (``fused`` and ``experts`` come from the resolver: a Linear or GPT-2
Conv1D split into q/k/v, a module's expert weight stacks)."""

WRAPPER_OF_KIND: dict[str, type[_LoraState]] = {kind: cls for cls in WRAPPERS for kind in cls.KINDS}


def wrapper_for(module: nn.Module) -> tuple[str, type[_LoraState]] | None:
    """(kind, wrapper family) of a torch layer lora-tune can adapt, else None."""
    for cls in WRAPPERS:
        if (kind := cls.kind_of(module)) is not None:
            return kind, cls
    return None
