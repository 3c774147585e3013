"""LoraConfig.to_peft / from_peft against the real peft 0.21 on tiny Llama and GPT-2 models built
from configs (no downloads): a PEFT model built from ``to_peft`` adapts the same modules as
``inject`` and, with the same LoRA weights, computes the same outputs (float32, rtol 1e-5,
atol 1e-6; 1e-5 with PiSSA, whose two SVD residuals agree to rounding); ``from_peft`` inverts
``to_peft`` and reads what PEFT saved; what PEFT cannot express is refused naming the field."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from lora_tune import ConfigError, LoraConfig, find_targets, inject, load_adapter, save_adapter
from lora_tune.lora.inject import lora_layers
from lora_tune.lora.adapter_sites import adapted_sites
from tests.lora.hf_models import tiny_causal_lm, tokens

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

TOKENS = tokens(batch=2, length=9)


def llama(**overrides):
    return tiny_causal_lm("llama", **overrides)


def llama_with_bias():
    return tiny_causal_lm("llama", attention_bias=True, mlp_bias=True)


def gpt2():
    return tiny_causal_lm("gpt2")


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(TOKENS).logits


def randomize(model, seed=5):
    """Nonzero LoRA factors (and shifted trainable biases / saved modules), so that a tensor left
    behind changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def quiet_peft_model(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def peft_adapted(pm) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def peft_trainable(pm) -> set[str]:
    """PEFT's trainable parameter names in lora-tune's spelling."""
    out = set()
    for n, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        n = n.removeprefix("base_model.model.").replace(".modules_to_save.default", "").replace(".base_layer", "")
        n = n.replace(".default.weight", "").replace(".default", "").replace("lora_embedding_", "lora_")
        out.add(n)
    return out


def ours_trainable(model) -> set[str]:
    return {n.replace(".base_layer", "") for n, p in model.named_parameters() if p.requires_grad}


CASES = {
    "llama-all-linear": (llama, LoraConfig(rank=4, alpha=8.0)),
    "llama-patterns-rslora": (llama, LoraConfig(rank=2, alpha=3.0, targets=["q_proj", "v_proj", "down_proj"],
                                                 rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 5},
                                                 alpha_pattern={"down_proj": 7.0})),
    "llama-bias-head": (llama_with_bias, LoraConfig(rank=3, alpha=6.0, targets="attention", bias="lora_only",
                                                    modules_to_save=["lm_head"])),
    "llama-gaussian-embeddings": (llama_with_bias, LoraConfig(rank=4, alpha=4.0, targets=["q_proj", "embed_tokens"],
                                                    init="gaussian", bias="all")),
    "llama-pissa": (llama, LoraConfig(rank=4, alpha=4.0, targets="attention-qv", init="pissa")),
    "gpt2-all-linear": (gpt2, LoraConfig(rank=4, alpha=8.0, targets="all-linear")),
    "gpt2-patterns-wte": (gpt2, LoraConfig(rank=3, alpha=5.0, targets=["c_attn", "mlp.c_proj", "wte"],
                                           rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"c_attn": 9.0})),
}
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_model_from_to_peft_matches_inject(tmp_path, case):
    """PEFT model from to_peft, random weights, saved by PEFT -> inject + load_adapter: same outputs,
    same adapted modules, same trainable tensors (GPT-2's c_attn: PEFT's one pair loads into
    lora-tune's per-part pairs)."""
    build, cfg = CASES[case]
    pm = quiet_peft_model(build(), cfg.to_peft(build()))
    randomize(pm)
    want = logits(pm)
    assert not torch.allclose(want, logits(build()), atol=1e-3)
    pm.save_pretrained(str(tmp_path))

    ours = build()
    inject(ours, cfg)
    assert {n for n, _ in lora_layers(ours)} == peft_adapted(pm)
    assert ours_trainable(ours) == peft_trainable(pm)
    load_adapter(ours, tmp_path)
    tol = dict(rtol=1e-5, atol=1e-5) if cfg.init == "pissa" else TOLERANCE
    torch.testing.assert_close(logits(ours), want, **tol)


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if c.startswith("llama")])
def test_lora_tune_weights_load_into_the_to_peft_model(tmp_path, case):
    """The other way: inject, random weights, save_adapter(format='peft') -> the PEFT model from
    to_peft takes them key for key and computes the same outputs; to_peft's fields are the
    ones save_adapter writes."""
    build, cfg = CASES[case]
    ours = build()
    inject(ours, cfg)
    randomize(ours)
    with torch.no_grad():
        want = logits(ours)
    save_adapter(ours, tmp_path, format="peft", config=cfg)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    weights = load_file(tmp_path / "adapter_model.safetensors")
    pcfg = cfg.to_peft(build())
    for key in ("r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "rank_pattern", "alpha_pattern",
                "init_lora_weights", "modules_to_save", "fan_in_fan_out"):
        assert getattr(pcfg, key) == saved[key], key
    assert set(pcfg.target_modules) == set(saved["target_modules"])
    assert pcfg.inference_mode is False and saved["inference_mode"] is True  # to_peft's config trains
    pm = quiet_peft_model(build(), pcfg)
    result = peft.set_peft_model_state_dict(pm, weights)
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(pm), want, **(dict(rtol=1e-5, atol=1e-5) if cfg.init == "pissa" else TOLERANCE))


