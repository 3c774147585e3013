"""LoRA on mixture-of-experts weight stacks (transformers 5's ``MixtralExperts``,
``Qwen2MoeExperts``, ...): 3-D parameters of shape experts x out x in, not nn.Linear layers.

A module holds expert stacks when it states ``num_experts`` (or ``num_local_experts``) and has
3-D floating-point parameters whose first dimension is that count: ``gate_up_proj`` and
``down_proj`` in transformers 5. Its ``is_transposed`` attribute (transformers' experts
interface) gives the layout: False (the default) is experts x out x in, True experts x in x out.
Only the layer knows its layout, so only :class:`LoraExperts` reads it.

**One rank-r pair per expert.** Each adapted stack has ``lora_A`` (experts x r x in) and
``lora_B`` (experts x out x r); expert e computes with ``W0[e] + s * B[e] @ A[e]``. This is
what PEFT's ``target_parameters`` trains (its ParamWrapper holds the same E pairs flattened), so
adapters move between the two both ways; each expert sees its own tokens and is its own
function, so independent pairs are the faithful low-rank update of the stack. A shared A with
per-expert B (as in HydraLoRA / MoLA-style variants) saves (E - 1) * r * in parameters per
stack but ties the experts' input subspaces together and has no PEFT counterpart.

**Both methods compute the same thing.** An expert forward is not linear in the stack (act(gate)
* up), and transformers dispatches it to eager / batched / grouped matmul kernels that read the
stack as a whole, so, as for nn.MultiheadAttention, both ``parallel`` and ``merged`` rebuild
``W0 + s * B @ A`` out of place and call the module's own forward with it
(``torch.func.functional_call``): the branch form of LoRA applied inside every expert, which
PEFT does too. Dropout, where asked for, drops entries of A. The router is never adapted.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lora_tune.lora.adapter_base import FactorPair, TargetSpec, _LoraState, _plus, pissa_factors
from lora_tune.lora.quant import QuantizedWeight

_COUNT_ATTRS = ("num_experts", "num_local_experts")
_NOT_EXPERTS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.MultiheadAttention)


def num_experts(module: nn.Module) -> int | None:
    for attr in _COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def expert_parameters(module: nn.Module) -> list[str]:
    """Names of the expert weight stacks ``module`` holds itself, in its parameter order ([] for
    any other module)."""
    if isinstance(module, (*_NOT_EXPERTS, LoraExperts)):
        return []
    n = num_experts(module)
    if n is None:
        return []
    return [name for name, p in module.named_parameters(recurse=False)
            if p.dim() == 3 and p.is_floating_point() and p.shape[0] == n]


def stack_dims(module: nn.Module, param: str) -> tuple[int, int, int]:
    """(experts, out, in) of an expert stack, read with the module's own layout."""
    e, a, b = getattr(module, param).shape
    return (e, b, a) if getattr(module, "is_transposed", False) else (e, a, b)


class ExpertPairs(nn.Module):
    """The rank-r pairs of one expert stack: ``lora_A`` (E x r x in), ``lora_B`` (E x out x r)."""

    def __init__(self, experts: int, out_features: int, in_features: int, r: int, like: torch.Tensor):
        super().__init__()
        self.r = r
        self.lora_A = nn.Parameter(like.new_zeros(experts, r, in_features))
        self.lora_B = nn.Parameter(like.new_zeros(experts, out_features, r))

    def matrix(self, A: torch.Tensor | None = None) -> torch.Tensor:
        """B[e] @ A[e] for every expert (E x out x in), a fresh tensor."""
        return torch.bmm(self.lora_B, self.lora_A if A is None else A)


