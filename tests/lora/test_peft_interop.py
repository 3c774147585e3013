"""PEFT interop against the real peft 0.21 on tiny GPT-2 and BERT models built from config
(no downloads): our PEFT-format adapter loads into peft.PeftModel with identical outputs, and a
directory peft itself saved loads into lora-tune with PEFT's outputs."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from lora_tune import AdapterFormatError, LoraConfig, inject, load_adapter, save_adapter
from lora_tune.lora.inject import lora_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


TOKENS = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(TOKENS).logits


def randomize(model, seed=5):
    """Nonzero B (and A) everywhere, so that an ignored tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_load(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(path)).eval()


CASES = {
    "gpt2-all": (gpt2, LoraConfig(rank=4, alpha=8.0, targets=["c_attn", "c_proj", "c_fc", "wte"])),
    "gpt2-rslora-pattern": (gpt2, LoraConfig(rank=2, alpha=3.0, targets=["c_attn", "mlp.c_proj"], rslora=True,
                                             rank_pattern={"h.1.attn.c_attn": 5}, alpha_pattern={"mlp.c_proj": 7.0})),
    "bert-qv-head": (bert, LoraConfig(rank=4, alpha=16.0, targets=["query", "value", "word_embeddings"],
                                      bias="lora_only", modules_to_save=["classifier"])),
    "bert-pissa": (bert, LoraConfig(rank=4, alpha=4.0, targets=["query", "value"], init="pissa")),
    "bert-all-linear-bias": (bert, LoraConfig(rank=3, alpha=6.0, targets="all-linear", bias="all")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_peft_export_gives_identical_outputs_in_peft(tmp_path, case):
    build, cfg = CASES[case]
    model = build()
    inject(model, cfg)
    randomize(model)
    if cfg.modules_to_save:
        with torch.no_grad():
            model.classifier.weight.mul_(3.0)
    if cfg.bias != "none":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and n.endswith("bias"):
                    p.add_(0.25)
    ours = logits(model)
    assert not torch.allclose(ours, logits(build()), atol=1e-3)
    save_adapter(model, tmp_path, format="peft", config=cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = logits(peft_load(build(), tmp_path))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    # and back through our own PEFT reader into an un-adapted model
    again = build()
    load_adapter(again, tmp_path)
    torch.testing.assert_close(logits(again), ours, rtol=1e-5, atol=1e-6)


def test_export_keys_and_config_follow_peft_conventions(tmp_path):
    from safetensors.torch import load_file

    model = gpt2()
    cfg = LoraConfig(rank=4, alpha=8.0, targets=["h.0.attn.c_attn", "h.0.mlp.c_fc", "wte"])
    inject(model, cfg)
    save_adapter(model, tmp_path, format="peft", config=cfg)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["fan_in_fan_out"] is True and meta["r"] == 4
    assert meta["target_modules"] == ["transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    # the fused q/k/v pairs become one block-diagonal pair of rank 3r with the same scaling
    assert meta["rank_pattern"] == {r"^transformer\.h\.0\.attn\.c_attn": 12}
    assert meta["alpha_pattern"] == {r"^transformer\.h\.0\.attn\.c_attn": 24.0}
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert shapes == {
        "base_model.model.transformer.wte.lora_embedding_A": (4, 100),
        "base_model.model.transformer.wte.lora_embedding_B": (32, 4),
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": (12, 32),
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": (96, 12),
        "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight": (4, 32),
        "base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight": (128, 4),
    }


def peft_saved(tmp_path, build, **peft_kwargs):
    pm = peft.get_peft_model(build(), peft.LoraConfig(**peft_kwargs))
    randomize(pm, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path))
    return logits(pm)


def test_peft_saved_gpt2_loads_with_peft_outputs(tmp_path):
    want = peft_saved(tmp_path, gpt2, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wte"],
                      fan_in_fan_out=True, use_rslora=True, rank_pattern={"c_proj": 2})
    assert not torch.allclose(want, logits(gpt2()), atol=1e-3)
    model = gpt2()
    load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-6)
    # PEFT's c_attn pair is shared by q, k and v: it is adapted as one plain pair
    c_attn = dict(lora_layers(model))["transformer.h.0.attn.c_attn"]
    assert c_attn.parts is None and c_attn.lora_A.shape == (4, 32)


def test_peft_saved_bert_loads_into_fresh_and_into_injected_model(tmp_path):
    want = peft_saved(tmp_path, bert, r=4, lora_alpha=16, target_modules=["query", "value"],
                      modules_to_save=["classifier"], bias="lora_only")
    fresh = bert()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), want, rtol=1e-5, atol=1e-6)

    injected = bert()
    inject(injected, LoraConfig(rank=4, alpha=16.0, targets=["query", "value"], modules_to_save=["classifier"],
                                bias="lora_only"))
    load_adapter(injected, tmp_path)
    torch.testing.assert_close(logits(injected), want, rtol=1e-5, atol=1e-6)


def test_peft_adapter_with_other_scaling_is_refused_by_injected_model(tmp_path):
    peft_saved(tmp_path, bert, r=4, lora_alpha=16, target_modules=["query", "value"])
    model = bert()
    inject(model, LoraConfig(rank=4, alpha=4.0, targets=["query", "value"]))
    with pytest.raises(AdapterFormatError, match="scaling 1 in the model but 4 in the adapter"):
        load_adapter(model, tmp_path)


