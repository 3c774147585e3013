"""The reference-checked table: layer x method x quant_bits x dtype.

For every case two adapted layers are stacked (so that gradients of the *upstream* layer pass
through a LoRA layer with B != 0), the factors are randomised, and the outputs and the
gradients w.r.t. A, B of both layers and w.r.t. the input are compared with an autograd
reference that builds W0 + s * B @ A explicitly in float64 and calls the original torch module
(tests/lora/reference.py).

The grouped-query cases put a fused projection inside a module stating its head counts, as a
transformers attention module does; the reference splits q/k/v by the sizes written in the case
table (``SPLITS``), not by anything the injector computes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_tune
from lora_tune.lora.layers import LoraMultiheadAttention

from .reference import (
    changed_by_training,
    delta_for,
    dora_weight,
    merge_round_trip,
    reference_call,
)

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

R, ALPHA = 2, 4.0


class Stack(nn.Module):
    """Two named layers with a tanh between them."""

    def __init__(self, **layers: nn.Module):
        super().__init__()
        self.names = list(layers)
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x):
        for i, name in enumerate(self.names):
            layer = getattr(self, name)
            if isinstance(layer, (nn.MultiheadAttention, LoraMultiheadAttention)):
                kv = getattr(self, "_kv", None)
                x = layer(x, x if kv is None else kv[0], x if kv is None else kv[1], need_weights=False)[0]
            else:
                x = layer(x)
            if i < len(self.names) - 1:
                x = torch.tanh(x)
        return x


class HeadCountStack(Stack):
    """A Stack that states grouped-query head counts (query heads, key/value heads, head size)."""

    def __init__(self, heads: tuple[int, int, int], **layers: nn.Module):
        super().__init__(**layers)
        self.num_heads, self.num_key_value_heads, self.head_dim = heads


# q/k/v rows of the grouped-query cases: (H*d, KV*d, KV*d)
SPLITS = {"fused_qkv_gqa_qv": (8, 2, 2), "gpt2_conv1d_gqa_k": (8, 4, 4)}


def _mha_separate(E=8):
    return nn.MultiheadAttention(E, 2, kdim=5, vdim=7, batch_first=True)


# name -> (builder of the stack, input builder, {module: (kind, extra)}, config extras)
def _cases():
    g = torch.Generator().manual_seed(0)
    return {
        "linear": (lambda: Stack(fc1=nn.Linear(6, 10), fc2=nn.Linear(10, 4)),
                   lambda: torch.randn(3, 6, generator=g), {}),
        "fused_qkv_qv": (lambda: Stack(qkv=nn.Linear(6, 12), proj=nn.Linear(12, 6)),
                         lambda: torch.randn(3, 6, generator=g), {"enable_lora": ["q", "v"]}),
        "gpt2_conv1d": (lambda: Stack(c_attn=Conv1D(15, 6), c_proj=Conv1D(4, 15)),
                        lambda: torch.randn(2, 3, 6, generator=g), {"enable_lora": ["k"]}),
        # 4 query heads, 1 key/value head of size 2: 12 rows, which equal thirds would split wrongly
        "fused_qkv_gqa_qv": (lambda: HeadCountStack((4, 1, 2), qkv_proj=nn.Linear(6, 12), o_proj=nn.Linear(12, 6)),
                             lambda: torch.randn(3, 6, generator=g), {"enable_lora": ["q", "v"]}),
        "gpt2_conv1d_gqa_k": (lambda: HeadCountStack((4, 2, 2), c_attn=Conv1D(16, 6), c_proj=Conv1D(4, 16)),
                              lambda: torch.randn(2, 3, 6, generator=g), {"enable_lora": ["k"]}),
        "embedding": (lambda: Stack(emb=nn.Embedding(11, 6, padding_idx=0), fc=nn.Linear(6, 4)),
                      lambda: torch.tensor([[0, 3, 5, 0], [10, 1, 2, 3]]), {}),
        "conv1d": (lambda: Stack(c1=nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2, padding_mode="reflect"),
                                 c2=nn.Conv1d(6, 4, 3, padding="same")),
                   lambda: torch.randn(2, 4, 17, generator=g), {}),
        "conv2d_groups": (lambda: Stack(c1=nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular"),
                                        c2=nn.Conv2d(6, 4, (1, 3), stride=(1, 2), dilation=(1, 2))),
                          lambda: torch.randn(2, 4, 7, 9, generator=g), {}),
        "conv3d": (lambda: Stack(c1=nn.Conv3d(3, 4, 2, padding=1, padding_mode="replicate"), c2=nn.Conv3d(4, 2, 1)),
                   lambda: torch.randn(1, 3, 4, 5, 4, generator=g), {}),
        "mha": (lambda: Stack(a1=nn.MultiheadAttention(8, 2, batch_first=True),
                              a2=nn.MultiheadAttention(8, 4, batch_first=False, bias=False)),
                lambda: torch.randn(3, 5, 8, generator=g), {}),
        "mha_qv_parts": (lambda: Stack(a1=nn.MultiheadAttention(8, 2, batch_first=True),
                                       a2=nn.MultiheadAttention(8, 2, batch_first=True)),
                         lambda: torch.randn(2, 4, 8, generator=g), {"enable_lora": ["q", "v"]}),
    }


def _adapted_params(model: nn.Module, name: str, wrapper: nn.Module):
    """[(key of the base weight in the original module, A name, B name, kind, parts)]; the
    sizes of fused parts come from SPLITS (equal thirds for the other cases)."""
    if isinstance(wrapper, LoraMultiheadAttention):
        out = []
        for key, proj in wrapper.projections().items():
            holder = {"in_proj_weight": "in_proj", "out_proj.weight": "out_proj", "q_proj_weight": "q_proj",
                      "k_proj_weight": "k_proj", "v_proj_weight": "v_proj"}[key]
            kind = "proj" if proj.parts else "linear"
            out.append((key, f"{name}.{holder}.lora_A", f"{name}.{holder}.lora_B", kind, proj.parts))
        return out
    base = wrapper.base_layer
    if isinstance(base, nn.Embedding):
        kind = "embedding"
    elif isinstance(base, nn.modules.conv._ConvNd):
        kind = "conv"
    elif getattr(wrapper, "parts", None):
        kind = "fused_t" if wrapper.transposed else "fused"
    elif getattr(wrapper, "transposed", False):
        kind = "gpt2"
    else:
        kind = "linear"
    return [("weight", f"{name}.lora_A", f"{name}.lora_B", kind, getattr(wrapper, "parts", None))]


def run_case(case: str, method: str, bits, dtype, seed: int = 0, use_dora: bool = False):
    """With ``use_dora`` the reference rescales each adapted weight with reference.dora_weight."""
    build, make_x, extra = _cases()[case]
    torch.manual_seed(seed)
    model = build().to(dtype)
    original = copy.deepcopy(model)
    report = lora_tune.inject(model, lora_tune.LoraConfig(rank=R, alpha=ALPHA, targets=list(model.names),
                                                          method=method, quant_bits=bits, use_dora=use_dora,
                                                          **extra))
    assert [n for n, _ in report.targets] == model.names
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=gen).to(dtype) * 0.5)
            elif n.endswith("lora_magnitude"):  # away from the norm it starts at, so that m / n != 1
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen).to(dtype))
    x = make_x()
    x = x.to(dtype) if x.is_floating_point() else x
    if x.is_floating_point():
        x.requires_grad_(True)
    y = model(x)
    upstream = torch.randn(y.shape, generator=gen)
    (y.float() * upstream).sum().backward()

    # the reference
    params = dict(model.named_parameters())
    leaves, weights = {}, {}
    for name in model.names:
        wrapper = getattr(model, name)
        for key, a_name, b_name, kind, parts in _adapted_params(model, name, wrapper):
            sizes = SPLITS.get(case) if kind in ("fused", "fused_t") else None
            A = params[a_name].detach().double().requires_grad_(True)
            B = params[b_name].detach().double().requires_grad_(True)
            leaves[a_name], leaves[b_name] = A, B
            w0 = wrapper.base_weight(key) if isinstance(wrapper, LoraMultiheadAttention) else wrapper.base_weight()
            w0 = w0.detach().double()
            w = w0 + wrapper.scaling * delta_for(kind, A, B, w0.shape, parts, sizes)
            if use_dora:
                m_name = f"{name}.lora_magnitude"
                leaves[m_name] = M = params[m_name].detach().double().requires_grad_(True)
                w = dora_weight(kind, w, M, parts, sizes)
            weights[f"{name}.{key}"] = w
    x_ref = x.detach().double().requires_grad_(True) if x.is_floating_point() else x
    y_ref = reference_call(original, weights, (x_ref,))
    (y_ref * upstream.double()).sum().backward()
    grads = {n: (params[n].grad, leaf.grad) for n, leaf in leaves.items()}
    if x.is_floating_point():
        grads["input"] = (x.grad, x_ref.grad)
    return y, y_ref, grads, model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


CASES = list(_cases())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", [None, 8, 4], ids=["fp", "8bit", "4bit"])
@pytest.mark.parametrize("method", ["parallel", "merged"])
@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_reference(case, method, bits, dtype):
    y, y_ref, grads, _ = run_case(case, method, bits, dtype)
    # bf16 keeps 8 mantissa bits: two stacked attention layers drift by a few percent on their own,
    # while a wrong delta (missing, doubled, or on the wrong part) is off by O(1).
    out_tol, grad_tol = (1e-5, 5e-5) if dtype == torch.float32 else (5e-2, 2.5e-1)
    assert _rel(y, y_ref) < out_tol, f"output off by {_rel(y, y_ref):.2e}"
    assert grads, "no gradients compared"
    for name, (got, want) in grads.items():
        assert got is not None, f"{name} got no gradient"
        assert _rel(got, want) < grad_tol, f"gradient of {name} off by {_rel(got, want):.2e}"


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("case", CASES)
def test_parallel_equals_merged(case, bits):
    y_p, _, g_p, _ = run_case(case, "parallel", bits, torch.float32)
    y_m, _, g_m, _ = run_case(case, "merged", bits, torch.float32)
    assert _rel(y_p, y_m) < 1e-5
    for name in g_p:
        assert _rel(g_p[name][0], g_m[name][0]) < 1e-4, name


def _adapted_case(case: str, randomize: bool = True, **config):
    """(model with random nonzero factors, input builder, state_dict before inject)."""
    build, make_x, extra = _cases()[case]
    torch.manual_seed(0)
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_tune.inject(model, lora_tune.LoraConfig(rank=R, alpha=ALPHA, targets=list(model.names), **extra, **config))
    if randomize:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("lora_A", "lora_B")):
                    p.normal_()
    return model, make_x, before


@pytest.mark.parametrize("method", ["parallel", "merged"])
@pytest.mark.parametrize("case", CASES)
def test_merge_forward_and_unmerge_restores_bits(case, method):
    model, make_x, before = _adapted_case(case, method=method)
    model.eval()
    x = make_x()
    y, y_merged, y_again = merge_round_trip(model, x)
    assert _rel(y_merged, y) < 1e-5
    assert torch.equal(y_again, y)
    for key, value in before.items():
        wrapped_key = _wrapped_key(model, key)
        assert torch.equal(model.state_dict()[wrapped_key], value), f"{key} not restored bit for bit"


def _wrapped_key(model: nn.Module, key: str) -> str:
    head, _, rest = key.partition(".")
    return f"{head}.base_layer.{rest}"


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("case", CASES)
def test_merge_and_unload_gives_plain_layers_with_same_outputs(case, bits):
    model, make_x, _ = _adapted_case(case, quant_bits=bits)
    model.eval()
    x = make_x()
    with torch.no_grad():
        y = model(x)
        plain = lora_tune.merge_and_unload(model)
        y_plain = plain(x)
    assert not list(lora_tune.lora_layers(plain))
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert _rel(y_plain, y) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_frozen_weights_unchanged_after_optimizer_steps(case):
    model, make_x, _ = _adapted_case(case, randomize=False)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(n.endswith(("lora_A", "lora_B")) for n in lora)
    changed = changed_by_training(model, make_x, all_params=True, weight_decay=0.1)
    assert not [n for n in frozen if changed[n]], "frozen weights changed"
    assert any(changed[n] for n in lora)