class LoraExperts(_LoraState):
    """An experts module with LoRA on some of its weight stacks (``params``). The pairs are
    registered under the stacks' names (``experts.gate_up_proj.lora_A``); everything else is
    read from the base module. Expert stacks are found by parameter (:func:`expert_parameters`),
    not by module type: ``kind_of`` recognises no torch layer."""

    KINDS = ("experts",)
    base_weight_q: nn.ModuleDict

    @classmethod
    def for_target(cls, target: TargetSpec, r: int, alpha: float, **kw) -> LoraExperts:
        assert target.parts is not None, "an experts target names its stacks"
        return cls(target.module, r, alpha, params=target.parts, **kw)

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, *, params: Sequence[str],
                 rslora: bool = False, dropout: float = 0.0, method: str = "parallel"):
        super().__init__(base_layer, r, alpha, rslora, dropout, method)
        self.transposed = bool(getattr(base_layer, "is_transposed", False))
        self.params = tuple(params)
        self.base_weight_q = nn.ModuleDict()
        self._shapes = {p: tuple(getattr(base_layer, p).shape) for p in self.params}
        for p in self.params:
            if p in self.__dict__ or p in ("base_layer", "base_weight_q"):
                raise ValueError(f"expert stack {p!r} clashes with an attribute of the LoRA wrapper")
            e, out_f, in_f = stack_dims(base_layer, p)
            self._modules[p] = ExpertPairs(e, out_f, in_f, r, getattr(base_layer, p))  # add_module would see the base's

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "base_layer" in modules:
                return getattr(modules["base_layer"], name)
            raise

    # -- what _LoraState needs --------------------------------------------------------------
    @property
    def adapted_parts(self) -> tuple[str, ...]:
        return self.params

    @property
    def max_useful_rank(self) -> int:
        return min(min(p.lora_A.shape[-1], p.lora_B.shape[-2]) for p in self.pairs().values())

    def pairs(self) -> dict[str, ExpertPairs]:
        """Name of each adapted stack -> its pairs."""
        return {p: cast(ExpertPairs, self._modules[p]) for p in self.params}

    def _fan_in(self, A: torch.Tensor) -> int:
        return A.shape[-1]  # A is experts x r x in

    def _to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The stack as experts x out x in, whatever its layout."""
        return weight.transpose(1, 2) if self.transposed else weight

    def _to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return self._to_matrix(matrix)  # a transpose is its own inverse

    @torch.no_grad()
    def _pissa_init(self, key: str, pairs: FactorPair) -> torch.Tensor:
        """PiSSA on each expert's matrix; the stack keeps the residuals."""
        A, B = pairs.lora_A, pairs.lora_B
        w0 = self._base_param(key)
        matrices = self._to_matrix(w0)
        residual = matrices.to(torch.promote_types(w0.dtype, torch.float32)).clone()
        for e in range(matrices.shape[0]):
            a, b = pissa_factors(matrices[e], self.r, self.scaling)
            A[e].copy_(a.to(A.dtype))
            B[e].copy_(b.to(B.dtype))
            residual[e] -= self.scaling * (B[e].to(a.dtype) @ A[e].to(a.dtype))
        return self._to_weight(residual).to(w0.dtype).contiguous()

    # -- weights ------------------------------------------------------------------------------
    def quantize(self, key: str, weight: torch.Tensor, bits: int, quant_type: str,
                 double_quant: bool) -> QuantizedWeight:
        """The frozen stack ``key`` quantized as (experts*rows) x columns, so 8-bit gets one scale
        per row of every expert (not one per expert)."""
        return QuantizedWeight(weight.reshape(-1, weight.shape[-1]), bits, quant_type, double_quant)

    def base_weight(self, key: str) -> torch.Tensor:
        if key in self.base_weight_q:
            return cast(QuantizedWeight, self.base_weight_q[key]).dequantize().reshape(self._shapes[key])
        return self._base_param(key)

    def delta_weight(self, key: str) -> torch.Tensor:
        return self._to_weight(self.pairs()[key].matrix().mul_(self.scaling))

    def _dropped_delta(self, key: str) -> torch.Tensor:
        pairs = self.pairs()[key]
        if not (self.training and self.dropout_p > 0):
            return self.delta_weight(key)
        return self._to_weight(pairs.matrix(F.dropout(pairs.lora_A, self.dropout_p, True)).mul_(self.scaling))

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """The stacks the base forward must use instead of its own parameters."""
        out = {}
        for key in self.params:
            if self.merged:
                if key in self._merged_dense:
                    out[key] = self._merged_dense[key]
                continue  # merged in place: the base parameter holds W0 + delta
            out[key] = _plus(self.base_weight(key), self._dropped_delta(key), fresh=self._is_quantized(key))
        return out

    def forward(self, *args, **kwargs):
        weights = self.effective_weights()
        if not weights:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, weights, args, kwargs, tie_weights=False, strict=False)

    def extra_repr(self) -> str:
        bits = {k: q.bits for k, q in self.base_weight_q.items()}
        return (f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:.4g}, method={self.method}, "
                f"params={list(self.params)}" + (f", bits={bits}" if bits else ""))
