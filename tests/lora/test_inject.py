"""Matching, presets, the inject report, trainability and bad input."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lora_tune
from lora_tune import ConfigError, LoraConfig, NoMatchingModulesError, UnsupportedLayerError


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q_proj = nn.Linear(d, d)
        self.attn.k_proj = nn.Linear(d, d)
        self.attn.v_proj = nn.Linear(d, d)
        self.attn.o_proj = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, 2 * d)
        self.mlp.fc2 = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.lm_head = nn.Linear(16, 20)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state, types):
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items()) and [
        type(m) for m in model.modules()] == types


def test_presets_are_concrete_lists():
    presets = lora_tune.target_presets(Tiny())
    assert presets["attention-qv"] == [f"layers.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert presets["attention"] == [f"layers.{i}.attn.{p}" for i in range(2)
                                    for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    assert presets["mlp"] == [f"layers.{i}.mlp.{p}" for i in range(2) for p in ("fc1", "fc2")]
    assert "lm_head" not in presets["all-linear"] and len(presets["all-linear"]) == 12
    assert presets["embeddings"] == ["embed"] and presets["conv"] == ["conv"]


def test_presets_for_transformer_encoder_and_gpt2():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2, enable_nested_tensor=False)
    p = lora_tune.target_presets(enc)
    assert p["attention-qv"] == ["layers.0.self_attn[q,v]", "layers.1.self_attn[q,v]"]
    assert p["mlp"] == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"]
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    p = lora_tune.target_presets(gpt2)
    assert p["attention-qv"] == ["transformer.h.0.attn.c_attn[q,v]"]
    assert p["attention"] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    assert p["mlp"] == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]


@pytest.mark.parametrize("patterns, expected", [
    (["layers.0.attn.q_proj"], ["layers.0.attn.q_proj"]),
    (["q_proj"], ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]),
    ([".fc2"], ["layers.0.mlp.fc2", "layers.1.mlp.fc2"]),
    (["layers.1.*.fc*"], ["layers.1.mlp.fc1", "layers.1.mlp.fc2"]),
    (["re:layers\\.[01]\\.attn\\.(k|v)_proj"], ["layers.0.attn.k_proj", "layers.0.attn.v_proj",
                                                  "layers.1.attn.k_proj", "layers.1.attn.v_proj"]),
    (["layers.0.mlp"], ["layers.0.mlp.fc1", "layers.0.mlp.fc2"]),  # a container selects its layers
])
def test_pattern_kinds(patterns, expected):
    assert [n for n, _ in lora_tune.find_targets(Tiny(), LoraConfig(targets=patterns))] == expected


def test_exclude_and_find_targets_is_a_dry_run():
    model = Tiny()
    state, types = _state(model), [type(m) for m in model.modules()]
    found = lora_tune.find_targets(model, LoraConfig(targets="all-linear", exclude=["layers.1", ".o_proj"]))
    assert [n for n, _ in found] == ["layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.0.attn.v_proj",
                                     "layers.0.mlp.fc1", "layers.0.mlp.fc2"]
    assert _same(model, state, types)


def test_report_and_trainability():
    model = Tiny()
    report = lora_tune.inject(model, LoraConfig(rank=4, targets="attention-qv", modules_to_save=["lm_head"],
                                                bias="lora_only"))
    assert report.preset == "attention-qv"
    assert [t for _, t in report.targets] == ["Linear"] * 4
    lora = 4 * (4 * 16 + 16 * 4)
    bias = 4 * 16
    head = 16 * 20 + 20
    assert report.trainable_after == lora + bias + head
    assert report.trainable_before == sum(p.numel() for p in Tiny().parameters())
    assert report.adapter_bytes == lora * 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layers.0.attn.q_proj.base_layer.bias" in trainable
    assert "layers.0.attn.q_proj.base_layer.weight" not in trainable
    assert "lm_head.weight" in trainable and "layers.0.attn.k_proj.bias" not in trainable
    assert "attention-qv" in str(report)


def test_bias_all_and_rank_alpha_patterns():
    model = Tiny()
    lora_tune.inject(model, LoraConfig(rank=2, alpha=4, targets=["q_proj", "fc1"], bias="all",
                                       rank_pattern={"layers.1.*": 8}, alpha_pattern={"fc1": 1.0}, rslora=True))
    assert model.layers[0].attn.q_proj.r == 2 and model.layers[1].attn.q_proj.r == 8
    assert model.layers[1].attn.q_proj.scaling == pytest.approx(4 / 8 ** 0.5)
    assert model.layers[0].mlp.fc1.scaling == pytest.approx(1 / 2 ** 0.5)
    assert model.layers[0].attn.k_proj.bias.requires_grad and model.lm_head.bias.requires_grad


def test_no_match_error_repeats_patterns_and_lists_candidates():
    model = Tiny()
    state, types = _state(model), [type(m) for m in model.modules()]
    with pytest.raises(NoMatchingModulesError) as err:
        lora_tune.inject(model, LoraConfig(targets=["query", "re:nothing.*"]))
    msg = str(err.value)
    assert "query" in msg and "re:nothing.*" in msg and "layers.0.attn.q_proj" in msg
    assert isinstance(err.value, ValueError)
    assert _same(model, state, types)


def test_unknown_preset_and_unsupported_layer():
    model = Tiny()
    with pytest.raises(ConfigError, match="attention-qv"):
        lora_tune.inject(model, LoraConfig(targets="atention"))
    with pytest.raises(ConfigError, match="embeddings"):
        lora_tune.inject(nn.Sequential(nn.Linear(2, 2)), LoraConfig(targets="embeddings"))
    with pytest.raises(UnsupportedLayerError, match="LayerNorm"):
        lora_tune.inject(model, LoraConfig(targets=["layers.0.norm"]))


def test_failed_inject_leaves_model_untouched():
    """The second target fails while being built (embedding with max_norm) after the first was
    built and quantized: nothing may have changed."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Embedding(10, 8, max_norm=1.0))
    state, types = _state(model), [type(m) for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ConfigError, match="max_norm"):
        lora_tune.inject(model, LoraConfig(targets=["0", "1"], quant_bits=4, init="pissa"))
    assert _same(model, state, types)
    assert [p.requires_grad for p in model.parameters()] == grads


