"""Presets by role on 15 families built from configs, and the coverage check of target choices.

For each family the table spells out, block by block and stack by stack, which modules are
attention (self- and cross-attention, q/k/v/o), which are MLP (T5's ``DenseReluDense.wi`` /
``wo`` included; expert weight stacks by parameter name), and which are neither (BERT's pooler:
in ``all-linear`` only) or never adapted (heads, routers). The presets must list exactly these;
``all-linear`` must then cover every linear weight but the heads' and the routers', with no
warning. The coverage tests build models whose numbers are known by hand.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_tune import LoraConfig, inject, target_coverage, target_presets
from lora_tune.lora.coverage import linear_weights

from .hf_families import build
from .hf_models import LAYERS

pytest.importorskip("transformers")

LLAMA = {"model.layers": ({"attention": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.o_proj"],
                           "qv": ["self_attn.q_proj", "self_attn.v_proj"],
                           "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]},)}
SELF = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj"]
CROSS = ["encoder_attn.k_proj", "encoder_attn.v_proj", "encoder_attn.q_proj", "encoder_attn.out_proj"]
QV = ["self_attn.v_proj", "self_attn.q_proj"]
BERT_LIKE = ({"attention": ["attention.self.query", "attention.self.key", "attention.self.value",
                            "attention.output.dense"],
              "qv": ["attention.self.query", "attention.self.value"],
              "mlp": ["intermediate.dense", "output.dense"]},)
T5_SA = ["layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.0.SelfAttention.o"]
T5_CA = ["layer.1.EncDecAttention.q", "layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v",
         "layer.1.EncDecAttention.o"]
EXPERT_STACKS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# family -> ({stack: (per-block roles,)}, modules outside the blocks in all-linear, never adapted)
FAMILIES = {
    "llama": (LLAMA, [], ["lm_head"]),
    "qwen2": (LLAMA, [], ["lm_head"]),
    "mistral": (LLAMA, [], ["lm_head"]),
    "gemma2": (LLAMA, [], ["lm_head"]),
    "phi3": ({"model.layers": ({"attention": ["self_attn.o_proj", "self_attn.qkv_proj"],
                                "qv": ["self_attn.qkv_proj[q,v]"], "mlp": ["mlp.gate_up_proj", "mlp.down_proj"]},)},
             [], ["lm_head"]),
    "gpt2": ({"transformer.h": ({"attention": ["attn.c_attn", "attn.c_proj"], "qv": ["attn.c_attn[q,v]"],
                                 "mlp": ["mlp.c_fc", "mlp.c_proj"]},)}, [], ["lm_head"]),
    "opt": ({"model.decoder.layers": ({"attention": SELF, "qv": QV, "mlp": ["fc1", "fc2"]},)}, [], ["lm_head"]),
    "bert": ({"bert.encoder.layer": BERT_LIKE}, ["bert.pooler.dense"], ["classifier"]),
    "roberta": ({"roberta.encoder.layer": BERT_LIKE}, [], ["classifier.dense", "classifier.out_proj"]),
    "t5": ({"encoder.block": ({"attention": T5_SA, "qv": T5_SA[0:3:2],
                               "mlp": ["layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo"]},),
            "decoder.block": ({"attention": T5_SA + T5_CA, "qv": T5_SA[0:3:2] + T5_CA[0:3:2],
                               "mlp": ["layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wo"]},)},
           [], ["lm_head"]),
    "bart": ({"model.encoder.layers": ({"attention": SELF, "qv": QV, "mlp": ["fc1", "fc2"]},),
              "model.decoder.layers": ({"attention": SELF + CROSS,
                                        "qv": QV + ["encoder_attn.v_proj", "encoder_attn.q_proj"],
                                        "mlp": ["fc1", "fc2"]},)}, [], ["lm_head"]),
    "vit": ({"vit.layers": ({"attention": ["attention.q_proj", "attention.k_proj", "attention.v_proj",
                                           "attention.o_proj"],
                             "qv": ["attention.q_proj", "attention.v_proj"], "mlp": ["mlp.fc1", "mlp.fc2"]},)},
            [], ["classifier"]),
    "whisper": ({"model.encoder.layers": ({"attention": SELF, "qv": QV, "mlp": ["fc1", "fc2"]},),
                 "model.decoder.layers": ({"attention": SELF + CROSS, "qv": QV + ["encoder_attn.v_proj",
                                                                                 "encoder_attn.q_proj"],
                                           "mlp": ["fc1", "fc2"]},)}, [], ["proj_out"]),
    "mixtral": ({"model.layers": ({**LLAMA["model.layers"][0], "mlp": EXPERT_STACKS},)}, [], ["lm_head"]),
    "qwen2_moe": ({"model.layers": ({**LLAMA["model.layers"][0],
                                     "mlp": EXPERT_STACKS + ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                                             "mlp.shared_expert.down_proj"]},)},
                  [], ["lm_head", "model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"]),
}


def expected(family: str, role: str) -> set[str]:
    stacks, _, _ = FAMILIES[family]
    return {f"{stack}.{i}.{name}" for stack, (roles,) in stacks.items() for i in range(LAYERS) for name in roles[role]}


@pytest.fixture(scope="module")
def models():
    return {family: build(family) for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_presets_follow_roles(models, family):
    model, _ = models[family]
    presets = target_presets(model)
    _, others, never = FAMILIES[family]
    assert set(presets["attention"]) == {n.split("[")[0] for n in expected(family, "attention")}
    assert set(presets["attention-qv"]) == expected(family, "qv")
    assert set(presets["mlp"]) == expected(family, "mlp")
    linear = {n.split("[")[0] for n in expected(family, "attention") | expected(family, "mlp")} | set(others)
    assert set(presets["all-linear"]) == linear
    for name in never:
        assert not any(name in ps for ps in presets.values()), f"{name} is in a preset"
    if family in ("mixtral", "qwen2_moe"):
        assert set(presets["experts"]) == {f"model.layers.{i}.{s}" for i in range(LAYERS) for s in EXPERT_STACKS}
    else:
        assert "experts" not in presets
    assert not set(presets["attention"]) & set(presets["mlp"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_linear_covers_everything_but_heads_and_routers(models, family):
    model, _ = models[family]
    cov = target_coverage(model, LoraConfig(targets="all-linear"))
    assert cov.warnings == ()
    skipped = {g: cov.by_group[g][1] for g in ("head", "router") if g in cov.by_group}
    assert cov.adapted_weights == cov.linear_weights - sum(skipped.values())
    assert all(cov.by_group[g][0] == cov.by_group[g][1] for g in ("attention", "mlp"))
    stacks, _, _ = FAMILIES[family]
    assert cov.blocks == {stack: (LAYERS, LAYERS) for stack in stacks}


@pytest.mark.parametrize("family", ["t5", "bart", "whisper", "bert", "vit", "qwen2_moe"])
def test_injecting_all_linear_keeps_outputs_and_leaves_heads_and_routers_alone(models, family):
    model, inputs = models[family]
    model = copy.deepcopy(model)
    with torch.no_grad():
        before = model(**inputs).logits
    inject(model, LoraConfig(rank=2, targets="all-linear"))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)
    _, _, never = FAMILIES[family]
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "base_layer")}
    assert not any(n in wrapped for n in never)
    assert all(not p.requires_grad for n, p in model.named_parameters() if any(n.startswith(h) for h in never))


# -- coverage numbers and warnings -----------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))


class Mixer(nn.Module):  # a block without attention (as in hybrid models)
    def __init__(self, d):
        super().__init__()
        self.in_proj, self.out_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)


class Block(nn.Module):
    def __init__(self, d, attention: bool):
        super().__init__()
        if attention:
            self.self_attn = Attention(d)
        else:
            self.mixer = Mixer(d)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 3 * d, bias=False), nn.Linear(3 * d, d, bias=False)


class Hybrid(nn.Module):
    """12 blocks, attention only in block 5; an output head of 8 x 10."""

    def __init__(self, d=8, n=12, attention_in=(5,)):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, i in attention_in) for i in range(n))
        self.lm_head = nn.Linear(d, 10, bias=False)


def test_a_hybrid_models_mixer_is_neither_attention_nor_mlp():
    presets = target_presets(Hybrid())
    assert presets["attention"] == [f"layers.5.self_attn.{p}_proj" for p in "qkvo"]
    assert presets["mlp"] == [f"layers.{i}.mlp.fc{j}" for i in range(12) for j in (1, 2)]
    mixers = [f"layers.{i}.mixer.{p}_proj" for i in range(12) if i != 5 for p in ("in", "out")]
    assert set(mixers) <= set(presets["all-linear"]) and not set(mixers) & set(presets["attention"] + presets["mlp"])


def test_shares_are_counted_by_hand():
    model = Hybrid()
    d = 8
    attention, mixer, mlp, head = 4 * d * d, 2 * 2 * d * d, 2 * 3 * d * d, 10 * d
    total = attention + 11 * mixer + 12 * mlp + head
    cov = target_coverage(model, LoraConfig(targets="attention"))
    assert cov.linear_weights == total and cov.adapted_weights == attention and cov.modules == 4
    assert cov.share == pytest.approx(attention / total)
    assert cov.by_group["attention"] == (attention, attention)
    assert cov.by_group["head"] == (0, head)
    qv = target_coverage(model, LoraConfig(targets="attention-qv"))
    assert qv.adapted_weights == 2 * d * d


def test_a_choice_matching_one_block_in_twelve_is_warned_about():
    cov = target_coverage(Hybrid(), LoraConfig(targets="attention"))
    assert cov.blocks == {"layers": (1, 12)}
    (warning,) = cov.warnings
    assert "only 1 of the 12 blocks of layers" in warning and "with LoRA: 5" in warning


def test_a_glob_that_misses_blocks_is_warned_about_but_named_blocks_are_not():
    model = Hybrid(attention_in=range(12))
    (warning,) = target_coverage(model, LoraConfig(targets=["layers.1*.self_attn.q_proj"])).warnings
    assert "only 3 of the 12 blocks" in warning and "1, 10, 11" in warning
    assert target_coverage(model, LoraConfig(targets=["layers.3.self_attn.q_proj"])).warnings == ()
    assert target_coverage(model, LoraConfig(targets=[r"re:layers\.(3|4)\..*"])).warnings == ()
    # a range chosen with `layers` is what is meant: every selected block is covered
    cov = target_coverage(model, LoraConfig(targets="attention", layers={"last": 4}))
    assert cov.warnings == () and cov.blocks == {"layers": (4, 4)}


class StackWithoutCount(nn.Module):
    """Expert-like 3-D weights in a module that does not state num_experts: not adaptable."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(4, 8, 8))


def test_all_linear_warns_about_linear_weights_it_cannot_adapt():
    model = Hybrid(attention_in=range(12))
    model.layers[0].mlp.experts = StackWithoutCount()
    cov = target_coverage(model, LoraConfig(targets="all-linear"))
    (warning,) = cov.warnings
    assert "leaves out 1 linear weight" in warning and "layers.0.mlp.experts.gate_up_proj" in warning
    assert cov.by_group["unsupported"] == (0, 4 * 8 * 8)
    assert [w.name for w in linear_weights(model) if not w.adaptable] == ["layers.0.mlp.experts.gate_up_proj"]
    assert target_coverage(model, LoraConfig(targets="attention")).warnings == ()
    (warning,) = target_coverage(model, LoraConfig(targets="mlp")).warnings  # an expert-like stack is MLP too
    assert "layers.0.mlp.experts.gate_up_proj" in warning


def test_mixtral_all_linear_covers_its_experts():
    """transformers 5 stores Mixtral's experts as 3-D parameters: all-linear must adapt them."""
    model, _ = build("mixtral")
    cov = target_coverage(model, LoraConfig(targets="all-linear"))
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert cov.by_group["mlp"] == (experts, experts)
    assert cov.share > 0.9
