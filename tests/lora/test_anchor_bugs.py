"""One regression test per bug found in the existing injectors (loralib, LoRA-Torch, PEFT)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_tune
from lora_tune.lora.layers import LoraMultiheadAttention

from .reference import delta_for, reference_call


def _randomize(model: nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def test_loratorch_inplace_merge_breaks_upstream_gradients():
    """LoRA-Torch edits the merged weight in place after autograd saved it, so the gradient of
    an upstream LoRA layer is wrong once B != 0. Ours (method='merged') must match autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).double()
    base = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    lora_tune.inject(model, lora_tune.LoraConfig(rank=4, alpha=8, targets=["0", "2"], method="merged"))
    _randomize(model)
    x = torch.randn(5, 16, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    A0, B0, A2, B2 = (getattr(model[i], n).detach().clone().requires_grad_(True)
                      for i in (0, 2) for n in ("lora_A", "lora_B"))
    s = model[0].scaling
    h = torch.tanh(F.linear(x, base[0] + s * B0 @ A0, model[0].base_layer.bias))
    F.linear(h, base[1] + s * B2 @ A2, model[2].base_layer.bias).pow(2).sum().backward()
    assert torch.allclose(model[0].lora_A.grad, A0.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(model[0].lora_B.grad, B0.grad, rtol=1e-10, atol=1e-12)
    # and a second step still agrees (no stale saved tensors)
    model.zero_grad()
    model(x).pow(2).sum().backward()
    assert torch.allclose(model[0].lora_A.grad, A0.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["parallel", "merged"])
def test_loratorch_enable_lora_qv_leaves_k_unchanged(method):
    """LoRA-Torch's enable_lora=['q','v'] on a fused qkv still changes k."""
    torch.manual_seed(0)
    qkv = nn.Linear(12, 36)
    model = nn.ModuleDict({"qkv": qkv})
    x = torch.randn(4, 12)
    base_out = qkv(x).detach()
    lora_tune.inject(model, lora_tune.LoraConfig(rank=2, targets=["qkv"], enable_lora=["q", "v"], method=method))
    _randomize(model)
    out = model["qkv"](x)
    q, k, v = out.split(12, dim=-1)
    bq, bk, bv = base_out.split(12, dim=-1)
    assert torch.equal(k, bk), "k changed although only q and v are enabled"
    assert not torch.allclose(q, bq) and not torch.allclose(v, bv)
    out.sum().backward()
    assert model["qkv"].lora_A.shape == (2 * 2, 12)   # one rank-2 pair per enabled part
    assert model["qkv"].lora_B.shape == (2 * 12, 2)
    delta = model["qkv"].delta_weight()
    assert torch.count_nonzero(delta[12:24]) == 0


@pytest.mark.parametrize("method", ["parallel", "merged"])
def test_peft_mha_out_proj_delta_applied_once(method):
    """PEFT 0.21.2 applies the out_proj delta of nn.MultiheadAttention twice (W + 2 delta)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    holder = nn.ModuleDict({"attn": mha})
    original = {k: v.detach().clone() for k, v in mha.state_dict().items()}
    lora_tune.inject(holder, lora_tune.LoraConfig(rank=2, alpha=2, targets=["attn[o]"], method=method))
    wrapper = holder["attn"]
    assert isinstance(wrapper, LoraMultiheadAttention) and wrapper.in_parts is None
    _randomize(holder)
    x = torch.randn(2, 5, 8)
    got = wrapper(x, x, x, need_weights=False)[0]
    d = wrapper.scaling * (wrapper.out_proj.lora_B @ wrapper.out_proj.lora_A)
    once = reference_call(mha, {"out_proj.weight": original["out_proj.weight"].double() + d.double()},
                          (x.double(),) * 3, {"need_weights": False})[0]
    twice = reference_call(mha, {"out_proj.weight": original["out_proj.weight"].double() + 2 * d.double()},
                           (x.double(),) * 3, {"need_weights": False})[0]
    assert torch.allclose(got.double(), once, atol=1e-5)
    assert not torch.allclose(got.double(), twice, atol=1e-3)


def test_peft_mha_out_proj_targeted_through_child_name_is_not_a_silent_no_op():
    """Wrapping `attn.out_proj` as a Linear does nothing (MHA reads its weight directly); we
    fold such a target into the attention wrapper instead."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
    report = lora_tune.inject(layer, lora_tune.LoraConfig(rank=2, targets=["self_attn.out_proj"]))
    assert report.targets == [("self_attn", "MultiheadAttention")]
    assert layer.self_attn.adapt_out and layer.self_attn.in_parts is None
    _randomize(layer)
    x = torch.randn(2, 3, 16)
    before = layer(x)
    with torch.no_grad():
        layer.self_attn.out_proj.lora_B.zero_()
    assert not torch.allclose(before, layer(x))


def test_peft_mha_gradients_match_finite_differences():
    """PEFT's MultiheadAttention LoRA gradients disagree with finite differences (rel. err ~0.4)."""
    torch.manual_seed(0)
    holder = nn.ModuleDict({"attn": nn.MultiheadAttention(6, 2, batch_first=True, dropout=0.0)}).double()
    lora_tune.inject(holder, lora_tune.LoraConfig(rank=2, targets=["attn"]))
    _randomize(holder)
    attn = holder["attn"]
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    named = [(n, p) for n, p in attn.named_parameters() if p.requires_grad]
    assert [n for n, _ in named] == ["in_proj.lora_A", "in_proj.lora_B", "out_proj.lora_A", "out_proj.lora_B"]
    params = [p for _, p in named]

    def f(*ps):
        return torch.func.functional_call(attn, dict(zip([n for n, _ in named], ps)), (x, x, x),
                                          {"need_weights": False})[0]

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["parallel", "merged"])
def test_peft_conv_keeps_dilation_and_padding_mode(method):
    """PEFT drops Conv dilation / padding_mode on its LoRA branch."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="reflect")
    holder = nn.ModuleDict({"conv": conv})
    w0 = conv.weight.detach().clone()
    lora_tune.inject(holder, lora_tune.LoraConfig(rank=2, targets=["conv"], method=method))
    _randomize(holder)
    x = torch.randn(2, 3, 9, 9)
    wrapper = holder["conv"]
    got = wrapper(x)
    d = delta_for("conv", wrapper.lora_A, wrapper.lora_B, w0.shape)
    want = reference_call(conv, {"weight": w0.double() + wrapper.scaling * d.double()}, (x.double(),))
    assert got.shape == want.shape == (2, 4, 9, 9)
    assert torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.parametrize("method", ["parallel", "merged"])
@pytest.mark.parametrize("groups", [2, 4])
def test_peft_conv_groups(method, groups):
    """PEFT has problems with conv groups: our delta has the grouped kernel's shape."""
    torch.manual_seed(0)
    conv = nn.Conv1d(8, 8, 3, padding=1, groups=groups)
    holder = nn.ModuleDict({"conv": conv})
    w0 = conv.weight.detach().clone()
    lora_tune.inject(holder, lora_tune.LoraConfig(rank=2, targets=["conv"], method=method))
    wrapper = holder["conv"]
    assert wrapper.lora_A.shape == (2, 8 // groups, 3)
    _randomize(holder)
    x = torch.randn(2, 8, 10)
    d = delta_for("conv", wrapper.lora_A, wrapper.lora_B, w0.shape)
    want = reference_call(conv, {"weight": w0.double() + wrapper.scaling * d.double()}, (x.double(),))
    assert torch.allclose(wrapper(x).double(), want, atol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv1d(3, 5, 3), nn.Conv3d(3, 5, 3)], ids=["conv1d", "conv3d"])
@pytest.mark.parametrize("method", ["parallel", "merged"])
def test_loralib_conv1d_conv3d_crash_on_first_forward(conv, method):
    """loralib's Conv1d/Conv3d crash on the first forward."""
    holder = nn.ModuleDict({"conv": conv})
    lora_tune.inject(holder, lora_tune.LoraConfig(rank=2, targets=["conv"], method=method))
    x = torch.randn(2, 3, *([6] * (conv.weight.dim() - 2)))
    y = holder["conv"](x)
    assert y.shape[:2] == (2, 5)
    y.sum().backward()
    assert holder["conv"].lora_B.grad is not None
