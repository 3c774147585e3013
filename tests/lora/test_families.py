"""Presets on the decoder families (tiny transformers models built from configs).

For each family the four presets list exactly the modules spelled out below, layer by layer
(never the output head); injecting any preset leaves the outputs unchanged at init; and a couple
of optimizer steps move every LoRA factor and nothing else. Phi-3's fused ``qkv_proj`` under
grouped-query attention (q 32 rows, k and v 16 each) is checked row by row.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lora_tune import ConfigError, LoraConfig, inject, target_presets

from .hf_models import HEAD_DIM, HEADS, KV_HEADS, LAYERS, tiny_causal_lm, tokens

pytest.importorskip("transformers")

PRESETS = ("attention-qv", "attention", "mlp", "all-linear")


@dataclass(frozen=True)
class Family:
    layer: str                   # prefix of layer i
    attention_qv: tuple[str, ...]
    attention: tuple[str, ...]
    mlp: tuple[str, ...]

    def expected(self, preset: str) -> list[str]:
        per_layer = {"attention-qv": self.attention_qv, "attention": self.attention, "mlp": self.mlp,
                     "all-linear": tuple(n.split("[")[0] for n in self.attention + self.mlp)}[preset]
        return [self.layer.format(i) + n for i in range(LAYERS) for n in per_layer]


LLAMA_LIKE = Family("model.layers.{}.",
                    attention_qv=("self_attn.q_proj", "self_attn.v_proj"),
                    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
FAMILIES = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "phi3": Family("model.layers.{}.",
                   attention_qv=("self_attn.qkv_proj[q,v]",),
                   attention=("self_attn.o_proj", "self_attn.qkv_proj"),
                   mlp=("mlp.gate_up_proj", "mlp.down_proj")),
    "gpt2": Family("transformer.h.{}.",
                   attention_qv=("attn.c_attn[q,v]",),
                   attention=("attn.c_attn", "attn.c_proj"),
                   mlp=("mlp.c_fc", "mlp.c_proj")),
    "opt": Family("model.decoder.layers.{}.",  # OPT defines k_proj, v_proj, q_proj in that order
                  attention_qv=("self_attn.v_proj", "self_attn.q_proj"),
                  attention=("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj"),
                  mlp=("fc1", "fc2")),
}
# modules per layer in attention-qv, attention, mlp (all-linear = attention + mlp)
COUNTS = {"llama": (2, 4, 3), "qwen2": (2, 4, 3), "mistral": (2, 4, 3), "gemma2": (2, 4, 3),
          "phi3": (1, 2, 2), "gpt2": (1, 2, 2), "opt": (2, 4, 2)}


@pytest.fixture(scope="module")
def models():
    return {family: tiny_causal_lm(family) for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_presets_name_exactly_the_expected_modules(models, family):
    presets = target_presets(models[family])
    spec = FAMILIES[family]
    counts = dict(zip(PRESETS, COUNTS[family] + (COUNTS[family][1] + COUNTS[family][2],)))
    for preset in PRESETS:
        assert presets[preset] == spec.expected(preset), preset
        for i in range(LAYERS):
            in_layer = [n for n in presets[preset] if n.startswith(spec.layer.format(i))]
            assert len(in_layer) == counts[preset], (preset, i, in_layer)
        assert not any("lm_head" in n for n in presets[preset])


def _lora_and_frozen(model):
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in lora}
    frozen.update({f"buffer:{n}": b.clone() for n, b in model.named_buffers()})
    return lora, frozen


@pytest.mark.parametrize("method", ["parallel", "merged"])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_inject_keeps_outputs_and_training_moves_only_lora(family, preset, method):
    model = tiny_causal_lm(family)
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits
    report = inject(model, LoraConfig(rank=2, alpha=4.0, targets=preset, method=method))
    assert [n for n, _ in report.targets] == [n.split("[")[0] for n in FAMILIES[family].expected(preset)]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)

    lora, frozen = _lora_and_frozen(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # B moves on the first step, A (whose gradient is 0 while B = 0) on the second
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    unmoved = [n for n, t in lora.items() if torch.equal(params[n], t)]
    assert not unmoved, f"LoRA factors that did not train: {unmoved}"
    for name, t in frozen.items():
        now = buffers[name[7:]] if name.startswith("buffer:") else params[name]
        assert torch.equal(now, t), f"{name} changed"


# -- Phi-3's fused qkv_proj under grouped-query attention --------------------------------------
Q_ROWS, KV_ROWS = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM


def _qkv_delta(model, x):
    """What the adapted layer 0 qkv_proj adds to its base output, per output row."""
    layer = model.model.layers[0].self_attn.qkv_proj
    with torch.no_grad():
        return layer(x) - layer.base_layer(x)


@pytest.mark.parametrize("parts", [["q", "v"], ["k"], ["q", "k", "v"]])
@pytest.mark.parametrize("method", ["parallel", "merged"])
def test_phi3_gqa_parts_adapt_exactly_their_rows(parts, method):
    model = tiny_causal_lm("phi3")
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.out_features == Q_ROWS + 2 * KV_ROWS and Q_ROWS != KV_ROWS
    inject(model, LoraConfig(rank=2, targets=[f"layers.0.self_attn.qkv_proj[{','.join(parts)}]"], method=method))
    wrapper = model.model.layers[0].self_attn.qkv_proj
    assert wrapper.part_sizes == (Q_ROWS, KV_ROWS, KV_ROWS)
    with torch.no_grad():
        wrapper.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    delta = _qkv_delta(model, torch.randn(5, qkv.in_features, generator=torch.Generator().manual_seed(2)))
    rows = {"q": slice(0, Q_ROWS), "k": slice(Q_ROWS, Q_ROWS + KV_ROWS), "v": slice(Q_ROWS + KV_ROWS, None)}
    for part, block in rows.items():
        changed = delta[:, block].abs().amax(dim=0) > 0
        if part in parts:
            assert changed.all(), f"rows of {part} not all adapted"
        else:
            assert not changed.any(), f"rows of {part} changed though not selected"


def test_phi3_without_gqa_splits_in_thirds():
    model = tiny_causal_lm("phi3", num_key_value_heads=HEADS)
    inject(model, LoraConfig(rank=2, targets="attention-qv"))
    assert model.model.layers[0].self_attn.qkv_proj.part_sizes == (Q_ROWS,) * 3


def test_explicit_qkv_sizes_must_add_up():
    model = tiny_causal_lm("phi3")
    with pytest.raises(ConfigError, match="qkv_sizes.*adding up to 64"):
        inject(model, LoraConfig(targets=["qkv_proj[q]"], qkv_sizes={"qkv_proj": [32, 32, 32]}))
    inject(model, LoraConfig(targets=["qkv_proj[q]"], qkv_sizes={"qkv_proj": [48, 8, 8]}))
    assert model.model.layers[1].self_attn.qkv_proj.part_sizes == (48, 8, 8)


def test_fused_layer_whose_rows_interleave_is_adapted_whole():
    """GPT-NeoX's query_key_value interleaves q/k/v per head: no part selection, whole in presets."""
    model = tiny_causal_lm("gpt_neox", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64)
    presets = target_presets(model)
    assert "gpt_neox.layers.0.attention.query_key_value" in presets["attention"]
    assert not any("query_key_value" in n for n in presets.get("attention-qv", []))
    with pytest.raises(ConfigError, match="interleave"):
        inject(model, LoraConfig(targets=["query_key_value[q,v]"]))
    with pytest.raises(ConfigError, match="enable_lora.*interleave"):
        inject(model, LoraConfig(targets=["query_key_value"], enable_lora=["q", "v"]))
    inject(model, LoraConfig(rank=2, targets=["query_key_value"]))
    assert model.gpt_neox.layers[0].attention.query_key_value.parts is None