def test_fused_qkv_is_one_pair_of_rank_r_for_peft_and_3r_in_a_saved_adapter(tmp_path):
    model = gpt2()
    cfg = LoraConfig(rank=4, alpha=8.0, targets=["c_attn"])
    pcfg = cfg.to_peft(model)
    assert pcfg.r == 4 and pcfg.rank_pattern == {} and pcfg.fan_in_fan_out is True
    inject(model, cfg)
    save_adapter(model, tmp_path, format="peft", config=cfg)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved["rank_pattern"].values()) == {12}   # lora-tune's three per-part pairs, block-diagonal


def sites(model, cfg):
    ghost = copy.deepcopy(model)
    inject(ghost, cfg)
    return [(s.name, s.kind, s.r, s.alpha, s.scaling, s.parts) for s in adapted_sites(ghost)], ours_trainable(ghost)


SCALARS = ("dropout", "method", "quant_bits", "rslora", "init", "bias", "enable_lora", "qkv_sizes")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("via", ["object", "dict", "json"])
def test_from_peft_inverts_to_peft(case, via):
    build, cfg = CASES[case]
    model = build()
    pcfg = cfg.to_peft(model)
    source = {"object": pcfg, "dict": pcfg.to_dict(), "json": json.loads(json.dumps(pcfg.to_dict(), default=sorted))}
    back = LoraConfig.from_peft(source[via])
    assert find_targets(model, back) == find_targets(model, cfg)
    assert sites(model, back) == sites(model, cfg)   # names, kinds, ranks, alphas, scalings, parts, trainables
    assert {k: getattr(back, k) for k in SCALARS} == {k: getattr(cfg, k) for k in SCALARS}
    # and again: the PEFT config of the translated config is the same
    again = back.to_peft(model)
    assert {k: v for k, v in again.to_dict().items() if k != "modules_to_save"} == \
        {k: v for k, v in pcfg.to_dict().items() if k != "modules_to_save"}
    assert again.modules_to_save == pcfg.modules_to_save


def test_config_methods_are_the_leaf_functions():
    """LoraConfig.to_peft / from_peft (the public names kept for compatibility) give exactly what
    lora_tune.lora.peft's functions give; the config module defines neither."""
    from lora_tune.lora import config as config_module
    from lora_tune.lora.peft import from_peft_config, to_peft_config

    build, cfg = CASES["gpt2-patterns-wte"]
    model = build()
    pcfg = to_peft_config(cfg, model)
    assert cfg.to_peft(model).to_dict() == pcfg.to_dict()
    assert LoraConfig.from_peft(pcfg) == from_peft_config(pcfg) == cfg.from_peft(pcfg.to_dict())
    with open(config_module.__file__, encoding="utf-8") as source:
        imports = [line for line in source if "import" in line]
    assert imports and not any("peft" in line for line in imports)


