"""``LoraConfig.layers``: LoRA on some of the model's repeated blocks, in every layer stack.

Decoder (Llama, 4 blocks), encoder-decoder (T5, BART, Whisper: both stacks; T5 with a deeper
decoder), names checked against lists written out here; bad values are typed errors naming the
field, the stack and what is allowed, with the model untouched; PEFT's ``layers_to_transform`` /
``layers_pattern`` both ways, checked with real PEFT.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lora_tune
from lora_tune import ConfigError, LoraConfig, find_targets, inject
from lora_tune.lora.blocks import LayerStack
from lora_tune.lora.config import layers_label, normalize_layers
from lora_tune.lora.targets import model_stacks

from .hf_families import bart, bert, t5, whisper
from .hf_models import tiny_causal_lm, tokens
from .reference import randomize_lora_b

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


def llama(layers=4):
    return tiny_causal_lm("llama", num_hidden_layers=layers)


def names(model, **config):
    return [n for n, _ in find_targets(model, LoraConfig(**config))]


@pytest.mark.parametrize("layers, blocks", [
    ({"first": 1}, [0]), ({"last": 2}, [2, 3]), ({"first": 4}, [0, 1, 2, 3]), ([3, 1], [1, 3]), (None, [0, 1, 2, 3]),
    ("last:3", [1, 2, 3]), ("0|2", [0, 2]),
])
def test_decoder_blocks(layers, blocks):
    assert names(llama(), targets="attention", layers=layers) == [
        f"model.layers.{i}.{n}" for i in blocks for n in ATTN]


def test_stacks_are_discovered_in_every_family():
    assert model_stacks(llama()) == [LayerStack("model.layers", 4)]
    assert model_stacks(t5(decoder_layers=3)[0]) == [LayerStack("encoder.block", 2), LayerStack("decoder.block", 3)]
    assert model_stacks(bart()[0]) == [LayerStack("model.encoder.layers", 2), LayerStack("model.decoder.layers", 2)]
    assert model_stacks(bert()[0]) == [LayerStack("bert.encoder.layer", 2)]
    assert model_stacks(tiny_causal_lm("gpt2")) == [LayerStack("transformer.h", 2)]
    assert model_stacks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))) == []


def test_encoder_decoder_models_count_in_both_stacks():
    model, _ = t5(decoder_layers=3)
    got = names(model, targets="attention", layers={"last": 1})
    sa = [f"layer.0.SelfAttention.{p}" for p in "qkvo"]
    ca = [f"layer.1.EncDecAttention.{p}" for p in "qkvo"]
    assert got == [f"encoder.block.1.{n}" for n in sa] + [f"decoder.block.2.{n}" for n in sa + ca]
    assert names(model, targets="mlp", layers=[0]) == [
        "encoder.block.0.layer.1.DenseReluDense.wi", "encoder.block.0.layer.1.DenseReluDense.wo",
        "decoder.block.0.layer.2.DenseReluDense.wi", "decoder.block.0.layer.2.DenseReluDense.wo"]
    for build in (bart, whisper):
        model, _ = build()
        got = names(model, targets="mlp", layers={"first": 1})
        assert got == ["model.encoder.layers.0.fc1", "model.encoder.layers.0.fc2",
                       "model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"]


def test_layers_pattern_picks_the_stacks():
    model, _ = bart()
    got = names(model, targets="mlp", layers={"last": 1}, layers_pattern=["model.decoder.layers"])
    assert got == ["model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"]
    assert names(model, targets="mlp", layers_pattern=["layers"]) == names(model, targets="mlp")


def test_targets_outside_the_blocks_are_left_out_of_presets():
    model, _ = bert()
    assert "bert.pooler.dense" in names(model, targets="all-linear")
    got = names(model, targets="all-linear", layers={"last": 1})
    assert got and all(n.startswith("bert.encoder.layer.1.") for n in got)


@pytest.mark.parametrize("method", ["parallel", "merged"])
def test_inject_on_chosen_blocks_keeps_outputs_and_trains_only_them(method):
    model = llama()
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits
    inject(model, LoraConfig(rank=2, targets="all-linear", layers={"last": 2}, method=method))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    wrapped = {n.split(".")[2] for n, _ in lora_tune.lora_layers(model)}
    assert wrapped == {"2", "3"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in trainable)


# -- bad input -----------------------------------------------------------------------------------
def _untouched(model, before):
    assert not list(lora_tune.lora_layers(model))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items()) and state.keys() == before.keys()


@pytest.mark.parametrize("config, field, fragments", [
    (dict(targets="attention", layers={"last": 5}), "layers.last",
     ["got 5", "1 to 4: model.layers has 4 blocks"]),
    (dict(targets="attention", layers={"first": 9}), "layers.first", ["got 9", "model.layers has 4 blocks"]),
    (dict(targets="attention", layers=[1, 4, 7]), "layers",
     ["got [1, 4, 7]", "block indices 0 to 3: model.layers has 4 blocks, so [4, 7] are out of range"]),
    (dict(targets=["model.layers.0.self_attn.q_proj"], layers={"last": 1}), "layers",
     ["'model.layers.0.self_attn.q_proj' matches only layers outside them"]),
    (dict(targets="attention", layers={"last": 1}, layers_pattern=["block"]), "layers_pattern",
     ["names of the model's layer stacks: model.layers (layers, 4 blocks)"]),
])
def test_bad_layers_name_the_field_the_stack_and_what_is_allowed(config, field, fragments):
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        inject(model, LoraConfig(**config))
    assert err.value.field == field
    for fragment in fragments:
        assert fragment in str(err.value)
    _untouched(model, before)


def test_a_model_without_blocks_refuses_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="layers: got 'last:1'; allowed: None .the model has no repeated blocks"):
        inject(model, LoraConfig(targets=["0", "2"], layers={"last": 1}))
    assert not list(lora_tune.lora_layers(model))


def test_an_encoder_decoder_index_must_exist_in_every_stack():
    model, _ = t5(decoder_layers=3)
    with pytest.raises(ConfigError,
                       match=r"block indices 0 to 1: encoder\.block has 2 blocks, so \[2\] is out of range"):
        find_targets(model, LoraConfig(targets="attention", layers=[2]))


@pytest.mark.parametrize("value, match", [
    ({"last": 0}, r"layers\.last: got 0; allowed: an integer >= 1"),
    ({"middle": 2}, "layers: got {'middle': 2}"),
    ([1, 1], "distinct"),
    ([-1], r"layers: got \[-1\]"),
    ("last:four", "written 'last:4'"),
    (3, "layers: got 3"),
])
def test_layers_values_are_checked(value, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(layers=value)


def test_labels_round_trip():
    for value, label in [(None, "all"), ({"first": 2}, "first:2"), ({"last": 4}, "last:4"), ([2, 0, 1], "0|1|2"),
                         ([5], "5")]:
        assert layers_label(value) == label
        assert normalize_layers(label) == normalize_layers(value)


# -- PEFT's layers_to_transform ----------------------------------------------------------------------
def _peft_modules(peft_model) -> set[str]:
    return {n.split(".lora_")[0].replace("base_model.model.", "") for n, _ in peft_model.named_parameters()
            if ".lora_" in n}


def _our_modules(model, cfg) -> set[str]:
    return {n for n, _ in find_targets(model, cfg)}


@pytest.mark.parametrize("build, cfg, pattern, indices", [
    (lambda: llama(), LoraConfig(targets="attention", layers={"last": 2}), ["layers"], [2, 3]),
    (lambda: llama(), LoraConfig(targets="all-linear", layers=[0, 2]), ["layers"], [0, 2]),
    (lambda: bart()[0], LoraConfig(targets="attention", layers={"first": 1}), ["layers"], [0]),
    (lambda: t5()[0], LoraConfig(targets="mlp", layers={"last": 1}), ["block"], [1]),
    (lambda: whisper()[0], LoraConfig(targets="attention-qv", layers=[1]), ["layers"], [1]),
])
def test_to_peft_writes_layers_to_transform_and_peft_adapts_the_same_modules(build, cfg, pattern, indices):
    model = build()
    pc = cfg.to_peft(model)
    assert pc.layers_to_transform == indices and pc.layers_pattern == pattern
    # names inside a block, so PEFT's layer filter applies (it skips full names)
    assert not any(t.startswith(("model.", "encoder.", "decoder.")) for t in pc.target_modules)
    assert _peft_modules(peft.get_peft_model(copy.deepcopy(model), pc)) == _our_modules(model, cfg)
    back = LoraConfig.from_peft(pc)
    assert back.layers == indices and back.layers_pattern == pattern
    assert _our_modules(model, back) == _our_modules(model, cfg)


def test_unequal_stacks_fall_back_to_exact_names_peft_matches_alike():
    model, _ = t5(decoder_layers=3)
    cfg = LoraConfig(targets="attention", layers={"last": 1})  # encoder block 1, decoder block 2
    pc = cfg.to_peft(model)
    assert pc.layers_to_transform is None
    assert _peft_modules(peft.get_peft_model(copy.deepcopy(model), pc)) == _our_modules(model, cfg)


def test_from_peft_reads_an_int_and_a_string_pattern():
    cfg = LoraConfig.from_peft({"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"],
                                "layers_to_transform": 1, "layers_pattern": "layers"})
    assert cfg.layers == [1] and cfg.layers_pattern == ["layers"]
    assert names(llama(), **{k: v for k, v in cfg.to_dict().items()
                             if k in ("targets", "layers", "layers_pattern")}) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_peft_adapters_with_layers_move_both_ways(tmp_path):
    base = llama()
    ids = tokens()
    model = copy.deepcopy(base)
    inject(model, LoraConfig(rank=2, alpha=4.0, targets="all-linear", layers={"last": 1}))
    randomize_lora_b(model)
    with torch.no_grad():
        y = model(ids).logits
    lora_tune.save_adapter(model, tmp_path / "ours", format="peft")
    meta = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert meta["layers_to_transform"] == [3] and meta["layers_pattern"] == ["layers"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, y, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = copy.deepcopy(base)
    lora_tune.load_adapter(back, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, y, rtol=1e-5, atol=1e-5)
    lora_tune.save_adapter(model, tmp_path / "lt")  # the lora-tune format keeps `layers` in its config
    saved = json.loads((tmp_path / "lt" / "adapter_config.json").read_text())["lora_config"]
    assert saved["layers"] == {"last": 1}
