"""Edge cases found in review: dropout on fused layers, repeated inject, tied and aliased
weights, dtype moves after merge, sparse embeddings, out_proj exclusion, selectors, typos."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_tune
from lora_tune import ConfigError, LoraConfig, NoMatchingModulesError

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))


@pytest.mark.parametrize("layer", [lambda: Conv1D(24, 8), lambda: nn.Linear(8, 24)], ids=["gpt2", "linear"])
@pytest.mark.parametrize("parts", [None, ["k"], ["q", "v"]])
def test_fused_qkv_merged_with_dropout_trains(layer, parts):
    m = nn.Sequential()
    m.add_module("c_attn", layer())
    lora_tune.inject(m, LoraConfig(rank=2, targets=["c_attn"], method="merged", dropout=0.5, enable_lora=parts))
    _randomize(m)
    m.train()
    m(torch.randn(3, 8)).sum().backward()
    assert m.c_attn.lora_A.grad is not None
    m.eval()  # no dropout in eval: merged equals the explicit delta
    x = torch.randn(3, 8)
    w = m.c_attn.base_weight() + m.c_attn.delta_weight()
    want = x @ w + m.c_attn.base_layer.bias if isinstance(m.c_attn.base_layer, Conv1D) else nn.functional.linear(
        x, w, m.c_attn.base_layer.bias)
    assert torch.allclose(m(x), want, atol=1e-5)


def test_second_inject_keeps_the_first_adapter_trainable():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    lora_tune.inject(m, LoraConfig(targets=["0"]))
    lora_tune.inject(m, LoraConfig(targets=["1"]))
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "0.lora_B", "1.lora_A", "1.lora_B"]


def _tied_gpt2():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_merge_of_a_tied_weight_leaves_the_other_module_alone():
    g = _tied_gpt2()
    assert g.lm_head.weight is g.transformer.wte.weight
    lora_tune.inject(g, LoraConfig(rank=2, targets="embeddings"))
    _randomize(g)
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        y = g(ids).logits
        lora_tune.merge(g)
        y_merged = g(ids).logits
        lora_tune.unmerge(g)
        y_back = g(ids).logits
    assert torch.allclose(y_merged, y, atol=1e-4)
    assert torch.equal(y_back, y)


def test_pissa_on_a_tied_weight_is_refused_and_model_untouched():
    g = _tied_gpt2()
    before = g.transformer.wte.weight.clone()
    with pytest.raises(ConfigError, match="tied"):
        lora_tune.inject(g, LoraConfig(rank=2, targets=["transformer.wte"], init="pissa"))
    assert torch.equal(g.transformer.wte.weight, before) and not list(lora_tune.lora_layers(g))


class _Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = self.a

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("bits", [None, 4])
def test_module_registered_under_two_names_is_wrapped_at_both(bits):
    m = _Aliased()
    lora_tune.inject(m, LoraConfig(rank=2, targets=["a"], quant_bits=bits))
    assert m.a is m.b and isinstance(m.b, lora_tune.lora.layers.LoraLinear)
    _randomize(m)
    x = torch.randn(2, 64)
    w = m.a.base_weight() + m.a.delta_weight()
    bias = m.a.base_layer.bias
    want = nn.functional.linear(nn.functional.linear(x, w, bias), w, bias)
    assert torch.allclose(m(x), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits", [None, 4])
def test_merged_model_follows_dtype_moves(bits):
    m = nn.Sequential(nn.Linear(64, 64))
    lora_tune.inject(m, LoraConfig(targets=["0"], quant_bits=bits))
    _randomize(m)
    lora_tune.merge(m)
    m.to(torch.bfloat16)
    assert m(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    lora_tune.unmerge(m)
    assert m(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_sparse_embedding_with_merged_method_backpropagates():
    m = nn.Sequential(nn.Embedding(10, 4, sparse=True))
    lora_tune.inject(m, LoraConfig(rank=2, targets=["0"], method="merged"))
    _randomize(m)
    m(torch.tensor([[1, 2, 3]])).sum().backward()
    assert m[0].lora_B.grad is not None


def test_embedding_scale_grad_by_freq_gradients_agree_between_methods():
    grads = {}
    for meth in ("parallel", "merged"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True))
        lora_tune.inject(m, LoraConfig(rank=2, targets=["0"], method=meth))
        _randomize(m)
        m(torch.tensor([[1, 1, 1, 2, 5]])).pow(2).sum().backward()
        grads[meth] = m[0].lora_B.grad.clone()
    assert torch.allclose(grads["parallel"], grads["merged"], atol=1e-5)


@pytest.mark.parametrize("exclude", [["self_attn.out_proj"], ["out_proj"]])
def test_excluding_out_proj_of_attention(exclude):
    layer = nn.TransformerEncoderLayer(16, 2, 32)
    lora_tune.inject(layer, LoraConfig(rank=2, targets=["self_attn"], exclude=exclude))
    assert not layer.self_attn.adapt_out and layer.self_attn.in_parts == (True, True, True)


def test_part_selector_on_a_plain_linear_is_an_error():
    m = nn.Sequential()
    m.add_module("fc1", nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="part selectors"):
        lora_tune.find_targets(m, LoraConfig(targets=["fc1[q]"]))


def test_a_pattern_matching_nothing_is_an_error_even_next_to_a_good_one():
    m = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(NoMatchingModulesError, match="tyop"):
        lora_tune.inject(m, LoraConfig(targets=["0", "tyop"]))
    assert not list(lora_tune.lora_layers(m))


def test_pissa_with_rank_above_layer_size_warns_and_keeps_outputs():
    m = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(3, 4)
    before = m(x).detach()
    with pytest.warns(UserWarning, match="rank 8"):
        lora_tune.inject(m, LoraConfig(rank=8, targets=["0"], init="pissa"))
    assert torch.allclose(m(x), before, atol=1e-5)


def test_float64_model_with_4bit_base():
    m = nn.Sequential(nn.Linear(64, 64)).double()
    lora_tune.inject(m, LoraConfig(targets=["0"], quant_bits=4))
    assert m(torch.randn(2, 64, dtype=torch.float64)).dtype == torch.float64


def test_mlp_output_named_fc_out_is_not_taken_for_a_head():
    m = nn.Module()
    m.mlp = nn.Module()
    m.mlp.fc_in = nn.Linear(8, 16)
    m.mlp.fc_out = nn.Linear(16, 8)
    m.lm_head = nn.Linear(8, 20)
    presets = lora_tune.target_presets(m)
    assert presets["mlp"] == ["mlp.fc_in", "mlp.fc_out"] and "lm_head" not in presets["all-linear"]