def peft_saved(tmp_path, build, **peft_kwargs):
    pm = quiet_peft_model(build(), peft.LoraConfig(**peft_kwargs))
    randomize(pm, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path))
    return pm, logits(pm)


@pytest.mark.parametrize("build, kwargs", [
    (gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], use_rslora=True, rank_pattern={"c_proj": 2},
                fan_in_fan_out=True)),
    (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], modules_to_save=["lm_head"],
                 init_lora_weights="gaussian", lora_dropout=0.1, alpha_pattern={r"layers\.1\.self_attn\.o_proj": 3})),
    (llama, dict(r=2, lora_alpha=4, target_modules=r".*layers\.0\.mlp\.(up|down)_proj", bias="all")),
], ids=["gpt2-recipe", "llama-list", "llama-regex"])
def test_config_read_from_a_peft_saved_directory_reproduces_peft(tmp_path, build, kwargs):
    pm, want = peft_saved(tmp_path, build, **kwargs)
    cfg = LoraConfig.from_peft(tmp_path)
    assert cfg.rank == kwargs["r"] and cfg.alpha == kwargs["lora_alpha"]
    assert cfg.dropout == kwargs.get("lora_dropout", 0.0) and cfg.init == ("gaussian" if "init_lora_weights" in kwargs
                                                                            else "kaiming")
    ours = build()
    inject(ours, cfg)
    assert {n for n, _ in lora_layers(ours)} == peft_adapted(pm)
    assert ours_trainable(ours) == peft_trainable(pm)
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours), want, **TOLERANCE)


def test_peft_pair_of_rank_r_on_fused_qkv_loads_with_a_repeated_per_part(tmp_path):
    pm = quiet_peft_model(gpt2(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True))
    randomize(pm, seed=2)
    pm.save_pretrained(str(tmp_path))
    ours = gpt2()
    inject(ours, LoraConfig.from_peft(tmp_path))
    load_adapter(ours, tmp_path)
    c_attn = dict(lora_layers(ours))["transformer.h.0.attn.c_attn"]
    assert c_attn.parts is not None and c_attn.lora_A.shape == (9, 32)  # three per-part pairs of rank 3
    torch.testing.assert_close(c_attn.lora_A[:3], c_attn.lora_A[6:])
    torch.testing.assert_close(logits(ours), logits(pm), **TOLERANCE)


