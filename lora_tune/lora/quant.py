"""Frozen base weights stored in 4 or 8 bits and dequantized on the fly.

Quantization uses bitsandbytes' functional kernels (imported lazily), so the same code
serves Linear, Conv, Embedding and MultiheadAttention weights, on CPU and CUDA:

* 4 bit: ``quantize_4bit`` (NF4 or FP4, block size 64) with double quantization of the
  absmax scales by default (QLoRA: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter);
* 8 bit: LLM.int8's row-wise absmax quantization (``int8_vectorwise_quant``), one float32
  scale per output row.

Dequantized weights never require grad; gradients reach the input and the LoRA factors.

Importing bitsandbytes on a CPU with AVX512-BF16 logs a warning that the optional ``kernels``
package (a faster 4-bit matmul downloaded from the Hugging Face Hub) is missing; bitsandbytes then
uses its built-in kernels, which is all lora-tune needs (it only packs and unpacks weights). That
one notice is moved to this module's DEBUG log; every other bitsandbytes message is left alone.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_tune.errors import QuantizationError
from lora_tune.quiet import quiet_bitsandbytes

BLOCKSIZE_4BIT = 64

log = logging.getLogger(__name__)


def _bnb_functional():
    quiet_bitsandbytes()  # before the import, which is when bitsandbytes logs it
    try:
        import bitsandbytes.functional as bnbf  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QuantizationError(
            "quant_bits: 4 and 8 need bitsandbytes; install it with `pip install 'lora-tune[quant]'`"
        ) from exc
    return bnbf


class QuantizedWeight(nn.Module):
    """One frozen weight tensor kept quantized; ``dequantize()`` returns it in its original dtype."""

    # buffers (registered in __init__; ``row_scale``: 8 bit only)
    _dtype_probe: torch.Tensor
    data: torch.Tensor
    row_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, bits: int, quant_type: str = "nf4", double_quant: bool = True):
        super().__init__()
        if bits not in (4, 8):
            raise QuantizationError(f"quant_bits: got {bits!r}; allowed: 4 or 8")
        if not weight.is_floating_point():
            raise QuantizationError(f"quant_bits: cannot quantize a {weight.dtype} weight")
        bnbf = _bnb_functional()
        self.bits = bits
        self.quant_type = quant_type if bits == 4 else "int8"
        self.shape = tuple(weight.shape)
        # An empty float buffer that model.to(dtype) converts: dequantize() returns its dtype.
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=weight.dtype, device=weight.device), persistent=False)
        w = weight.detach()
        if bits == 4 and w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            w = w.float()  # bitsandbytes packs 16/32-bit floats; dequantize() casts back
        if bits == 4:
            data, state = bnbf.quantize_4bit(
                w.contiguous(), blocksize=BLOCKSIZE_4BIT, compress_statistics=double_quant, quant_type=quant_type
            )
            self.register_buffer("data", data, persistent=False)
            self._state = state
        else:
            rows = w.reshape(self.shape[0], -1)
            if rows.dtype not in (torch.float16, torch.float32):
                rows = rows.float()
            data, stats, _ = bnbf.int8_vectorwise_quant(rows.contiguous())
            self.register_buffer("data", data, persistent=False)
            self.register_buffer("row_scale", stats, persistent=False)
            self._state = None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_probe.dtype

    def _apply(self, fn, recurse=True):
        # Scales stay float32 whatever dtype the model is cast to; only the device follows.
        scale = self._buffers.get("row_scale")
        super()._apply(fn, recurse)
        if scale is not None:
            self._buffers["row_scale"] = scale.to(self.data.device)
        return self

    def dequantize(self) -> torch.Tensor:
        """The dense weight, as a new tensor on every call (callers may write into it)."""
        bnbf = _bnb_functional()
        with torch.no_grad():
            if self.bits == 4:
                state = self._state
                if state.absmax.device != self.data.device:
                    state.to(self.data.device)
                    self._state = state
                w = bnbf.dequantize_4bit(self.data, state)
            else:
                w = bnbf.int8_vectorwise_dequant(self.data, self.row_scale)
            w = w.reshape(self.shape).to(self.dtype)
        return w.detach()  # not a view made under no_grad, which autograd forbids writing into

    def storage_bytes(self) -> int:
        """Bytes this weight occupies per layer (packed data and scales; the shared code tables
        of NF4/FP4 and of the nested quantization are constants and are not counted)."""
        total = self.data.numel() * self.data.element_size()
        if self.bits == 8:
            return total + self.row_scale.numel() * self.row_scale.element_size()
        state = self._state
        total += state.absmax.numel() * state.absmax.element_size()
        if getattr(state, "nested", False):
            total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + offset
        return total

    def bits_per_parameter(self) -> float:
        numel = 1
        for d in self.shape:
            numel *= d
        return 8.0 * self.storage_bytes() / numel

    def packed_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What :meth:`from_packed` needs to rebuild this weight exactly, without quantizing again:
        the tensors (packed ``data``; 8 bit: ``row_scale``; 4 bit: bitsandbytes' ``QuantState``
        packed for safetensors under ``state.``) and JSON-able facts (bits, type, shape, dtype).
        The tensors are this weight's own (not copies); several may share the state's code table."""
        meta = {"bits": self.bits, "quant_type": self.quant_type, "shape": list(self.shape),
                "dtype": str(self.dtype).removeprefix("torch.")}
        tensors = {"data": self.data}
        if self.bits == 8:
            tensors["row_scale"] = self.row_scale
        else:
            tensors.update({f"state.{k}": v for k, v in self._state.as_dict(packed=True).items()})
        return tensors, meta

    @classmethod
    def from_packed(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    device: torch.device | str | None = None) -> QuantizedWeight:
        """The weight :meth:`packed_state` described, bit for bit (no quantization runs); on
        ``device`` (default: where ``tensors["data"]`` is). The tensors are used as given (moved
        only when on another device). QuantizationError when they do not fit ``meta``."""
        try:
            bits, shape, dtype = int(meta["bits"]), tuple(int(d) for d in meta["shape"]), getattr(torch, meta["dtype"])
            quant_type, data = str(meta["quant_type"]), tensors["data"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QuantizationError(f"packed quantized weight: bad facts {sorted(meta)} ({exc})") from None
        if bits not in (4, 8) or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise QuantizationError(f"packed quantized weight: bits {bits!r}, dtype {meta['dtype']!r}")
        numel = 1
        for d in shape:
            numel *= d
        device = torch.device(device) if device is not None else data.device
        weight = cls.__new__(cls)
        nn.Module.__init__(weight)
        weight.bits, weight.quant_type, weight.shape = bits, quant_type if bits == 4 else "int8", shape
        weight.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)
        if bits == 8:
            scale = tensors.get("row_scale")
            rows = shape[0] if shape else 0
            if (data.dtype != torch.int8 or data.numel() != numel or scale is None
                    or scale.dtype != torch.float32 or scale.numel() != rows):
                raise QuantizationError(f"packed 8-bit weight of shape {shape}: data {tuple(data.shape)} "
                                        f"{data.dtype}, row_scale {None if scale is None else tuple(scale.shape)}")
            weight.register_buffer("data", data.to(device), persistent=False)
            weight.register_buffer("row_scale", scale.to(device), persistent=False)
            weight._state = None
            return weight
        bnbf = _bnb_functional()
        state_items = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
        try:
            state = bnbf.QuantState.from_dict(state_items, device=device)
        except (KeyError, ValueError, TypeError, AssertionError, RuntimeError, AttributeError) as exc:
            raise QuantizationError(f"packed 4-bit weight of shape {shape}: bad state ({exc})") from None
        if (data.dtype != torch.uint8 or data.numel() * 2 < numel or state.quant_type != quant_type
                or state.shape != torch.Size(shape) or state.absmax.numel() * state.blocksize < numel):
            raise QuantizationError(f"packed 4-bit weight of shape {shape}: data {tuple(data.shape)} {data.dtype}, "
                                    f"state {state.quant_type} {tuple(state.shape or ())}")
        weight.register_buffer("data", data.to(device), persistent=False)
        weight._state = state
        return weight

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, type={self.quant_type}, dtype={self.dtype}"


