"""AdapterLoRa: the seed's example runs, prints the parameter counts, and trains only LoRA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_tune import AdapterLoRa, ConfigError, NoMatchingModulesError, load_adapter
from lora_tune.lora.inject import lora_layers
from lora_tune.lora.layers import LoraLinear, LoraMultiheadAttention

D, HEADS, FF, R = 512, 8, 2048, 4


def seed_example(capsys=None, **kw):
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(d_model=D, nhead=HEADS)
    adapter = AdapterLoRa(model, method=kw.pop("method", "LoRa"), Rank=R, **kw)
    adapter.add_layer("self_attn")
    adapter.add_layer("linear1")
    adapter.add_layer("linear2")
    adapter.reconstruct_model()
    return adapter, adapter.implement_lora(verbose=True)


def test_seed_example_runs_and_prints_counts(capsys):
    base_params = sum(p.numel() for p in nn.TransformerEncoderLayer(d_model=D, nhead=HEADS).parameters())
    adapter, model = seed_example()
    out = capsys.readouterr().out.splitlines()
    # q, k, v each get an r x D / D x r pair; out_proj, linear1, linear2 one pair each
    lora = 3 * R * (D + D) + R * (D + D) + R * (D + FF) + R * (FF + D)
    assert out == [f"Total trainable parameters before LoRA: {base_params}",
                   f"Total trainable parameters after LoRA: {lora}"]
    assert isinstance(model.self_attn, LoraMultiheadAttention) and isinstance(model.linear1, LoraLinear)
    assert adapter.report.trainable_after == lora
    assert model.self_attn.method == "parallel" and model.linear1.scaling == 1.0


def test_adapted_layer_starts_equal_and_trains_only_lora():
    torch.manual_seed(1)
    x = torch.randn(6, 2, D)
    _, model = seed_example()
    model.eval()
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(d_model=D, nhead=HEADS).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    target = torch.randn(6, 2, D)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        opt.step()
    model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        assert not torch.allclose(model(x), ref(x), atol=1e-4)


@pytest.mark.parametrize("method, impl, bits", [("lora", "parallel", None), ("merged", "merged", None),
                                                ("LoRa-Torch", "merged", None), ("QLoRa", "parallel", 4)])
def test_method_names_map_to_config(method, impl, bits):
    adapter, model = seed_example(method=method)
    assert adapter.config.method == impl and adapter.config.quant_bits == bits
    assert all(w.method == impl for _, w in lora_layers(model))
    with torch.no_grad():
        assert model(torch.randn(3, 1, D)).shape == (3, 1, D)


def test_bad_input_names_field_and_choices():
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2)
    with pytest.raises(ConfigError, match=r"method: got 'LoRA\+\+'.*'LoRa' or 'parallel'.*'QLoRa'"):
        AdapterLoRa(layer, method="LoRA++")
    with pytest.raises(ConfigError, match="Rank: got 0"):
        AdapterLoRa(layer, Rank=0)
    with pytest.raises(ConfigError, match="layers: got"):
        AdapterLoRa(layer).reconstruct_model()
    with pytest.raises(ConfigError, match="add_layer"):
        AdapterLoRa(layer).add_layer("")
    with pytest.raises(ConfigError, match="not layer types"):
        AdapterLoRa(layer).add_layer("nn.Linear", "self_attn")
    with pytest.raises(ConfigError, match="dropout"):
        AdapterLoRa(layer, dropout=2.0).add_layer("linear1").reconstruct_model()
    adapter = AdapterLoRa(layer).add_layer("feed_forward")
    with pytest.raises(NoMatchingModulesError, match="linear1"):
        adapter.reconstruct_model()
    assert not list(lora_layers(layer))


def test_save_and_reload_through_facade(tmp_path):
    adapter, model = seed_example(alpha=8.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    adapter.save(tmp_path)
    torch.manual_seed(0)
    fresh = nn.TransformerEncoderLayer(d_model=D, nhead=HEADS)
    load_adapter(fresh, tmp_path)
    x = torch.randn(4, 2, D)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