def test_wrong_prefix_is_refused_loudly_though_peft_ignores_it(tmp_path):
    from safetensors.torch import load_file, save_file

    want = peft_saved(tmp_path, bert, r=4, lora_alpha=16, target_modules=["query", "value"])
    weights = load_file(tmp_path / "adapter_model.safetensors")
    stripped = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
    save_file(stripped, tmp_path / "adapter_model.safetensors")
    # the hazard is real: PEFT itself loads this without complaint and keeps B = 0
    silently = logits(peft_load(bert(), tmp_path))
    torch.testing.assert_close(silently, logits(bert()))
    assert not torch.allclose(silently, want, atol=1e-3)
    model = bert()
    with pytest.raises(AdapterFormatError, match="lack the 'base_model.model.' prefix"):
        load_adapter(model, tmp_path)
    assert not list(lora_layers(model))


class Small(nn.Module):
    def __init__(self, **conv):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(6, 4, 3, padding=1, **conv)
        self.attn = nn.MultiheadAttention(6, 2)
        self.qkv = nn.Linear(6, 18)

    def forward(self, x):
        e = self.emb(x)                      # (B, T, 6)
        img = e.transpose(1, 2)[..., None].expand(-1, -1, -1, 3)
        a, _ = self.attn(e, e, e)
        return self.conv(img).sum() + self.qkv(a).sum()


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, (3, 2), padding="same")
        self.c3 = nn.Conv3d(3, 4, 2, stride=(1, 2, 1))

    def forward(self, x):
        return self.c1(x[..., 0, 0]), self.c2(x[..., 0]), self.c3(x)


def test_conv_and_embedding_export_match_peft(tmp_path):
    cfg = LoraConfig(rank=2, targets=["emb", "conv", "qkv"])
    model = Small()
    inject(model, cfg)
    randomize(model)
    x = torch.randint(0, 10, (2, 5))
    save_adapter(model, tmp_path, format="peft", config=cfg)
    with torch.no_grad():
        torch.testing.assert_close(peft_load(Small(), tmp_path)(x), model(x), rtol=1e-5, atol=1e-5)


def test_conv1d_2d_3d_match_peft_both_ways(tmp_path):
    x = torch.randn(2, 3, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    cfg = LoraConfig(rank=2, alpha=5.0, targets=["c1", "c2", "c3"])
    model = Convs()
    inject(model, cfg)
    randomize(model)
    save_adapter(model, tmp_path / "ours", format="peft", config=cfg)
    with torch.no_grad():
        want = model(x)
        assert not torch.allclose(want[2], Convs()(x)[2], atol=1e-3)
        for got, ref in zip(peft_load(Convs(), tmp_path / "ours")(x), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    pm = peft.get_peft_model(Convs(), peft.LoraConfig(r=3, lora_alpha=4, target_modules=["c1", "c2", "c3"]))
    randomize(pm, seed=2)
    pm.save_pretrained(str(tmp_path / "theirs"))
    fresh = Convs()
    load_adapter(fresh, tmp_path / "theirs")
    with torch.no_grad():
        for got, ref in zip(fresh(x), pm(x)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets, conv, reason", [
    (["attn"], {}, "out_proj delta twice"),
    (["qkv[q,v]"], {}, "enable_lora parts"),
    (["conv"], {"dilation": 2}, "ignores dilation"),
    (["conv"], {"padding_mode": "reflect"}, "ignores padding_mode"),
    (["conv"], {"groups": 2}, "groups=2"),
])
def test_layers_peft_cannot_represent_are_refused(tmp_path, targets, conv, reason):
    model = Small(**conv)
    inject(model, LoraConfig(rank=2, targets=targets))
    with pytest.raises(AdapterFormatError, match=reason) as err:
        save_adapter(model, tmp_path / "out", format="peft")
    assert "format='lora-tune'" in str(err.value)
    assert not (tmp_path / "out").exists()
    save_adapter(model, tmp_path / "ours")          # our own format keeps them
    fresh = Small(**conv)
    load_adapter(fresh, tmp_path / "ours")
    assert [n for n, _ in lora_layers(fresh)] == [n for n, _ in lora_layers(model)]


def test_peft_saved_multihead_attention_is_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(Small(), peft.LoraConfig(r=2, target_modules=["attn"]))
        pm.save_pretrained(str(tmp_path))
    with pytest.raises(AdapterFormatError, match="MultiheadAttention"):
        load_adapter(Small(), tmp_path)


def test_unsupported_peft_variant_is_refused(tmp_path):
    peft_saved(tmp_path, bert, r=2, target_modules=["query"], lora_bias=True)
    with pytest.raises(AdapterFormatError, match="lora_bias=True"):
        load_adapter(bert(), tmp_path)


def test_pissa_on_fused_qkv_is_refused_for_peft(tmp_path):
    model = Small()
    inject(model, LoraConfig(rank=2, targets=["qkv"], init="pissa"))
    with pytest.raises(AdapterFormatError, match="init='pissa' on a fused layer"):
        save_adapter(model, tmp_path, format="peft", config=LoraConfig(rank=2, targets=["qkv"], init="pissa"))
