"""DoRA (``LoraConfig(use_dora=True)``) against the float64 autograd reference of test_layers.py:
the reference builds ``m * W / ||W||`` (norm detached) from ``W = W0 + s * B @ A`` itself
(tests/lora/reference.py: dora_weight) and calls the original torch module. Same table as LoRA:
layer x method x quant_bits x dtype, the magnitude's gradient compared too; then merge / unmerge /
merge_and_unload, the start at the base model, dropout, the adapter format and bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_tune
from lora_tune import ConfigError, LoraConfig, inject, load_adapter, save_adapter
from lora_tune.lora.inject import lora_layers

from .reference import changed_by_training, merge_round_trip
from .test_layers import (
    ALPHA,
    CASES,
    R,
    Stack,
    _adapted_case,
    _cases,
    _rel,
    _wrapped_key,
    run_case,
)

pytest.importorskip("bitsandbytes")

DORA_CASES = [c for c in CASES if not c.startswith("mha")]  # nn.MultiheadAttention has no DoRA


def _randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif n.endswith("lora_magnitude"):
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", [None, 8, 4], ids=["fp", "8bit", "4bit"])
@pytest.mark.parametrize("method", ["parallel", "merged"])
@pytest.mark.parametrize("case", DORA_CASES)
def test_outputs_and_gradients_match_reference(case, method, bits, dtype):
    y, y_ref, grads, _ = run_case(case, method, bits, dtype, use_dora=True)
    out_tol, grad_tol = (1e-5, 5e-5) if dtype == torch.float32 else (5e-2, 2.5e-1)
    assert _rel(y, y_ref) < out_tol, f"output off by {_rel(y, y_ref):.2e}"
    magnitudes = [n for n in grads if n.endswith("lora_magnitude")]
    assert len(magnitudes) == 2, grads.keys()
    for name, (got, want) in grads.items():
        assert got is not None, f"{name} got no gradient"
        assert _rel(got, want) < grad_tol, f"gradient of {name} off by {_rel(got, want):.2e}"


@pytest.mark.parametrize("case", DORA_CASES)
def test_dora_changes_what_lora_computes(case):
    """The reference table would pass vacuously if the magnitude did nothing."""
    y_dora, _, _, _ = run_case(case, "parallel", None, torch.float32, use_dora=True)
    y_lora, _, _, _ = run_case(case, "parallel", None, torch.float32)
    assert _rel(y_dora, y_lora) > 1e-3


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("case", DORA_CASES)
def test_parallel_equals_merged(case, bits):
    y_p, _, g_p, _ = run_case(case, "parallel", bits, torch.float32, use_dora=True)
    y_m, _, g_m, _ = run_case(case, "merged", bits, torch.float32, use_dora=True)
    assert _rel(y_p, y_m) < 1e-5
    for name in g_p:
        assert _rel(g_p[name][0], g_m[name][0]) < 1e-4, name


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("init", ["kaiming", "pissa"])
@pytest.mark.parametrize("case", DORA_CASES)
def test_starts_at_the_base_model(case, bits, init):
    """m starts at ||W0 + s*B@A|| of the weight the layer computes with (dequantized, PiSSA residual)."""
    build, make_x, extra = _cases()[case]
    torch.manual_seed(0)
    x = make_x()
    plain, dora = build(), build()
    dora.load_state_dict(plain.state_dict())
    cfg = dict(rank=R, alpha=ALPHA, targets=list(plain.names), quant_bits=bits, init=init, **extra)
    inject(plain, LoraConfig(**cfg))
    inject(dora, LoraConfig(**cfg, use_dora=True))
    with torch.no_grad():
        assert _rel(dora(x), plain(x)) < 1e-6


@pytest.mark.parametrize("method", ["parallel", "merged"])
@pytest.mark.parametrize("case", DORA_CASES)
def test_merge_forward_and_unmerge_restores_bits(case, method):
    model, make_x, before = _adapted_case(case, randomize=False, method=method, use_dora=True)
    _randomize(model)
    model.eval()
    x = make_x()
    y, y_merged, y_again = merge_round_trip(model, x)
    assert _rel(y_merged, y) < 1e-5
    assert torch.equal(y_again, y)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[_wrapped_key(model, key)], value), f"{key} not restored bit for bit"


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("case", DORA_CASES)
def test_merge_and_unload_gives_plain_layers_with_same_outputs(case, bits):
    model, make_x, _ = _adapted_case(case, randomize=False, quant_bits=bits, use_dora=True)
    _randomize(model)
    model.eval()
    x = make_x()
    with torch.no_grad():
        y = model(x)
        plain = lora_tune.merge_and_unload(model)
        y_plain = plain(x)
    assert not list(lora_layers(plain))
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert _rel(y_plain, y) < 1e-5


@pytest.mark.parametrize("case", DORA_CASES)
def test_magnitude_trains_and_frozen_weights_stay(case):
    model, make_x, _ = _adapted_case(case, randomize=False, use_dora=True)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    magnitudes = [n for n, _ in model.named_parameters() if n.endswith("lora_magnitude")]
    assert len(magnitudes) == 2 and all(p.requires_grad for n, p in model.named_parameters() if n in magnitudes)
    changed = changed_by_training(model, make_x)
    assert not [n for n in frozen if changed[n]], "frozen weights changed"
    assert all(changed[n] for n in magnitudes), "a magnitude did not train"


def test_fused_parts_not_adapted_keep_their_rows():
    """c_attn[q,v]: a magnitude for the q and v rows only; the k rows are W0's, untouched by training."""
    model, make_x, _ = _adapted_case("fused_qkv_qv", randomize=False, use_dora=True)
    _randomize(model)
    layer = model.qkv
    assert layer.lora_magnitude.shape == (8,)  # 4 q rows + 4 v rows of 12
    x = make_x()
    with torch.no_grad():
        k_rows = layer(x)[:, 4:8]
        base = layer.base_layer(x)[:, 4:8]
    torch.testing.assert_close(k_rows, base, rtol=0, atol=0)