@pytest.mark.parametrize("step", ["for_target", "init_lora", "quantize", "init_magnitude"])
def test_a_failure_at_any_build_step_leaves_no_half_injected_model(monkeypatch, step):
    """inject builds every wrapper before it commits: the first target is fully built (PiSSA
    residual, 4-bit copy, DoRA magnitude) when the second one's build fails at ``step``; the model
    keeps its modules, weights (bit for bit), requires_grad and no recorded config."""
    from lora_tune.lora.layers import LoraConv

    model = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(8, 8, 1), nn.Linear(8, 8))
    model[2].weight.requires_grad_(False)
    state, types = _state(model), [type(m) for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]

    def boom(*args, **kwargs):
        raise RuntimeError(f"boom in {step}")

    monkeypatch.setattr(LoraConv, step, boom)
    with pytest.raises(RuntimeError, match=f"boom in {step}"):
        lora_tune.inject(model, LoraConfig(targets=["0", "1", "2"], quant_bits=4, init="pissa", use_dora=True))
    assert _same(model, state, types)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert not hasattr(model, "_lora_tune_config")
    assert all(p is not None for p in (model[0].weight, model[1].weight, model[2].weight))


def test_double_inject_is_refused_clearly():
    model = Tiny()
    lora_tune.inject(model, LoraConfig(targets=["q_proj"]))
    with pytest.raises(ConfigError, match="already carries LoRA"):
        lora_tune.inject(model, LoraConfig(targets=["layers.0.attn.q_proj"]))
    with pytest.raises(NoMatchingModulesError):  # the wrapped layers are no candidates any more
        lora_tune.inject(model, LoraConfig(targets=["re:.*q_proj"]))


def test_rank_above_min_dim_warns_naming_layer():
    model = nn.Sequential(nn.Linear(16, 4))
    with pytest.warns(UserWarning, match=r"rank 8 .* min\(in, out\) = 4 .*'0'"):
        report = lora_tune.inject(model, LoraConfig(rank=8, targets=["0"]))
    assert report.warnings


@pytest.mark.parametrize("kwargs, field", [
    ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"method": "fast"}, "method"), ({"quant_bits": 3}, "quant_bits"), ({"quant_type": "int4"}, "quant_type"),
    ({"init": "zeros"}, "init"), ({"bias": "some"}, "bias"), ({"enable_lora": ["q", "x"]}, "enable_lora"),
    ({"targets": []}, "targets"), ({"rank_pattern": {"a": 0}}, "rank_pattern"), ({"rslora": "yes"}, "rslora"),
])
def test_invalid_config_values_name_the_field_and_allowed(kwargs, field):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**kwargs)
    assert err.value.field.startswith(field)
    assert "allowed" in str(err.value)


def test_quant_bits_16_and_32_mean_none():
    assert LoraConfig(quant_bits=16).quant_bits is None and LoraConfig(quant_bits=32).quant_bits is None


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_standard_init_starts_at_the_base_model(init):
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(3, 16)
    before = model.layers[0].mlp.fc1(x)
    lora_tune.inject(model, LoraConfig(targets="all-linear", init=init))
    assert torch.equal(model.layers[0].mlp.fc1(x), before)
    assert model.layers[0].mlp.fc1.lora_A.abs().sum() > 0


@pytest.mark.parametrize("target", ["mlp.fc1", "qkv"])
def test_pissa_init_keeps_outputs_and_puts_principal_part_in_factors(target):
    torch.manual_seed(0)
    model = nn.Module()
    model.mlp = nn.Module()
    model.mlp.fc1 = nn.Linear(16, 12)
    model.qkv = nn.Linear(16, 48)
    layer = model.get_submodule(target)
    x = torch.randn(4, 16)
    before = layer(x).detach()
    w0 = layer.weight.detach().clone()
    lora_tune.inject(model, LoraConfig(rank=4, alpha=4, targets=[target], init="pissa", enable_lora=["q", "v"]))
    wrapper = model.get_submodule(target)
    assert torch.allclose(wrapper(x), before, atol=1e-5)
    assert not torch.allclose(wrapper.base_layer.weight, w0)   # the base keeps the residual
    assert wrapper.lora_B.abs().sum() > 0


def test_transformer_encoder_eval_fast_path_sees_lora():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
    lora_tune.inject(enc, LoraConfig(rank=2, targets="all-linear"))
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    enc.eval()
    x = torch.randn(2, 5, 16)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    with torch.no_grad():
        fast = enc(x, src_key_padding_mask=mask)
    enc.train()  # training mode never takes torch's fast paths
    slow = enc(x, src_key_padding_mask=mask)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_injected_model_deepcopies_and_moves():
    model = Tiny()
    lora_tune.inject(model, LoraConfig(targets="attention", quant_bits=4))
    clone = copy.deepcopy(model)
    x = torch.randint(0, 20, (2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = model.embed(x)
        assert torch.equal(model.layers[0].attn.q_proj(h), clone.layers[0].attn.q_proj(h))