def test_embedding_subclasses_with_their_own_forward_are_not_adapted():
    """Gemma2 scales its token embedding in forward; OPT offsets its learned positions."""
    gemma, opt = tiny_causal_lm("gemma2"), tiny_causal_lm("opt")
    assert "embeddings" not in target_presets(gemma)
    assert target_presets(opt)["embeddings"] == ["model.decoder.embed_tokens"]
    with pytest.raises(ConfigError, match="own forward"):
        inject(gemma, LoraConfig(targets=["model.embed_tokens"]))


class OddAttention(torch.nn.Module):
    """States 4 heads, but its fused projection's 50 rows fit no split of 4 query heads."""

    num_heads = 4

    def __init__(self):
        super().__init__()
        self.qkv_proj = torch.nn.Linear(8, 50)
        self.o_proj = torch.nn.Linear(30, 8)


def test_unknown_split_is_adapted_whole_unless_qkv_sizes_gives_it():
    model = torch.nn.ModuleDict({"attn": OddAttention()})
    presets = target_presets(model)
    assert presets["attention"] == ["attn.qkv_proj", "attn.o_proj"] and "attention-qv" not in presets
    with pytest.raises(ConfigError, match="50 output rows do not fit 4 query and 4 key/value heads.*qkv_sizes"):
        inject(model, LoraConfig(targets=["qkv_proj[q,v]"]))
    given = {"attn.qkv_proj": [30, 10, 10]}
    assert target_presets(model, given)["attention-qv"] == ["attn.qkv_proj[q,v]"]
    inject(model, LoraConfig(rank=2, targets="attention-qv", qkv_sizes=given))
    assert model["attn"].qkv_proj.part_sizes == (30, 10, 10) and model["attn"].qkv_proj.lora_B.shape == (40, 2)