# -- translation details ---------------------------------------------------------------------------
@pytest.mark.parametrize("fields, expected", [
    ({"target_modules": ["q_proj", "model.layers.0.mlp.up_proj"]},
     {"targets": ["q_proj", "model.layers.0.mlp.up_proj"]}),
    ({"target_modules": {"v_proj", "q_proj"}}, {"targets": ["q_proj", "v_proj"]}),
    ({"target_modules": ["h.*.attn"]}, {"targets": [r"re:(?:.*\.)?h\.\*\.attn"]}),  # PEFT: a literal name
    ({"target_modules": r".*\.q_proj"}, {"targets": [r"re:.*\.q_proj"]}),
    ({"target_modules": "all-linear"}, {"targets": "all-linear"}),
    ({"target_modules": ["q_proj"], "exclude_modules": r".*layers\.1.*"},
     {"exclude": [r"re:.*layers\.1.*"]}),
    ({"target_modules": ["q_proj"], "rank_pattern": {"q_proj": 2, r"^model\.layers\.0\.self_attn\.q_proj": 3}},
     {"rank_pattern": {r"re:(?:.*\.)?(?:q_proj)": 2, r"re:model\.layers\.0\.self_attn\.q_proj": 3}}),
    ({"target_modules": ["query"], "task_type": "SEQ_CLS"}, {"modules_to_save": ["re:.*classifier", "re:.*score"]}),
    ({"target_modules": ["query"], "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"},
     {"modules_to_save": ["re:.*classifier", "re:.*score"]}),
    ({"target_modules": ["q_proj"]}, {"rank": 8, "alpha": 8.0, "init": "kaiming"}),   # PEFT's defaults
    ({"target_modules": ["q_proj"], "fan_in_fan_out": True, "inference_mode": True, "megatron_core": "megatron.core",
      "runtime_config": {"ephemeral_gpu_offload": False}, "qalora_group_size": 16, "loftq_config": {}},
     {"rank": 8}),
])
def test_from_peft_translation(fields, expected):
    cfg = LoraConfig.from_peft(fields)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_suffix_semantics_match_peft():
    """PEFT's list matching (name or dotted suffix) and pattern keys ((.*\\.)?KEY$) on the same model."""
    model = llama()
    cfg = LoraConfig.from_peft({"target_modules": ["self_attn.q_proj", "layers.1.mlp.up_proj"],
                                "rank_pattern": {r"layers\.1\..*": 2}})
    pm = quiet_peft_model(llama(), peft.LoraConfig(target_modules=["self_attn.q_proj", "layers.1.mlp.up_proj"],
                                                   rank_pattern={r"layers\.1\..*": 2}))
    ours = {s[0]: s[2] for s in sites(model, cfg)[0]}
    theirs = {n.removeprefix("base_model.model."): m.r["default"] for n, m in pm.named_modules()
              if hasattr(m, "lora_A") and hasattr(m, "r")}
    assert ours == theirs and set(ours.values()) == {8, 2}