class _QuantizedLinear(torch.autograd.Function):
    """``F.linear(x, dequantize(q), bias)`` that keeps only the quantized weight for backward
    and dequantizes it again there. Plain autograd would keep the dense copy of every layer's
    weight alive from forward to backward: for a 4-bit base that undoes most of its memory
    saving. The base weight is frozen, so only the input (and a trainable bias) get gradients."""

    @staticmethod
    def forward(ctx, x, bias, qweight, transposed):
        ctx.qweight, ctx.transposed, ctx.x_dtype = qweight, transposed, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.linear(x, _linear_layout(qweight.dequantize(), transposed), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _linear_layout(ctx.qweight.dequantize(), ctx.transposed).to(grad.dtype)
            grad_x = (grad @ weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None


def _linear_layout(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.t() if transposed else weight


def quantized_linear(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None,
                     transposed: bool = False) -> torch.Tensor:
    """A linear layer over a quantized frozen weight (``transposed``: GPT-2 ``Conv1D`` layout,
    in x out) whose backward re-dequantizes instead of keeping the dense weight."""
    return _QuantizedLinear.apply(x, bias, qweight, transposed)


def warm_up() -> None:
    """Pay bitsandbytes' one-off costs (import, first-call kernel setup: about a second on CPU)
    now, e.g. before the first trial of a study, rather than inside it."""
    w = torch.zeros(4, 64)
    for bits in (8, 4):
        QuantizedWeight(w, bits).dequantize()


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is kept quantized (QLoRA's base layer): what a base
    loaded in 4 or 8 bits holds in place of each Linear it quantizes. LoRA wraps it like a Linear
    and uses its ``qweight`` as is (nothing is quantized again per trial)."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.qweight = qweight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, quant_type: str = "nf4",
                    double_quant: bool = True) -> QuantizedLinear:
        return cls(QuantizedWeight(linear.weight, bits, quant_type, double_quant), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
