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
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lora_tune.lora.dora import DoraMixin
from lora_tune.lora.fused import checked_sizes, enabled_sizes, gather_parts, parts_matrix, scatter_parts
from lora_tune.lora.quant import QuantizedWeight, quantized_linear

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


class LoraLayer(DoraMixin, _LoraState):
    """Common state and merge logic of the single-weight wrappers.

    Subclasses define how the low-rank matrix maps onto the base weight (``_to_weight`` and its
    inverse ``_to_matrix``), the layer's functional forward with an explicit weight
    (``_forward_with``), the cheap parallel branch (``_lora_branch``) and, for DoRA, how a
    per-row vector broadcasts over the weight and the output (``_weight_view``, ``_out_view``).
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, *, rslora: bool = False,
                 dropout: float = 0.0, method: str = "parallel", weight_name: str = "weight",
                 use_dora: bool = False):
        super().__init__(base_layer, r, alpha, rslora, dropout, method)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight_name = weight_name
        self.base_weight_q: QuantizedWeight | None = None
        self.use_dora = use_dora
        self.register_parameter("lora_magnitude", None)

    def _adapted_keys(self) -> list[str]:
        return [self.weight_name]

    def _delta_for(self, key: str) -> torch.Tensor:
        return self.delta_weight()

    def _is_quantized(self, key: str) -> bool:
        return self.base_weight_q is not None

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

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout."""
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

    def _to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_to_weight``: the base weight as rows of ``B @ A``."""
        raise NotImplementedError

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

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, *, transposed: bool = False,
                 parts: Sequence[bool] | None = None, part_sizes: Sequence[int] | None = None, **kw):
        super().__init__(base_layer, r, alpha, **kw)
        w = base_layer.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        self.in_features, self.out_features = in_f, out_f
        self.transposed = transposed
        self.parts = tuple(parts) if parts is not None else None
        self.part_sizes = checked_sizes(out_f, self.parts, part_sizes)
        n = sum(self.parts) if self.parts else 1
        rows = sum(enabled_sizes(self.parts, self.part_sizes)) if self.parts else out_f
        self.lora_A = nn.Parameter(w.new_zeros(n * r, in_f))
        self.lora_B = nn.Parameter(w.new_zeros(rows, r))
        self._add_magnitude()

    def _matrix_from(self, A: torch.Tensor) -> torch.Tensor:
        return parts_matrix(A, self.lora_B, self.parts, self.part_sizes)

    def _to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.t() if self.transposed else matrix

    def _to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.transposed else weight

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
            if len(set(self.part_sizes)) > 1:
                extra += f", part_sizes={list(self.part_sizes)}"
        return f"in={self.in_features}, out={self.out_features}, " + super().extra_repr() + extra


class LoraEmbedding(LoraLayer):
    """nn.Embedding. As in PEFT, ``lora_A`` is (r, num_embeddings) and ``lora_B`` is (dim, r);
    the delta of the table is ``(B @ A).T``. Rows at ``padding_idx`` get no gradient, in both
    methods, exactly as for the base table."""

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, **kw):
        super().__init__(base_layer, r, alpha, **kw)
        self.lora_dropout = nn.Identity()  # dropout on token ids makes no sense; embeddings take none
        w = base_layer.weight
        self.lora_A = nn.Parameter(w.new_zeros(r, w.shape[0]))
        self.lora_B = nn.Parameter(w.new_zeros(w.shape[1], r))
        self._add_magnitude()

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

    def __init__(self, base_layer: nn.modules.conv._ConvNd, r: int, alpha: float, **kw):
        super().__init__(base_layer, r, alpha, **kw)
        w = base_layer.weight
        self.lora_A = nn.Parameter(w.new_zeros(r, *w.shape[1:]))
        self.lora_B = nn.Parameter(w.new_zeros(w.shape[0], r, *([1] * (w.dim() - 2))))
        self._conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
        self._add_magnitude()

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


class LoraProjection(nn.Module):
    """The low-rank pair of one projection inside nn.MultiheadAttention (in_proj, q/k/v, out)."""

    def __init__(self, out_features: int, in_features: int, r: int, like: torch.Tensor,
                 parts: Sequence[bool] | None = None):
        super().__init__()
        self.r = r
        self.parts = tuple(parts) if parts is not None else None
        self.part_sizes = checked_sizes(out_features, self.parts, None)  # the packed in_proj is 3 x embed_dim
        n = sum(self.parts) if self.parts else 1
        rows = sum(enabled_sizes(self.parts, self.part_sizes)) if self.parts else out_features
        self.lora_A = nn.Parameter(like.new_zeros(n * r, in_features))
        self.lora_B = nn.Parameter(like.new_zeros(rows, r))

    def __getattr__(self, name: str):
        return active_factor(self, name, super().__getattr__(name))  # nested ranks: see active_factor

    def lora_matrix(self) -> torch.Tensor:
        return self._matrix_from(self.lora_A)

    def _matrix_from(self, A: torch.Tensor) -> torch.Tensor:
        return parts_matrix(A, self.lora_B, self.parts, self.part_sizes)


class LoraMultiheadAttention(_LoraState):
    """nn.MultiheadAttention: deltas on the packed in_proj (per-part q/k/v), or on separate
    q/k/v weights when kdim/vdim differ, and on out_proj.

    Attention is not linear in its weights (L(x, W0) + L(x, dW) != L(x, W0 + dW)), so both
    methods compute the adapted projections' weights W0 + s*BA (out of place) and call torch's
    own ``F.multi_head_attention_forward``: the branch form of ``parallel`` applies to each
    projection, which this computes exactly."""

    def __init__(self, base_layer: nn.MultiheadAttention, r: int, alpha: float, *, rslora: bool = False,
                 dropout: float = 0.0, method: str = "parallel", in_parts: Sequence[bool] | None = (True,) * 3,
                 adapt_out: bool = True):
        super().__init__(base_layer, r, alpha, rslora, dropout, method)
        self.in_parts = tuple(in_parts) if in_parts is not None and any(in_parts) else None
        self.adapt_out = adapt_out
        self.base_weight_q = nn.ModuleDict()
        E = base_layer.embed_dim
        like = base_layer.out_proj.weight
        if self.in_parts is not None:
            if base_layer._qkv_same_embed_dim:
                self.in_proj = LoraProjection(3 * E, E, r, like, self.in_parts)
            else:
                dims = {"q": E, "k": base_layer.kdim, "v": base_layer.vdim}
                for name, on in zip(QKV, self.in_parts):
                    if on:
                        self.add_module(f"{name}_proj", LoraProjection(E, dims[name], r, like))
        if adapt_out:
            self.out_proj = LoraProjection(E, E, r, like)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "_qkv_same_embed_dim":
                return False  # keeps torch's Transformer fast paths (which read raw weights) off
            if "base_layer" in modules:
                return getattr(modules["base_layer"], name)
            raise

    def _adapted_keys(self) -> list[str]:
        return list(self.projections())

    def _delta_for(self, key: str) -> torch.Tensor:
        return self.delta_weight(key)

    def _is_quantized(self, key: str) -> bool:
        return _qkey(key) in self.base_weight_q

    # name of each adapted base weight -> its LoraProjection
    def projections(self) -> dict[str, LoraProjection]:
        out = {}
        if self.in_parts is not None:
            if "in_proj" in self._modules:
                out["in_proj_weight"] = self.in_proj
            else:
                for name, on in zip(QKV, self.in_parts):
                    if on:
                        out[f"{name}_proj_weight"] = self._modules[f"{name}_proj"]
        if self.adapt_out:
            out["out_proj.weight"] = self.out_proj
        return out

    def base_weight(self, key: str) -> torch.Tensor:
        qkey = _qkey(key)
        if qkey in self.base_weight_q:
            return self.base_weight_q[qkey].dequantize()
        return self._base_param(key)

    def delta_weight(self, key: str) -> torch.Tensor:
        return self.projections()[key].lora_matrix().mul_(self.scaling)

    def _dropped_delta(self, proj: LoraProjection) -> torch.Tensor:
        A = F.dropout(proj.lora_A, self.dropout_p, True) if self.training and self.dropout_p > 0 else proj.lora_A
        return proj._matrix_from(A).mul_(self.scaling)

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """Every weight F.multi_head_attention_forward needs, adapted ones rebuilt out of place."""
        b = self.base_layer
        names = ["out_proj.weight"] + (
            ["in_proj_weight"] if b._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        )
        projs = self.projections()
        out = {}
        for key in names:
            if self.merged and key in self._merged_dense:
                out[key] = self._merged_dense[key]
                continue
            w0 = self.base_weight(key)
            if key in projs and not self.merged:
                w0 = _plus(w0, self._dropped_delta(projs[key]), fresh=self._is_quantized(key))
            out[key] = w0
        return out

    @property
    def in_proj_weight(self):
        if not self.base_layer._qkv_same_embed_dim:
            return None
        return self.effective_weights()["in_proj_weight"]

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        b = self.base_layer
        w = self.effective_weights()
        is_batched = query.dim() == 3
        if b.batch_first and is_batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        separate = not b._qkv_same_embed_dim
        out, weights = F.multi_head_attention_forward(
            query, key, value, b.embed_dim, b.num_heads,
            None if separate else w["in_proj_weight"], b.in_proj_bias, b.bias_k, b.bias_v,
            b.add_zero_attn, b.dropout, w["out_proj.weight"], b.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=separate,
            q_proj_weight=w.get("q_proj_weight"), k_proj_weight=w.get("k_proj_weight"),
            v_proj_weight=w.get("v_proj_weight"), average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if b.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def extra_repr(self) -> str:
        parts = [n for n, on in zip(QKV, self.in_parts or ()) if on]
        return (f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:.4g}, method={self.method}, "
                f"in_parts={parts}, out_proj={self.adapt_out}")


def _plus(w0: torch.Tensor, delta: torch.Tensor, fresh: bool) -> torch.Tensor:
    """``w0 + delta`` in ``w0``'s dtype and layout. A ``fresh`` w0 (a dequantized copy that nothing
    else holds) takes the sum in place, which saves a dense weight-sized allocation per call; the
    values are the same either way (same operands, same order)."""
    delta = delta.to(w0.dtype)
    return w0.add_(delta) if fresh else w0 + delta


def _qkey(key: str) -> str:
    """ModuleDict keys cannot contain dots."""
    return key.replace(".", "__")


LORA_WRAPPERS = (_LoraState,)
"""Every wrapper family (these, and :class:`lora_tune.lora.experts.LoraExperts`) derives from _LoraState."""
