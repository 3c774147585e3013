"""A quantized base keeps only its packed weight between forward and backward (QLoRA's memory
promise): the dense dequantized copy is rebuilt in backward, with the same gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_tune import LoraConfig, inject

pytest.importorskip("bitsandbytes")


def _model(bits: int, transposed: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    inject(model, LoraConfig(rank=4, targets=["0", "2"], quant_bits=bits, init="gaussian"))
    return model


def _saved_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return shapes


@pytest.mark.parametrize("bits", [4, 8])
def test_no_dense_base_weight_is_saved_for_backward(bits):
    model = _model(bits)
    x = torch.randn(8, 64, requires_grad=True)
    shapes = _saved_shapes(model, x)
    assert (256, 64) not in shapes and (64, 256) not in shapes, shapes
    plain = model[2]  # the same layer through plain autograd keeps its dense weight
    plain._quantized_base_forward = lambda inp: plain._forward_with(inp, plain.base_weight())
    assert {(64, 256), (256, 64)} & set(_saved_shapes(model, x))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("autocast", [False, True])
def test_gradients_equal_plain_autograd_over_the_dequantized_weight(bits, autocast):
    model = _model(bits)
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().pow(2).sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for layer in (model[0], model[2]):  # plain autograd: the dense copy in the graph
        layer._quantized_base_forward = lambda inp, layer=layer: layer._forward_with(inp, layer.base_weight())
    model.zero_grad()
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref_out = model(x)
    ref_out.float().pow(2).sum().backward()
    ref = [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for a, b in zip(ours, ref):  # same ops in the same dtype: equal up to summation order
        torch.testing.assert_close(a, b, rtol=1e-5 if not autocast else 1e-2, atol=1e-6 if not autocast else 1e-2)
