"""What every LoRA wrapper shares: rank / alpha / scaling / method / dropout, the merge state
(``_LoraState.merge`` / ``unmerge``), the initialisation of the factors (kaiming / gaussian /
PiSSA, as PEFT's ``update_layer`` dispatches to its layer's own init methods), the frozen base
weights (quantizing them, installing PiSSA's residual, unloading), and the small helpers of the
low-rank algebra. The wrappers themselves are in :mod:`lora_tune.lora.layers` (one per layer
family, and the dispatch table), :mod:`lora_tune.lora.attention` (nn.MultiheadAttention) and
:mod:`lora_tune.lora.experts`."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Protocol, cast

import torch
from torch import nn

from lora_tune.lora.config import scale_for
from lora_tune.lora.fused import part_slices
from lora_tune.lora.quant import QuantizedWeight

QKV = ("q", "k", "v")
ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_magnitude")
"""Names of the trainable adapter parameters of every wrapper (``lora_magnitude``: DoRA only)."""

ReplaceParam = Callable[[nn.Module, str, nn.Parameter | None], None]
"""``replace(owner, name, new)``: make ``new`` the parameter ``name`` of ``owner`` (None drops it)."""


def replace_parameter(owner: nn.Module, name: str, new: nn.Parameter | None) -> None:
    owner._parameters[name] = new


# -- low-rank algebra shared by every wrapper --------------------------------------------------
def active_factor(module: nn.Module, name: str, value: torch.Tensor | nn.Module) -> torch.Tensor | nn.Module:
    """Nested ranks (DyLoRA; set by :mod:`lora_tune.lora.nested`): ``lora_A`` / ``lora_B`` as the
    forward reads them. With ``module.active_rank = b`` (unset or None: the whole rank r) they
    read as their first b components: B's first b columns, and the first b rows of each of A's
    per-part blocks of r rows. Parameters, state dicts and optimizers still see the whole tensors
    (the first b components get the gradients). ``value``: the attribute ``name`` as
    ``nn.Module.__getattr__`` found it."""
    b = module.__dict__.get("active_rank")
    if b is None or name not in ("lora_A", "lora_B"):
        return value
    factor = cast(torch.Tensor, value)  # lora_A / lora_B: a Parameter
    if name == "lora_B":
        return factor[:, :b]
    n = factor.shape[0] // module.__dict__["r"]
    return factor[:b] if n == 1 else factor.unflatten(0, (n, -1))[:, :b].flatten(0, 1)


def kaiming_uniform_(A: torch.Tensor, fan_in: int) -> None:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's kaiming_uniform(a=sqrt(5)), as nn.Linear and PEFT."""
    bound = 1.0 / math.sqrt(fan_in)
    A.uniform_(-bound, bound)


