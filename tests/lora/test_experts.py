"""LoRA on mixture-of-experts weight stacks: the reference-checked table and the full models.

Table: expert layout x method x quant_bits x dtype. Two experts modules are stacked with a tanh
between them and a fixed routing (so the upstream module's gradients pass through an adapted
stack with B != 0); outputs and the gradients w.r.t. every A, B and the input are compared with
a float64 autograd reference that builds ``W0[e] + s * B[e] @ A[e]`` per expert from the factors
(einsum, nothing from lora_tune) and calls the ORIGINAL experts module with it
(tests/lora/reference.py). Layouts: transformers' Mixtral and Qwen2-MoE experts (experts x out x
in) and a module with ``is_transposed`` (experts x in x out).

Then on tiny Mixtral and Qwen2-MoE built from config: presets, router frozen, training, merge,
both adapter formats and PEFT's ``target_parameters`` both ways, and bad input.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lora_tune
from lora_tune import ConfigError, LoraConfig, NoMatchingModulesError, inject
from lora_tune.lora.experts import LoraExperts

from .hf_families import EXPERTS, mixtral, qwen2_moe
from .hf_models import HIDDEN, tiny_causal_lm, tokens
from .reference import merge_round_trip, randomize_lora_b, reference_call

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

R, ALPHA, TOKENS, TOP_K = 2, 4.0, 6, 2


class TransposedExperts(nn.Module):
    """Experts stored experts x in x out (``is_transposed``, as GPT-OSS's), with biases."""

    is_transposed = True

    def __init__(self, hidden: int = HIDDEN, inner: int = 12, n: int = EXPERTS):
        super().__init__()
        self.num_experts = n
        self.gate_up_proj = nn.Parameter(torch.randn(n, hidden, 2 * inner) * hidden ** -0.5)
        self.gate_up_proj_bias = nn.Parameter(torch.randn(n, 2 * inner) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(n, inner, hidden) * inner ** -0.5)

    def forward(self, x, top_k_index, top_k_weights):
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows, slot = torch.where(top_k_index == e)
            if rows.numel() == 0:
                continue
            gate, up = (x[rows] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]).chunk(2, dim=-1)
            h = (torch.nn.functional.silu(gate) * up) @ self.down_proj[e]
            out = out.index_add(0, rows, h * top_k_weights[rows, slot, None])
        return out


def _experts_of(model_builder):
    return model_builder().model.layers[0].mlp.experts


LAYOUTS = {
    "mixtral": lambda: _experts_of(mixtral),
    "qwen2_moe": lambda: _experts_of(qwen2_moe),
    "transposed": TransposedExperts,
}


