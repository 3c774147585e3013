"""nn.MultiheadAttention with LoRA on its projections (packed or separate in_proj, out_proj)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from lora_tune.lora.adapter_base import QKV, TargetSpec, _LoraState, _plus, _qkey, active_factor
from lora_tune.lora.fused import checked_sizes, enabled_sizes, given_sizes, parts_matrix
from lora_tune.lora.quant import QuantizedWeight


class LoraProjection(nn.Module):
    """The low-rank pair of one projection inside nn.MultiheadAttention (in_proj, q/k/v, out)."""

    def __init__(self, out_features: int, in_features: int, r: int, like: torch.Tensor,
                 parts: Sequence[bool] | None = None):
        super().__init__()
        self.r = r
        self.parts = tuple(parts) if parts is not None else None
        self.part_sizes = checked_sizes(out_features, self.parts, None)  # the packed in_proj is 3 x embed_dim
        n = sum(self.parts) if self.parts else 1
        rows = sum(enabled_sizes(self.parts, given_sizes(self.part_sizes))) if self.parts else out_features
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

    KINDS = ("mha",)
    base_layer: nn.MultiheadAttention
    base_weight_q: nn.ModuleDict

    @classmethod
    def kind_of(cls, module: nn.Module) -> str | None:
        return "mha" if isinstance(module, nn.MultiheadAttention) else None

    @classmethod
    def for_target(cls, target: TargetSpec, r: int, alpha: float, **kw) -> LoraMultiheadAttention:
        parts = target.parts or ("q", "k", "v", "o")
        return cls(cast(nn.MultiheadAttention, target.module), r, alpha, in_parts=tuple(p in parts for p in QKV),
                   adapt_out="o" in parts, **kw)

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

    @property
    def adapted_parts(self) -> tuple[str, ...]:
        return tuple(p for p, on in zip(QKV, self.in_parts or ()) if on) + (("o",) if self.adapt_out else ())

    @property
    def max_useful_rank(self) -> int:
        return self.base_layer.embed_dim

    # name of each adapted base weight -> its LoraProjection
    def projections(self) -> dict[str, LoraProjection]:
        out: dict[str, LoraProjection] = {}
        if self.in_parts is not None:
            if "in_proj" in self._modules:
                out["in_proj_weight"] = self.in_proj
            else:
                for name, on in zip(QKV, self.in_parts):
                    if on:
                        out[f"{name}_proj_weight"] = cast(LoraProjection, self._modules[f"{name}_proj"])
        if self.adapt_out:
            out["out_proj.weight"] = self.out_proj
        return out

    pairs = projections

    def base_weight(self, key: str) -> torch.Tensor:
        qkey = _qkey(key)
        if qkey in self.base_weight_q:
            return cast(QuantizedWeight, self.base_weight_q[qkey]).dequantize()
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