def pissa_factors(matrix: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA: A, B from the top-r singular triplets so that s * B @ A equals their sum."""
    dtype = torch.promote_types(matrix.dtype, torch.float32)
    U, S, Vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    k = min(r, S.shape[0])
    root = torch.sqrt(S[:k] / scaling)
    A, B = root[:, None] * Vh[:k], U[:, :k] * root[None, :]
    if k < r:  # rank above min(in, out): extra rows of A get the standard init, B's columns stay 0
        extra = torch.empty(r - k, A.shape[1], dtype=dtype)
        kaiming_uniform_(extra, extra.shape[1])
        A = torch.cat([A, extra])
        B = torch.cat([B, torch.zeros(B.shape[0], r - k, dtype=dtype)], dim=1)
    return A, B


class TargetSpec(Protocol):
    """What a wrapper is built for (:class:`lora_tune.lora.targets.Target`)."""

    @property
    def name(self) -> str: ...

    @property
    def module(self) -> nn.Module: ...

    @property
    def kind(self) -> str: ...

    @property
    def parts(self) -> tuple[str, ...] | None: ...

    @property
    def part_sizes(self) -> tuple[int, ...] | None: ...


class FactorPair(Protocol):
    """A module holding the ``lora_A`` / ``lora_B`` of one adapted weight (what :meth:`_LoraState.pairs`
    gives): a single-weight wrapper itself, a projection of nn.MultiheadAttention, an expert stack's pairs."""

    @property
    def lora_A(self) -> torch.Tensor: ...

    @property
    def lora_B(self) -> torch.Tensor: ...


class PartedPair(FactorPair, Protocol):
    """A pair over rows that may be fused q/k/v parts (``parts``: which are adapted; None: one pair)."""

    @property
    def parts(self) -> tuple[bool, ...] | None: ...

    @property
    def part_sizes(self) -> tuple[int, ...] | None: ...


class _LoraState(nn.Module):
    """r, alpha, scaling, method, dropout and merge state shared by every wrapper.

    A wrapper adapts one or more base weights, each named by a key (``"weight"``,
    ``"in_proj_weight"``, ``"out_proj.weight"``...) and each with its pair of factors
    (:meth:`pairs`). ``merge()`` adds each delta to its weight in place, keeping a backup for a
    bit-exact ``unmerge()``; a quantized weight, or one tied to another module (``shared_base``),
    gets a dense merged copy instead.

    Each family says what it is: ``KINDS`` (the target kinds it is built for), ``kind_of(module)``
    (the kind of a torch layer it wraps, or None; see :data:`lora_tune.lora.layers.WRAPPERS`),
    ``kind`` and ``adapted_parts`` (what an adapter records), ``supports_dora``,
    ``max_useful_rank``, its weight layout (``_to_matrix`` / ``_to_weight``) and its inits.
    """

    KINDS: tuple[str, ...] = ()
    supports_dora = False
    use_dora = False
    PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
    """What PEFT calls this layer's factors in its adapter files (PEFT's LoraLayer keeps them as
    ``lora_A`` / ``lora_B`` ModuleDicts of nn.Linear or nn.Conv layers)."""
    base_weight_q: nn.ModuleDict | QuantizedWeight | None
    """The quantized base weights: a ModuleDict of QuantizedWeight by ``_qkey(key)`` (the families
    adapting several weights), or a single-weight wrapper's QuantizedWeight (None: not quantized)."""

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

    @classmethod
    def kind_of(cls, module: nn.Module) -> str | None:
        """The target kind of ``module`` if this family wraps it, else None."""
        return None

    @classmethod
    def for_target(cls, target: TargetSpec, r: int, alpha: float, **kw) -> _LoraState:
        """The wrapper around ``target.module`` (factors not initialised; see :meth:`init_lora`)."""
        return cls(target.module, r, alpha, **kw)

    @property
    def max_useful_rank(self) -> int:
        """min(in, out) of the adapted weights: a larger rank adds parameters but no expressiveness."""
        raise NotImplementedError

    @property
    def kind(self) -> str:
        return self.KINDS[0]

    @property
    def adapted_parts(self) -> tuple[str, ...] | None:
        """The parts adapted (q/k/v of fused qkv, q/k/v/o of nn.MultiheadAttention, expert stacks)."""
        return None

    # subclasses say which weights they adapt and how to read them
    def pairs(self) -> Mapping[str, FactorPair]:
        """Key of each adapted base weight -> the module holding its ``lora_A`` / ``lora_B``."""
        raise NotImplementedError

    def base_weight(self, key: str) -> torch.Tensor:
        """The frozen base weight ``key`` as the layer computes with it (dequantized if quantized)."""
        raise NotImplementedError

    def delta_weight(self, key: str) -> torch.Tensor:
        """``scaling * B @ A`` of weight ``key``, in the weight's layout."""
        raise NotImplementedError

    def _merged_weight(self, key: str) -> torch.Tensor:
        """The adapted weight ``key`` as one tensor (what merge() stores), computed from the unmerged base."""
        return _plus(self.base_weight(key), self.delta_weight(key), fresh=self._is_quantized(key))

    def _is_quantized(self, key: str) -> bool:
        return _qkey(key) in self._quantized_weights()

    def _quantized_weights(self) -> nn.ModuleDict:
        """``base_weight_q`` of a family adapting several weights (single-weight wrappers override
        the methods that read it)."""
        return cast(nn.ModuleDict, self.base_weight_q)

    def _owner(self, key: str) -> tuple[nn.Module, str]:
        """The module of the base layer holding weight ``key``, and the weight's name in it."""
        owner, _, leaf = key.rpartition(".")
        return (self.base_layer.get_submodule(owner) if owner else self.base_layer), leaf

    def _base_param(self, key: str) -> torch.Tensor:
        owner, leaf = self._owner(key)
        return getattr(owner, leaf)

    def _to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as rows of ``B @ A`` (its layout; the inverse of ``_to_weight``)."""
        return weight

    def _to_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        """A low-rank matrix laid over the base weight, in the weight's layout."""
        return matrix

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # merged copies follow .to(dtype / device) like buffers
        for store in (self._merge_backup, self._merged_dense):
            for key in store:
                store[key] = fn(store[key])
        return self

    # -- initialisation (PEFT's update_layer: reset_lora_parameters / pissa_init) ----------------
    def init_lora(self, init: str) -> dict[str, torch.Tensor]:
        """Initialise every pair by ``init`` (kaiming, gaussian, pissa). Returns the base weights
        PiSSA leaves (key -> residual); the base layer itself is not changed (see :meth:`install_base`)."""
        residuals = {}
        for key, pair in self.pairs().items():
            if init == "pissa":
                residuals[key] = self._pissa_init(key, pair)
            else:
                self._standard_init(pair, init)
        return residuals

    def _fan_in(self, A: torch.Tensor) -> int:
        return A[0].numel()

    @torch.no_grad()
    def _standard_init(self, pair: FactorPair, init: str) -> None:
        """A kaiming-uniform (bound 1/sqrt(in), as for a Linear) or gaussian (std 1/r); B = 0, so
        the adapted model starts equal to the base."""
        if init == "gaussian":
            pair.lora_A.normal_(0.0, 1.0 / self.r)
        else:
            kaiming_uniform_(pair.lora_A, self._fan_in(pair.lora_A))
        pair.lora_B.zero_()

    @torch.no_grad()
    def _pissa_init(self, key: str, pair: FactorPair) -> torch.Tensor:
        """PiSSA on the matrix view of base weight ``key``, part by part (fused qkv); returns the residual."""
        A, B = pair.lora_A, pair.lora_B
        w0 = self.base_weight(key)  # dequantized where the base layer holds it quantized
        matrix = self._to_matrix(w0)
        parted = cast(PartedPair, pair)  # the pairs of the families that keep this method (not the experts')
        parts = parted.parts or (True,)  # a fused qkv pair: its enabled parts, each PiSSA'd on its rows
        rows = part_slices(parted.part_sizes or (matrix.shape[0],))
        As, Bs = [], []
        residual = matrix.clone().to(torch.promote_types(matrix.dtype, torch.float32))
        for block in (block for block, on in zip(rows, parts) if on):
            a, b = pissa_factors(matrix[block], self.r, self.scaling)
            As.append(a)
            Bs.append(b)
            residual[block] -= self.scaling * (b.to(B.dtype).to(a.dtype) @ a.to(A.dtype).to(a.dtype))
        A.copy_(torch.cat(As).view_as(A).to(A.dtype))
        B.copy_(torch.cat(Bs).view_as(B).to(B.dtype))
        return self._to_weight(residual).to(w0.dtype)

    # -- the frozen base weights --------------------------------------------------------------------
    def quantize(self, key: str, weight: torch.Tensor, bits: int, quant_type: str,
                 double_quant: bool) -> QuantizedWeight:
        """The frozen base weight ``key`` (with the value ``weight``) quantized."""
        return QuantizedWeight(weight, bits, quant_type, double_quant)

    def _set_quantized(self, key: str, qweight: QuantizedWeight) -> None:
        self._quantized_weights()[_qkey(key)] = qweight

    def prequantized(self, key: str) -> QuantizedWeight | None:
        """The quantized weight the base layer itself holds for ``key`` (a base loaded in 4 or 8 bits:
        :class:`lora_tune.lora.quant.QuantizedLinear`), used as is and never written; None for a
        dense weight."""
        return None

    @torch.no_grad()
    def install_base(self, residuals: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight],
                     replace: ReplaceParam | None = None) -> None:
        """Install PiSSA's residuals as new parameters of the base layer (its own tensors are not
        written), and use each quantized copy in place of its weight: the base layer's dense
        parameter is dropped (one quantized already keeps its own; a residual that is quantized
        needs no parameter). What ``inject`` does when it commits; ``replace(owner, name, new)``
        changes a parameter of the base layer (``inject`` passes its undo record's, so that
        ``detach`` can put the old one back)."""
        replace = replace or replace_parameter
        for key, value in residuals.items():
            if key in quantized:
                continue
            owner, leaf = self._owner(key)
            old = cast(nn.Parameter, owner._parameters[leaf])
            replace(owner, leaf, nn.Parameter(torch.empty_like(old).copy_(value), requires_grad=old.requires_grad))
        for key, qweight in quantized.items():
            if self.prequantized(key) is None:
                owner, leaf = self._owner(key)
                replace(owner, leaf, None)
            self._set_quantized(key, qweight)

    @torch.no_grad()
    def unloaded(self) -> nn.Module:
        """The base layer holding ``W0 + delta`` (dequantized for a quantized base) as plain parameters."""
        for key in self.pairs():
            owner, leaf = self._owner(key)
            old = owner._parameters.get(leaf)
            owner._parameters[leaf] = nn.Parameter(self._unloaded_weight(key),
                                                   requires_grad=old.requires_grad if old is not None else False)
        return self.base_layer

    def _unloaded_weight(self, key: str) -> torch.Tensor:
        """``W0 + delta`` of weight ``key`` as a new dense tensor (what ``unloaded`` installs)."""
        w = self._merged_dense.get(key)
        if w is None:  # an in-place merge already holds the delta
            w = self.base_weight(key) if self.merged else self._merged_weight(key)
        return w.detach().clone()

    # -- merging ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        for key in self.pairs():
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


def requantized(qweight: QuantizedWeight, weight: torch.Tensor) -> QuantizedWeight:
    """``weight`` quantized as ``qweight`` is (bits, type, double quantization) into a new
    QuantizedWeight; ``qweight`` is not changed (PiSSA's residual over a base loaded quantized)."""
    double = bool(getattr(qweight._state, "nested", False))
    return QuantizedWeight(weight, qweight.bits, qweight.quant_type if qweight.bits == 4 else "nf4", double)


def _plus(w0: torch.Tensor, delta: torch.Tensor, fresh: bool) -> torch.Tensor:
    """``w0 + delta`` in ``w0``'s dtype and layout. A ``fresh`` w0 (a dequantized copy that nothing
    else holds) takes the sum in place, which saves a dense weight-sized allocation per call; the
    values are the same either way (same operands, same order)."""
    delta = delta.to(w0.dtype)
    return w0.add_(delta) if fresh else w0 + delta


def _qkey(key: str) -> str:
    """ModuleDict keys cannot contain dots."""
    return key.replace(".", "__")