@pytest.mark.parametrize("fields, field", [
    ({"target_modules": ["q_proj"], "use_dora": "yes"}, "use_dora"),
    ({"target_modules": ["q_proj"], "lora_bias": True}, "lora_bias"),
    # PEFT ignores layers_to_transform for target_parameters; lora-tune's `layers` would not
    ({"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj"], "layers_to_transform": [0]},
     "target_parameters"),
    ({"target_modules": ["q_proj"], "layers_to_transform": "last"}, "layers_to_transform"),
    ({"target_modules": ["q_proj"], "megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
    ({"target_modules": ["q_proj"], "trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"target_modules": ["q_proj"], "layer_replication": [[0, 2]]}, "layer_replication"),
    ({"target_modules": ["q_proj"], "loftq_config": {"loftq_bits": 4}}, "loftq_config"),
    ({"target_modules": ["q_proj"], "ensure_weight_tying": True}, "ensure_weight_tying"),
    ({"target_modules": ["q_proj"], "some_future_option": {"on": True}}, "some_future_option"),
    ({"target_modules": ["q_proj"], "init_lora_weights": "olora"}, "init_lora_weights"),
    ({"target_modules": ["q_proj"], "init_lora_weights": "loftq"}, "init_lora_weights"),
    ({"target_modules": ["q_proj"], "init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
    ({"target_modules": ["q_proj"], "init_lora_weights": False}, "init_lora_weights"),
    ({"target_modules": None}, "target_modules"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": "(unclosed"}, "target_modules"),
    ({"target_modules": ["q_proj"], "peft_type": "IA3"}, "peft_type"),
    ({"target_modules": ["q_proj"], "r": 0}, "r"),
    ({"target_modules": ["q_proj"], "lora_alpha": -1}, "lora_alpha"),
    ({"target_modules": ["q_proj"], "lora_dropout": 1.5}, "lora_dropout"),
    ({"target_modules": ["q_proj"], "bias": "some"}, "bias"),
])
def test_from_peft_refuses_what_lora_tune_lacks_naming_the_peft_field(fields, field):
    with pytest.raises(ConfigError) as err:
        LoraConfig.from_peft(fields)
    assert err.value.field == field and field in str(err.value)


def test_from_peft_refuses_a_real_lora_bias_config_and_bad_sources(tmp_path):
    with pytest.raises(ConfigError, match="lora_bias"):
        LoraConfig.from_peft(peft.LoraConfig(target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        LoraConfig.from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "lora-tune"}))
    with pytest.raises(ValueError, match="load_adapter"):
        LoraConfig.from_peft(tmp_path)
    with pytest.raises(ConfigError, match="source"):
        LoraConfig.from_peft(42)


# -- what to_peft refuses -------------------------------------------------------------------------
class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 4)
        self.pre_classifier = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)
        self.attn = nn.MultiheadAttention(4, 2)


@pytest.mark.parametrize("build, cfg, field, fragment", [
    (gpt2, LoraConfig(targets=["c_attn"], method="merged"), "method", "parallel"),
    (gpt2, LoraConfig(targets=["c_attn[q,v]"]), "targets", "enable_lora parts ['q', 'v']"),
    (gpt2, LoraConfig(targets=["c_attn"], enable_lora=["q", "v"]), "targets", "no per-part LoRA"),
    (llama, LoraConfig(targets=["embed_tokens", "q_proj"], init="pissa"), "init", "init='pissa' on a embedding layer"),
    (gpt2, LoraConfig(targets=["wte"], init="pissa"), "init", "tied to another module"),   # inject's own check
    (Heads, LoraConfig(rank=2, targets=["attn"]), "targets", "out_proj delta twice"),
    (Heads, LoraConfig(rank=2, targets=["body"], modules_to_save=["classifier"]), "modules_to_save", "pre_classifier"),
    (gpt2, LoraConfig(targets=["nothing_like_this"]), "targets", "nothing_like_this"),   # what inject raises
])
def test_to_peft_refuses_what_peft_cannot_express(build, cfg, field, fragment):
    model = build()
    with pytest.raises(ConfigError) as err:
        cfg.to_peft(model)
    assert err.value.field == field and fragment in str(err.value)
    assert not list(lora_layers(model))


def test_to_peft_refuses_an_adapted_model():
    model = llama()
    inject(model, LoraConfig(targets=["q_proj"]))
    with pytest.raises(ConfigError, match="already carries lora-tune LoRA layers"):
        LoraConfig(targets=["v_proj"]).to_peft(model)
    pm = quiet_peft_model(llama(), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="already carries PEFT LoRA layers"):
        LoraConfig(targets=["v_proj"]).to_peft(pm)


def test_quant_bits_do_not_block_and_the_model_is_left_alone():
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = LoraConfig(rank=4, targets="attention").to_peft(model).to_dict()
    for bits, quant_type in ((4, "fp4"), (8, "nf4")):
        assert LoraConfig(rank=4, targets="attention", quant_bits=bits,
                          quant_type=quant_type).to_peft(model).to_dict() == plain
    assert not list(lora_layers(model))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def nested():
    """Modules ``0`` and ``1.0`` are both Linear: a PEFT name list ["0"] matches both (dotted suffix)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3)))


def test_target_names_that_a_peft_list_would_overmatch_become_one_regex():
    model = nested()
    cfg = LoraConfig(rank=2, targets=["re:0"])
    # the hazard is real: PEFT's list form also adapts 1.0
    assert peft_adapted(quiet_peft_model(nested(), peft.LoraConfig(r=2, target_modules=["0"]))) == {"0", "1.0"}
    pcfg = cfg.to_peft(model)
    assert pcfg.target_modules == "(?:0)"
    assert peft_adapted(quiet_peft_model(nested(), pcfg)) == {"0"}
    # a list where it is exact: both targets, or 1.0 alone (no module is named X.1.0)
    assert LoraConfig(rank=2, targets=["re:1\\.0", "re:0"]).to_peft(model).target_modules == {"0", "1.0"}
    assert LoraConfig(rank=2, targets=["re:1\\.0"]).to_peft(model).target_modules == {"1.0"}
    assert find_targets(model, LoraConfig.from_peft(pcfg)) == [("0", "Linear")]