@pytest.mark.parametrize("sizes, match", [
    ({"qkv_proj": [32, 16]}, r"qkv_sizes\['qkv_proj'\]: got \[32, 16\]"),
    ({"qkv_proj": [32, 0, 16]}, "an integer >= 1"),
    ({"qkv_prj": [32, 16, 16]}, "qkv_sizes: got 'qkv_prj'; allowed: patterns naming fused qkv layers"),
])
def test_bad_qkv_sizes_are_refused(sizes, match):
    with pytest.raises(ConfigError, match=match):
        inject(tiny_causal_lm("phi3"), LoraConfig(targets="attention-qv", qkv_sizes=sizes))


def test_qkv_sizes_cannot_split_an_interleaved_layer():
    model = tiny_causal_lm("gpt_neox", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64)
    with pytest.raises(ConfigError, match="three blocks.*interleave"):
        inject(model, LoraConfig(targets=["query_key_value[q]"], qkv_sizes={"query_key_value": [32, 32, 32]}))


def test_pissa_on_gqa_parts_keeps_outputs_and_factors_the_selected_rows():
    model = tiny_causal_lm("phi3").double()
    ids = tokens()
    qkv = model.model.layers[0].self_attn.qkv_proj
    w0 = qkv.weight.detach().clone()
    with torch.no_grad():
        before = model(ids).logits
    inject(model, LoraConfig(rank=4, alpha=4.0, targets=["qkv_proj[q,v]"], init="pissa"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-9, atol=1e-9)
    wrapper = model.model.layers[0].self_attn.qkv_proj
    residual = wrapper.base_layer.weight.detach()
    k_rows = slice(Q_ROWS, Q_ROWS + KV_ROWS)
    assert torch.equal(residual[k_rows], w0[k_rows])                 # k keeps its full weight
    for rows in (slice(0, Q_ROWS), slice(Q_ROWS + KV_ROWS, None)):   # q and v lose their top-4 directions
        torch.testing.assert_close(torch.linalg.svdvals(residual[rows])[0], torch.linalg.svdvals(w0[rows])[4])
