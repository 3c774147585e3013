"""Adapter state dict and the lora-tune save format: round trips for every layer family, both
methods, full-precision and quantized bases; strict refusal of adapters that do not fit."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lora_tune import (AdapterFormatError, ConfigError, LoraConfig, inject, load_adapter, lora_state_dict, merge,
                       save_adapter)
from lora_tune.lora.inject import lora_layers


class Zoo(nn.Module):
    """One layer of every family the injector supports."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.lin = nn.Linear(8, 12)
        self.qkv = nn.Linear(12, 24)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.c1 = nn.Conv1d(8, 6, 3, padding=2, dilation=2, groups=2)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv3d(2, 4, 2)
        self.gpt = Conv1D(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens, img, vol):
        e = self.norm(self.emb(tokens))
        q = self.qkv(self.lin(e))
        a, _ = self.attn(e, e, e)
        return [q, a, self.c1(e.transpose(1, 2)), self.gpt(e), self.c2(img), self.c3(vol), self.head(a)]


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 20, (2, 5), generator=g), torch.randn(2, 3, 8, 8, generator=g),
            torch.randn(1, 2, 4, 4, 4, generator=g))


ALL = ["emb", "lin", "qkv[q,v]", "attn", "c1", "c2", "c3", "gpt"]


def randomize(model: nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def outputs(model: nn.Module):
    model.eval()
    with torch.no_grad():
        return model(*inputs())


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def assert_differs(a, b):
    assert any(not torch.allclose(x, y, atol=1e-4) for x, y in zip(a, b))


@pytest.mark.parametrize("method", ["parallel", "merged"])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_round_trip_every_layer_into_fresh_and_injected_model(tmp_path, method, bits):
    cfg = LoraConfig(rank=2, alpha=3.0, targets=ALL, method=method, quant_bits=bits)
    model = Zoo()
    inject(model, cfg)
    randomize(model)
    want = outputs(model)
    assert_differs(want, outputs(inject_fresh(cfg)))  # the random factors matter
    save_adapter(model, tmp_path, config=cfg)

    fresh = Zoo()                       # no LoRA yet: injected from the saved config
    load_adapter(fresh, tmp_path)
    assert [n for n, _ in lora_layers(fresh)] == [n for n, _ in lora_layers(model)]
    assert_same(outputs(fresh), want)

    injected = inject_fresh(cfg)        # already adapted (B = 0): factors loaded in place
    load_adapter(injected, tmp_path)
    assert_same(outputs(injected), want)


def inject_fresh(cfg: LoraConfig) -> nn.Module:
    model = Zoo()
    inject(model, cfg)
    return model


def test_other_method_loads_the_same_function(tmp_path):
    cfg = LoraConfig(rank=2, targets=["lin", "c2", "gpt", "attn"], method="parallel")
    model = inject_fresh(cfg)
    randomize(model)
    save_adapter(model, tmp_path, config=cfg)
    other = inject_fresh(LoraConfig(rank=2, targets=["lin", "c2", "gpt", "attn"], method="merged"))
    load_adapter(other, tmp_path)
    for x, y in zip(outputs(other), outputs(model)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_config_file_records_format_config_and_resolved_targets(tmp_path):
    cfg = LoraConfig(rank=2, targets=["qkv", "attn[q,o]", "lin"], enable_lora=["q", "v"], rank_pattern={"lin": 3})
    model = inject_fresh(cfg)
    save_adapter(model, tmp_path, config=cfg)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["format"] == "lora-tune" and meta["format_version"] == 1
    assert meta["lora_config"] == cfg.to_dict()
    assert meta["target_modules"] == ["lin", "qkv[q,v]", "attn[q,o]"]
    assert meta["modules"]["lin"]["r"] == 3 and meta["modules"]["qkv"]["r"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_state_dict_holds_lora_bias_and_modules_to_save_per_config():
    cfg = LoraConfig(rank=2, targets=["lin", "gpt"], bias="lora_only", modules_to_save=["norm"])
    model = inject_fresh(cfg)
    keys = set(lora_state_dict(model, cfg))
    assert keys == {"lin.lora_A", "lin.lora_B", "gpt.lora_A", "gpt.lora_B", "lin.base_layer.bias",
                    "gpt.base_layer.bias", "norm.weight", "norm.bias"}
    all_bias = set(lora_state_dict(model, LoraConfig(rank=2, targets=["lin"], bias="all")))
    assert "head.bias" in all_bias and "attn.in_proj_bias" in all_bias and "head.weight" not in all_bias
    # without a config: the trainable parameters inject left on
    assert set(lora_state_dict(model)) == keys


def test_bias_and_modules_to_save_round_trip(tmp_path):
    cfg = LoraConfig(rank=2, targets=["lin"], bias="all", modules_to_save=["head"])
    model = inject_fresh(cfg)
    randomize(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
        model.norm.bias.add_(0.5)
    save_adapter(model, tmp_path, config=cfg)
    fresh = Zoo()
    load_adapter(fresh, tmp_path)
    assert_same(outputs(fresh), outputs(model))
    assert fresh.head.weight.requires_grad and not fresh.c2.weight.requires_grad


def test_pissa_adapter_reproduces_residual_base_on_reload(tmp_path):
    cfg = LoraConfig(rank=2, targets=["lin", "gpt"], init="pissa")
    model = inject_fresh(cfg)
    randomize(model)
    save_adapter(model, tmp_path, config=cfg)
    fresh = Zoo()
    load_adapter(fresh, tmp_path)
    for x, y in zip(outputs(fresh), outputs(model)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_loading_into_a_merged_model_refolds_the_new_delta(tmp_path):
    cfg = LoraConfig(rank=2, targets=["lin", "c3"])
    model = inject_fresh(cfg)
    randomize(model)
    save_adapter(model, tmp_path, config=cfg)
    target = inject_fresh(cfg)
    merge(target)
    load_adapter(target, tmp_path)
    assert all(w.merged for _, w in lora_layers(target))
    for x, y in zip(outputs(target), outputs(model)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_shape_mismatch_is_refused_and_model_untouched(tmp_path):
    model = inject_fresh(LoraConfig(rank=2, targets=["lin", "c2"]))
    randomize(model)
    save_adapter(model, tmp_path, config=LoraConfig(rank=2, targets=["lin", "c2"]))
    other = inject_fresh(LoraConfig(rank=4, targets=["lin", "c2"]))
    before = snapshot(other)
    with pytest.raises(AdapterFormatError, match="r=4"):
        load_adapter(other, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = LoraConfig(rank=2, targets=["lin", "c2"])
    save_adapter(inject_fresh(cfg), tmp_path, config=cfg)
    weights = load_file(tmp_path / "adapter.safetensors")
    weights.pop("c2.lora_B")
    weights["lin.lora_C"] = torch.zeros(1)
    save_file(weights, tmp_path / "adapter.safetensors")
    fresh = Zoo()
    before = snapshot(fresh)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(fresh, tmp_path)
    assert "missing keys (1): c2.lora_B" in str(err.value) and "unexpected keys (1): lin.lora_C" in str(err.value)
    assert not list(lora_layers(fresh)) and snapshot(fresh).keys() == before.keys()


def test_file_shape_mismatch_on_fresh_model_is_refused_before_inject(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = LoraConfig(rank=2, targets=["lin"])
    save_adapter(inject_fresh(cfg), tmp_path, config=cfg)
    weights = load_file(tmp_path / "adapter.safetensors")
    weights["lin.lora_A"] = torch.zeros(2, 9)
    save_file(weights, tmp_path / "adapter.safetensors")
    fresh = Zoo()
    with pytest.raises(AdapterFormatError, match=r"lin.lora_A: file \(2, 9\) vs model \(2, 8\)"):
        load_adapter(fresh, tmp_path)
    assert not list(lora_layers(fresh))


def test_scaling_mismatch_is_refused(tmp_path):
    save_adapter(inject_fresh(LoraConfig(rank=2, alpha=4.0, targets=["lin"])), tmp_path,
                 config=LoraConfig(rank=2, alpha=4.0, targets=["lin"]))
    with pytest.raises(AdapterFormatError, match="scaling"):
        load_adapter(inject_fresh(LoraConfig(rank=2, alpha=8.0, targets=["lin"])), tmp_path)


def test_adapter_for_other_modules_is_refused(tmp_path):
    cfg = LoraConfig(rank=2, targets=["lin"])
    save_adapter(inject_fresh(cfg), tmp_path, config=cfg)
    with pytest.raises(AdapterFormatError, match="only in the adapter: lin.*only in the model: gpt"):
        load_adapter(inject_fresh(LoraConfig(rank=2, targets=["gpt"])), tmp_path)


def test_pickled_weights_are_never_loaded(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(AdapterFormatError, match="pickled weights are never loaded"):
        load_adapter(Zoo(), tmp_path)


def test_unknown_directory_and_format_errors(tmp_path):
    with pytest.raises(AdapterFormatError, match="not an adapter directory"):
        load_adapter(Zoo(), tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterFormatError, match="neither a lora-tune adapter"):
        load_adapter(Zoo(), tmp_path)
    with pytest.raises(ConfigError, match="format: got 'onnx'"):
        save_adapter(inject_fresh(LoraConfig(rank=2, targets=["lin"])), tmp_path, format="onnx")
    with pytest.raises(AdapterFormatError, match="no LoRA layers"):
        save_adapter(Zoo(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_config_is_reconstructed_from_the_wrappers_when_not_given(tmp_path):
    cfg = LoraConfig(rank=2, alpha=5.0, targets=["lin", "qkv[k]", "c2"], rslora=True, quant_bits=8,
                     bias="lora_only")
    model = inject_fresh(cfg)
    randomize(model)
    save_adapter(model, tmp_path)  # no config: rebuilt from the wrappers and requires_grad flags
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    got = meta["lora_config"]
    assert (got["rank"], got["alpha"], got["rslora"], got["quant_bits"], got["bias"]) == (2, 5.0, True, 8, "lora_only")
    fresh = Zoo()
    load_adapter(fresh, tmp_path)
    assert_same(outputs(fresh), outputs(model))


def test_inconsistent_saved_scaling_is_refused(tmp_path):
    cfg = LoraConfig(rank=2, alpha=4.0, targets=["lin"])
    save_adapter(inject_fresh(cfg), tmp_path, config=cfg)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["lora_config"]["rslora"] = True          # scaling would silently change from 2 to 2.83
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    fresh = Zoo()
    with pytest.raises(AdapterFormatError, match="inconsistent"):
        load_adapter(fresh, tmp_path)
    assert not list(lora_layers(fresh))


def test_loaded_model_records_the_saved_config_and_saves_again(tmp_path):
    cfg = LoraConfig(rank=2, targets=["lin", "attn[v,o]"], bias="lora_only")
    model = inject_fresh(cfg)
    randomize(model)
    save_adapter(model, tmp_path / "a", config=cfg)
    fresh = Zoo()
    load_adapter(fresh, tmp_path / "a")
    assert fresh._lora_tune_config == cfg
    save_adapter(fresh, tmp_path / "b")              # no config given: the recorded one is used
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["lora_config"] == cfg.to_dict()
    again = Zoo()
    load_adapter(again, tmp_path / "b")
    assert_same(outputs(again), outputs(model))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_follows_model_to_bfloat16(bits):
    from lora_tune.lora.quant import QuantizedWeight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    inject(model, LoraConfig(rank=2, targets=["0"], quant_bits=bits))
    q = next(m for m in model.modules() if isinstance(m, QuantizedWeight))
    w32 = q.dequantize()
    model.to(torch.bfloat16)
    assert torch.equal(q.dequantize(), w32.to(torch.bfloat16))   # same base, now in bf16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert model(x).dtype == torch.bfloat16


def test_adapter_io_imports_neither_peft_nor_transformers():
    import subprocess
    import sys

    code = ("import sys, lora_tune.lora.state, lora_tune.lora.peft.adapter_format, lora_tune.lora.facade; "
            "print(sorted(m for m in ('peft', 'transformers', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_bfloat16_model_round_trip_after_to_dtype(tmp_path, bits):
    cfg = LoraConfig(rank=2, targets=ALL, quant_bits=bits)
    model = Zoo()
    inject(model, cfg)
    randomize(model)
    model.to(torch.bfloat16)                      # cast after inject: the quantized base must follow
    tokens, img, vol = inputs()
    args = (tokens, img.bfloat16(), vol.bfloat16())
    with torch.no_grad():
        want = model.eval()(*args)
    save_adapter(model, tmp_path, config=cfg)
    fresh = Zoo()                                 # same pipeline: fp32 base, quantized, then cast
    load_adapter(fresh, tmp_path)
    fresh.to(torch.bfloat16)
    assert {p.dtype for n, p in fresh.named_parameters() if "lora_" in n} == {torch.bfloat16}
    with torch.no_grad():
        assert_same(fresh.eval()(*args), want)


def test_corrupt_files_are_refused_with_the_file_named(tmp_path):
    cfg = LoraConfig(rank=2, targets=["lin"])
    save_adapter(inject_fresh(cfg), tmp_path, config=cfg)
    (tmp_path / "adapter.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterFormatError, match="adapter.safetensors: not a readable safetensors file"):
        load_adapter(Zoo(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="adapter_config.json: not readable JSON"):
        load_adapter(Zoo(), tmp_path)


def test_adapter_naming_modules_the_model_lacks_is_refused(tmp_path):
    cfg = LoraConfig(rank=2, targets=["lin", "c2"])
    save_adapter(inject_fresh(cfg), tmp_path, config=cfg)
    other = Zoo()
    del other.c2
    with pytest.raises(AdapterFormatError, match=r"does not fit this model: targets: got \['re:c2'\]"):
        load_adapter(other, tmp_path)
    assert not list(lora_layers(other))
