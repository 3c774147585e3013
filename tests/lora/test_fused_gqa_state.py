"""Saving and loading adapters of Phi-3's grouped-query fused ``qkv_proj`` (q 32 rows, k and v
16 each): both formats round-trip, PEFT itself computes what we compute, and an adapter is
refused by a model whose fused layer splits differently (even where every shape agrees)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from lora_tune import AdapterFormatError, LoraConfig, inject, load_adapter, save_adapter
from lora_tune.lora.inject import lora_layers

from .hf_models import tiny_causal_lm, tokens

peft = pytest.importorskip("peft")

QKV = "model.layers.0.self_attn.qkv_proj"


def phi3(**overrides):
    return tiny_causal_lm("phi3", **overrides)


def randomize(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(tokens()).logits


def adapted(cfg, **overrides):
    model = phi3(**overrides)
    inject(model, cfg)
    return model


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("targets", [["qkv_proj[q,v]", "o_proj"], ["qkv_proj", "gate_up_proj"]])
def test_lora_tune_format_round_trips(tmp_path, targets, bits):
    cfg = LoraConfig(rank=2, alpha=4.0, targets=targets, quant_bits=bits)
    model = adapted(cfg)
    randomize(model)
    want = logits(model)
    assert not torch.allclose(want, logits(adapted(cfg)), atol=1e-4)
    save_adapter(model, tmp_path, config=cfg)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["modules"][QKV]["part_sizes"] == [32, 16, 16]
    for fresh in (phi3(), adapted(cfg)):          # injected from the file / factors loaded in place
        load_adapter(fresh, tmp_path)
        assert fresh.get_submodule(QKV).part_sizes == (32, 16, 16)
        torch.testing.assert_close(logits(fresh), want, rtol=0, atol=0)


def test_peft_format_gives_peft_our_outputs_and_reads_back(tmp_path):
    cfg = LoraConfig(rank=2, alpha=4.0, targets=["qkv_proj", "o_proj"])
    model = adapted(cfg)
    randomize(model)
    want = logits(model)
    save_adapter(model, tmp_path, format="peft", config=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(phi3(), str(tmp_path))
    torch.testing.assert_close(logits(theirs), want, rtol=1e-5, atol=1e-6)
    for again in (phi3(), adapted(cfg)):          # one plain pair / back into per-part pairs
        load_adapter(again, tmp_path)
        torch.testing.assert_close(logits(again), want, rtol=1e-5, atol=1e-6)


def test_peft_saved_qkv_proj_loads_with_peft_outputs(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(phi3(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv_proj"]))
        randomize(pm, seed=11)
        pm.save_pretrained(str(tmp_path))
    want = logits(pm)
    model = phi3()
    load_adapter(model, tmp_path)
    assert model.get_submodule(QKV).parts is None  # PEFT's pair spans q, k and v
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-6)


def test_adapter_for_another_split_is_refused(tmp_path):
    """Same qkv_proj shape (64 x 32) and the same factor shapes, but 6 query heads and 1 key/value head."""
    cfg = LoraConfig(rank=2, targets=["layers.0.self_attn.qkv_proj"])
    model = adapted(cfg)
    save_adapter(model, tmp_path, config=cfg)
    other = dict(num_attention_heads=6, num_key_value_heads=1, head_dim=8)
    assert phi3(**other).get_submodule(QKV).weight.shape == model.get_submodule(QKV).base_layer.weight.shape
    for target in (phi3(**other), adapted(cfg, **other)):
        with pytest.raises(AdapterFormatError,
                           match=r"splits into q/k/v rows \[32, 16, 16\] in the adapter but \[48, 8, 8\]"):
            load_adapter(target, tmp_path)


def test_adapter_without_recorded_split_means_equal_thirds(tmp_path):
    """Adapters saved before part sizes were recorded split every fused layer in thirds."""
    cfg = LoraConfig(rank=2, targets=["layers.0.self_attn.qkv_proj"])
    model = adapted(cfg)
    save_adapter(model, tmp_path, config=cfg)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    del meta["modules"][QKV]["part_sizes"]
    path.write_text(json.dumps(meta))
    with pytest.raises(AdapterFormatError, match="rows None in the adapter"):
        load_adapter(phi3(), tmp_path)           # 64 rows have no thirds: refused, not split wrongly
    thirds = dict(num_key_value_heads=4)         # 96 rows, q = k = v = 32
    legacy = adapted(LoraConfig(rank=2, targets=["layers.0.self_attn.qkv_proj"]), **thirds)
    save_adapter(legacy, tmp_path, config=cfg)
    meta = json.loads(path.read_text())
    del meta["modules"][QKV]["part_sizes"]
    path.write_text(json.dumps(meta))
    loaded = phi3(**thirds)
    load_adapter(loaded, tmp_path)
    assert [n for n, _ in lora_layers(loaded)] == [QKV] and loaded.get_submodule(QKV).part_sizes == (32, 32, 32)