def test_dropout_uses_peft_form_in_training_and_is_off_in_eval():
    """Training with dropout: base(x) + (m/n - 1) * W0 drop(x) + m/n * s*B A drop(x), one mask."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    model = Stack(fc=layer)
    inject(model, LoraConfig(rank=2, alpha=4.0, targets=["fc"], dropout=0.5, use_dora=True))
    _randomize(model)
    w = model.fc
    x = torch.randn(4, 6)
    torch.manual_seed(1)
    got = model.train()(x)
    torch.manual_seed(1)
    xd = nn.functional.dropout(x, 0.5, True)
    with torch.no_grad():
        W = w.base_layer.weight + w.scaling * w.lora_B @ w.lora_A
        scale = w.lora_magnitude / W.norm(dim=1)
        want = w.base_layer(x) + (scale - 1) * (xd @ w.base_layer.weight.t()) + scale * w.scaling * (
            xd @ w.lora_A.t() @ w.lora_B.t())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ref = nn.functional.linear(x, scale[:, None] * W, w.base_layer.bias)
        torch.testing.assert_close(model.eval()(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_parallel_keeps_no_dense_weight_for_backward(bits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    inject(model, LoraConfig(rank=4, targets=["0", "2"], quant_bits=bits, init="gaussian", use_dora=True))
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(8, 64, requires_grad=True)).sum().backward()
    assert shapes and (256, 64) not in shapes and (64, 256) not in shapes, shapes


@pytest.mark.parametrize("case", ["linear", "fused_qkv_gqa_qv", "gpt2_conv1d", "embedding", "conv2d_groups"])
def test_lora_tune_format_saves_the_magnitude(tmp_path, case):
    model, make_x, _ = _adapted_case(case, randomize=False, use_dora=True)
    _randomize(model)
    model.eval()
    x = make_x()
    save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = _cases()[case][0]()  # the same base weights as _adapted_case's
    load_adapter(fresh, tmp_path)
    assert all(w.use_dora for _, w in lora_layers(fresh))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)


def test_adapter_with_dora_is_refused_by_a_model_injected_without(tmp_path):
    model, _, _ = _adapted_case("linear", use_dora=True)
    save_adapter(model, tmp_path)
    plain, _, _ = _adapted_case("linear", randomize=False)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(lora_tune.AdapterFormatError, match="use_dora"):
        load_adapter(plain, tmp_path)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("case", ["mha", "mha_qv_parts"])
def test_use_dora_on_multihead_attention_is_refused_and_the_model_untouched(case):
    build, _, extra = _cases()[case]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        inject(model, LoraConfig(rank=2, targets=list(model.names), use_dora=True, **extra))
    assert err.value.field == "use_dora"
    message = str(err.value)
    assert "'a1'" in message and "MultiheadAttention" in message
    assert "Linear, fused qkv, GPT-2 Conv1D, Conv1d/2d/3d and Embedding" in message
    assert not list(lora_layers(model))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


def test_use_dora_must_be_a_bool():
    with pytest.raises(ConfigError, match="use_dora: got 'yes'; allowed: true or false"):
        LoraConfig(use_dora="yes")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("method", ["parallel", "merged"])
def test_trains_under_bf16_autocast(method, bits, dropout):
    """Mixed precision (the trainer's precision: bf16): the output keeps autocast's dtype in every
    path and the magnitude, the factors and a trainable bias get gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    inject(model, LoraConfig(rank=4, targets=["0", "2"], quant_bits=bits, method=method, dropout=dropout,
                             bias="lora_only", use_dora=True))
    _randomize(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(4, 16))
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    layer = model[0]
    for p in (layer.lora_magnitude, layer.lora_A, layer.lora_B, layer.base_layer.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