class ExpertsStack(nn.Module):
    """Two experts modules with a tanh between them; routing fixed per token (every expert used)."""

    def __init__(self, layout: str):
        super().__init__()
        torch.manual_seed(0)
        self.e1 = LAYOUTS[layout]()
        torch.manual_seed(1)
        self.e2 = LAYOUTS[layout]()
        g = torch.Generator().manual_seed(2)
        index = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(TOKENS)])
        index[: EXPERTS // TOP_K] = torch.arange(EXPERTS).view(-1, TOP_K)  # every expert sees a token
        self.register_buffer("index", index)
        self.register_buffer("weights", torch.softmax(torch.randn(TOKENS, TOP_K, generator=g), -1))

    def forward(self, x):
        h = torch.tanh(self.e1(x, self.index, self.weights.to(x.dtype)))
        return self.e2(h, self.index, self.weights.to(x.dtype))


def _delta(A: torch.Tensor, B: torch.Tensor, transposed: bool) -> torch.Tensor:
    """B[e] @ A[e] per expert, in the stack's layout (the reference's own arithmetic)."""
    d = torch.einsum("eor,eri->eoi", B, A)
    return d.transpose(1, 2) if transposed else d


def run_case(layout: str, method: str, bits, dtype, seed: int = 0):
    model = ExpertsStack(layout).to(dtype)
    original = copy.deepcopy(model)
    for experts in (original.e1, original.e2):  # the reference runs in float64: transformers' eager loop
        if hasattr(experts, "config"):
            experts.config = copy.copy(experts.config)
            experts.config._experts_implementation = "eager"
    report = inject(model, LoraConfig(rank=R, alpha=ALPHA, targets=["e1", "e2"], method=method, quant_bits=bits))
    assert [n for n, _ in report.targets] == ["e1", "e2"]
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=gen).to(dtype) * 0.5)
    x = torch.randn(TOKENS, HIDDEN, generator=gen).to(dtype).requires_grad_(True)
    y = model(x)
    upstream = torch.randn(y.shape, generator=gen)
    (y.float() * upstream).sum().backward()

    params = dict(model.named_parameters())
    leaves, weights = {}, {}
    for name in ("e1", "e2"):
        wrapper = getattr(model, name)
        assert isinstance(wrapper, LoraExperts) and wrapper.params == ("gate_up_proj", "down_proj")
        for stack in wrapper.params:
            A = params[f"{name}.{stack}.lora_A"].detach().double().requires_grad_(True)
            B = params[f"{name}.{stack}.lora_B"].detach().double().requires_grad_(True)
            leaves[f"{name}.{stack}.lora_A"], leaves[f"{name}.{stack}.lora_B"] = A, B
            w0 = wrapper.base_weight(stack).detach().double()
            weights[f"{name}.{stack}"] = w0 + wrapper.scaling * _delta(A, B, layout == "transposed")
    x_ref = x.detach().double().requires_grad_(True)
    y_ref = reference_call(original, weights, (x_ref,))
    (y_ref * upstream.double()).sum().backward()
    grads = {n: (params[n].grad, leaf.grad) for n, leaf in leaves.items()}
    grads["input"] = (x.grad, x_ref.grad)
    return y, y_ref, grads, model


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", [None, 8, 4], ids=["fp", "8bit", "4bit"])
@pytest.mark.parametrize("method", ["parallel", "merged"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_outputs_and_gradients_match_reference(layout, method, bits, dtype):
    y, y_ref, grads, _ = run_case(layout, method, bits, dtype)
    out_tol, grad_tol = (1e-5, 5e-5) if dtype == torch.float32 else (5e-2, 2.5e-1)
    assert _rel(y, y_ref) < out_tol, f"output off by {_rel(y, y_ref):.2e}"
    assert len(grads) == 9
    for name, (got, want) in grads.items():
        assert got is not None, f"{name} got no gradient"
        assert _rel(got, want) < grad_tol, f"gradient of {name} off by {_rel(got, want):.2e}"


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_equals_merged(layout, bits):
    y_p, _, g_p, _ = run_case(layout, "parallel", bits, torch.float32)
    y_m, _, g_m, _ = run_case(layout, "merged", bits, torch.float32)
    assert _rel(y_p, y_m) < 1e-6
    for name in g_p:
        assert _rel(g_p[name][0], g_m[name][0]) < 1e-6, name


def _adapted(layout: str, **config):
    model = ExpertsStack(layout)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, LoraConfig(rank=R, alpha=ALPHA, targets=["e1", "e2"], **config))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_A", "lora_B")):
                p.normal_(generator=torch.Generator().manual_seed(len(n)))
    return model, before, torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("method", ["parallel", "merged"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merge_forward_and_unmerge_restores_bits(layout, method):
    model, before, x = _adapted(layout, method=method)
    y, y_merged, y_again = merge_round_trip(model, x)
    assert _rel(y_merged, y) < 1e-6
    assert torch.equal(y_again, y)
    state = model.state_dict()
    for key, value in before.items():
        head, _, rest = key.partition(".")
        assert torch.equal(state[f"{head}.base_layer.{rest}"] if head in ("e1", "e2") else state[key], value), key


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_merge_and_unload_gives_the_plain_module_with_same_outputs(layout, bits):
    model, _, x = _adapted(layout, quant_bits=bits)
    with torch.no_grad():
        y = model(x)
        plain = lora_tune.merge_and_unload(model)
        y_plain = plain(x)
    assert type(plain.e1) is type(LAYOUTS[layout]()) and not list(lora_tune.lora_layers(plain))
    assert plain.e1.gate_up_proj.dtype == torch.float32 and plain.e1.gate_up_proj.shape[0] == EXPERTS
    assert _rel(y_plain, y) < 1e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pissa_keeps_outputs_and_factors_each_expert(layout):
    model = ExpertsStack(layout).double()
    for experts in (model.e1, model.e2):  # float64: transformers' eager loop (grouped_mm has no double)
        if hasattr(experts, "config"):
            experts.config._experts_implementation = "eager"
    x = torch.randn(TOKENS, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w0 = model.e1.gate_up_proj.detach().clone()
    with torch.no_grad():
        y = model(x)
    inject(model, LoraConfig(rank=R, alpha=ALPHA, targets=["e1", "e2"], init="pissa"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-9, atol=1e-9)
    residual = model.e1.base_layer.gate_up_proj.detach()
    for e in range(EXPERTS):  # each expert loses its own top-R directions
        m0, m1 = (w[e].t() if layout == "transposed" else w[e] for w in (w0, residual))
        torch.testing.assert_close(torch.linalg.svdvals(m1)[0], torch.linalg.svdvals(m0)[R])


def test_dropout_drops_entries_of_A_in_training_only():
    model, _, x = _adapted("mixtral", dropout=0.5)
    reference, _, _ = _adapted("mixtral")
    reference.load_state_dict(model.state_dict())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        model.train()
        assert not torch.equal(model(x), reference(x))


def test_frozen_weights_unchanged_after_optimizer_steps():
    model = ExpertsStack("qwen2_moe")
    inject(model, LoraConfig(rank=R, targets=["e1", "e2"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(lora) == sorted(f"{e}.{s}.lora_{f}" for e in ("e1", "e2") for s in ("gate_up_proj", "down_proj")
                                  for f in "AB")
    assert lora["e1.gate_up_proj.lora_A"].shape == (EXPERTS, R, HIDDEN)
    assert lora["e1.down_proj.lora_B"].shape == (EXPERTS, HIDDEN, R)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(TOKENS, HIDDEN)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    assert all(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)


def test_each_expert_gets_its_own_pair_initialised_like_a_linear():
    model = ExpertsStack("mixtral")
    inject(model, LoraConfig(rank=4, targets=["e1"]))
    A, B = model.e1.gate_up_proj.lora_A, model.e1.gate_up_proj.lora_B
    bound = 1 / HIDDEN ** 0.5
    assert torch.all(B == 0) and A.abs().max() <= bound and A.abs().max() > 0.5 * bound
    assert not torch.equal(A[0], A[1])  # independent pairs, not one shared A


# -- full models ------------------------------------------------------------------------------
MODELS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe}
ROUTERS = {"mixtral": ("mlp.gate.weight",), "qwen2_moe": ("mlp.gate.weight", "mlp.shared_expert_gate.weight")}


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("family", list(MODELS))
def test_all_linear_trains_experts_and_keeps_the_router_frozen(family, bits):
    model = MODELS[family]()
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits
    report = inject(model, LoraConfig(rank=2, targets="all-linear", quant_bits=bits))
    assert {n for n, _ in report.targets} >= {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert "model.layers.0.mlp.experts.gate_up_proj" in report.resolved_names
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0 if bits is None else 0.5)
    routers = {f"model.layers.{i}.{r}": model.get_parameter(f"model.layers.{i}.{r}").detach().clone()
               for i in range(2) for r in ROUTERS[family]}
    assert not any(model.get_parameter(n).requires_grad for n in routers)
    experts_B = model.model.layers[0].mlp.experts.down_proj.lora_B
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert experts_B.abs().sum() > 0
    for n, value in routers.items():
        assert torch.equal(model.get_parameter(n), value), f"router {n} moved"


@pytest.mark.parametrize("family", list(MODELS))
def test_lora_tune_format_round_trip(family, tmp_path):
    model = MODELS[family]()
    inject(model, LoraConfig(rank=2, targets="experts", layers={"last": 1}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = tokens()
    with torch.no_grad():
        y = model(ids).logits
    lora_tune.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["modules"]["model.layers.1.mlp.experts"]["kind"] == "experts"
    assert meta["target_modules"] == ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    fresh = MODELS[family]()
    lora_tune.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, y)
    lora_tune.load_adapter(fresh, tmp_path)  # into a model that already carries the layers


# -- PEFT's target_parameters, both ways ----------------------------------------------------------
peft = pytest.importorskip("peft")


def _forward(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("targets", ["all-linear", "experts", ["down_proj"]])
@pytest.mark.parametrize("family", list(MODELS))
def test_to_peft_adapts_the_same_stacks_in_peft(family, targets):
    base = MODELS[family]()
    cfg = LoraConfig(rank=2, alpha=4.0, targets=targets, rank_pattern={"model.layers.1.mlp.experts": 3})
    peft_config = cfg.to_peft(base)
    assert peft_config.target_parameters
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config)
    ours = copy.deepcopy(base)
    inject(ours, cfg)

    def shapes(model, strip):
        return {strip(n): tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}

    peft_shapes = shapes(theirs, lambda n: n.replace("base_model.model.", "").replace(".default", ""))
    expected = {}
    for n, p in ours.named_parameters():
        if "lora_" not in n:
            continue
        module, _, leaf = n.rpartition(".")
        holder, _, stack = module.rpartition(".")
        if holder.endswith("experts"):
            params = ours.get_submodule(holder).params
            path = holder + ".base_layer" * (len(params) - 1 - params.index(stack))
            e, r = p.shape[0], p.shape[1] if leaf == "lora_A" else p.shape[2]
            expected[f"{path}.{leaf}.weight"] = (e * r, p.shape[2]) if leaf == "lora_A" else (p.shape[1], e * r)
        else:
            expected[f"{module}.{leaf}.weight"] = tuple(p.shape)
    assert peft_shapes == expected


@pytest.mark.parametrize("family", list(MODELS))
def test_adapters_move_between_lora_tune_and_peft_with_the_same_outputs(family, tmp_path):
    base = MODELS[family]()
    ids = tokens()
    model = copy.deepcopy(base)
    inject(model, LoraConfig(rank=2, alpha=4.0, targets="all-linear", rank_pattern={"model.layers.0.mlp.experts": 3}))
    randomize_lora_b(model)
    y = _forward(model, ids)
    ours = tmp_path / "ours"
    lora_tune.save_adapter(model, ours, format="peft")
    meta = json.loads((ours / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.experts.gate_up_proj" in meta["target_parameters"]
    assert meta["rank_pattern"] == {r"^model\.layers\.0\.mlp\.experts\.gate_up_proj": 3,
                                    r"^model\.layers\.0\.mlp\.experts\.down_proj": 3}
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), ours).eval()
    torch.testing.assert_close(_forward(in_peft, ids), y, rtol=1e-5, atol=1e-5)
    theirs = tmp_path / "theirs"
    in_peft.save_pretrained(theirs)
    back = copy.deepcopy(base)
    lora_tune.load_adapter(back, theirs)
    torch.testing.assert_close(_forward(back, ids), y, rtol=1e-5, atol=1e-5)
    lora_tune.load_adapter(back, theirs)  # into the adapted model
    torch.testing.assert_close(_forward(back, ids), y, rtol=1e-5, atol=1e-5)


def test_a_peft_trained_expert_adapter_loads_with_peft_outputs(tmp_path):
    base = mixtral()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.down_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    randomize_lora_b(theirs)
    ids = tokens()
    y = _forward(theirs, ids)
    theirs.save_pretrained(tmp_path)
    cfg = LoraConfig.from_peft(tmp_path)
    assert cfg.targets == ["experts.down_proj"]  # PEFT's rule: the name or a dotted suffix, as lora-tune's
    model = copy.deepcopy(base)
    lora_tune.load_adapter(model, tmp_path)
    assert model.model.layers[0].mlp.experts.params == ("down_proj",)
    torch.testing.assert_close(_forward(model, ids), y, rtol=1e-5, atol=1e-5)


# -- bad input ------------------------------------------------------------------------------------
def _untouched(model, before):
    assert not list(lora_tune.lora_layers(model))
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())


@pytest.mark.parametrize("config, error, match", [
    (LoraConfig(targets="experts"), ConfigError,
     r"targets: got 'experts'; allowed: presets this model has: .*LlamaForCausalLM has no expert weight stacks"),
    (LoraConfig(targets=["experts.gate_up_proj"]), NoMatchingModulesError, r"experts\.gate_up_proj"),
])
def test_experts_on_a_dense_model_are_refused_and_the_model_is_untouched(config, error, match):
    model = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        inject(model, config)
    _untouched(model, before)


@pytest.mark.parametrize("config, field, match", [
    (LoraConfig(targets=["experts[q,v]"]), "targets", "part selectors"),
    (LoraConfig(targets="experts", use_dora=True), "use_dora", "MixtralExperts"),
    (LoraConfig(targets="experts", layers={"last": 3}), "layers.last", "1 to 2: model.layers has 2 blocks"),
    (LoraConfig(targets=["model.layers.0.mlp.experts.gate_up_proj"], layers=[1]), "layers",
     "matches only layers outside"),
    (LoraConfig(targets=["model.layers.0.mlp.gate"]), None, "MixtralTopKRouter"),
])
def test_bad_expert_targets_name_the_field_and_leave_the_model_untouched(config, field, match):
    model = mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match) as err:
        inject(model, config)
    if field is not None:
        assert err.value.field == field
    _untouched(model, before)


def test_to_peft_refuses_dropout_on_expert_stacks():
    with pytest.raises(ConfigError, match="dropout.*target_parameters") as err:
        LoraConfig(targets="experts", dropout=0.1).to_peft(mixtral())
    assert err.value.field == "dropout"
