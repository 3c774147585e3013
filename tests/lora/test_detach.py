"""``detach``: one resident base, fresh adapters per trial (issue 18).

For every variant (plain LoRA with either method, PiSSA, bias training, modules_to_save, nested
ranks, DoRA, expert stacks, nn.MultiheadAttention, a base quantized at inject, a base loaded
quantized (QuantizedLinear), a merged model, two stacked injects, and a small HF Llama for the
plain, PiSSA and pre-quantized cases): inject -> 3 AdamW steps -> detach leaves the base exactly
as it was: every tensor bit for bit (buffers and quantized weights too), the same parameter and
module objects, requires_grad, gradients, plain attributes (training flags, the nested-tensor
flag) and no LoRA module; and the same trial run twice on one resident base (another trial in
between) and once on a deep copy of the pristine base gives bit-identical losses and factors.

Then LoRA over a QuantizedLinear against LoRA over an nn.Linear holding its dequantized weight
and a float64 autograd reference; PiSSA, merging and adapter files over it; presets.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_tune
from lora_tune import ConfigError, LoraConfig
from lora_tune.lora import detach
from lora_tune.lora.adapter_base import _LoraState
from lora_tune.lora.attachment import ATTACHED, Attachment
from lora_tune.lora.nested import NestedRanks, set_active_rank, truncated
from lora_tune.lora.quant import QuantizedLinear, QuantizedWeight

from .hf_families import mixtral
from .hf_models import tiny_causal_lm, tokens
from .reference import dora_weight, randomize_lora_b, reference_call

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

STEPS = 3
NESTED = NestedRanks(ranks=(2, 4), alphas=(4.0, 8.0))


# -- models --------------------------------------------------------------------------------------
def net(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(16, 32), act=nn.Tanh(), norm=nn.BatchNorm1d(32) if batchnorm else nn.LayerNorm(32),
        fc2=nn.Linear(32, 32), act2=nn.Tanh(), head=nn.Linear(32, 8))).eval()


def encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2).eval()  # use_nested_tensor stays on: inject turns it off


def prequantize(model: nn.Module, bits: int, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Every nn.Linear (but ``skip``) replaced by a QuantizedLinear: a base loaded in 4 or 8 bits."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in skip:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, QuantizedLinear.from_linear(m, bits))
    return model


def llama(seed: int = 0) -> nn.Module:
    return tiny_causal_lm("llama", seed)


# -- the cases ---------------------------------------------------------------------------------------
def _net_batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)


def _mha_batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 6, 16, generator=g), torch.randn(4, 6, 16, generator=g)


def _mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


KINDS: dict[str, tuple[Callable[[int], Any], Callable[[Any, Any], torch.Tensor], LoraConfig]] = {
    # kind -> (batch of a step, loss, another trial's config run on the resident base in between)
    "net": (_net_batch, _mse, LoraConfig(rank=2, targets=["fc2"], bias="all", quant_bits=8)),
    "mha": (_mha_batch, _mse, LoraConfig(rank=2, targets=["linear1"], bias="all")),
    "lm": (lambda step: tokens(2, 8, seed=step), _lm_loss, LoraConfig(rank=2, targets="mlp", bias="all",
                                                                      init="gaussian")),
}
NET_ALL = ["fc1", "fc2", "head"]


@dataclass
class Case:
    build: Callable[[], nn.Module]
    config: LoraConfig
    kind: str = "net"
    merge: bool = False                       # merge() after training, before the evaluation and detach
    nested: bool = False                      # train with nested rank dropout, score rank 2 too
    then: list[LoraConfig] = field(default_factory=list)  # further injects stacked on the first

    @property
    def batch(self):
        return KINDS[self.kind][0]

    @property
    def loss(self):
        return KINDS[self.kind][1]


CASES = {
    "plain-parallel": Case(net, LoraConfig(targets=NET_ALL)),
    "plain-merged-method": Case(net, LoraConfig(targets=NET_ALL, method="merged", dropout=0.1)),
    "pissa": Case(net, LoraConfig(rank=4, targets=NET_ALL, init="pissa")),
    "bias-all": Case(net, LoraConfig(targets=["fc1"], bias="all")),
    "bias-lora-only": Case(net, LoraConfig(targets=["fc1", "head"], bias="lora_only")),
    "modules-to-save": Case(lambda: net(batchnorm=True), LoraConfig(targets=["fc1"], modules_to_save=["norm", "head"])),
    "nested": Case(net, LoraConfig(rank=4, alpha=8.0, targets=NET_ALL), nested=True),
    "dora": Case(net, LoraConfig(targets=NET_ALL, use_dora=True)),
    "dora-pissa-quant4": Case(net, LoraConfig(targets=NET_ALL, use_dora=True, init="pissa", quant_bits=4)),
    "experts": Case(mixtral, LoraConfig(rank=2, targets="experts", init="pissa"), kind="lm"),
    "mha-merged": Case(encoder, LoraConfig(rank=2, targets=["self_attn"], method="merged"), kind="mha"),
    "quant4": Case(net, LoraConfig(targets=NET_ALL, quant_bits=4)),
    "quant8": Case(net, LoraConfig(targets=NET_ALL, quant_bits=8, bias="all")),
    "prequantized4": Case(lambda: prequantize(net(), 4), LoraConfig(targets=NET_ALL, bias="lora_only")),
    "prequantized8-pissa-dora": Case(lambda: prequantize(net(), 8),
                                     LoraConfig(rank=4, targets=NET_ALL, init="pissa", use_dora=True)),
    "prequantized-mixed": Case(lambda: prequantize(net(), 4, skip=("fc2",)), LoraConfig(targets=NET_ALL, quant_bits=8)),
    "merged-model": Case(net, LoraConfig(targets=NET_ALL, init="pissa", bias="all"), merge=True),
    "merged-model-quant4": Case(net, LoraConfig(targets=NET_ALL, quant_bits=4), merge=True),
    "stacked": Case(net, LoraConfig(targets=["fc1"], bias="all"),
                    then=[LoraConfig(rank=2, targets=["fc2"], init="pissa", modules_to_save=["head"])]),
    "llama-plain": Case(llama, LoraConfig(rank=4, targets="all-linear"), kind="lm"),
    "llama-pissa": Case(llama, LoraConfig(rank=4, targets="attention", init="pissa", bias="all"), kind="lm"),
    "llama-prequantized4": Case(lambda: prequantize(llama(), 4), LoraConfig(rank=4, targets="all-linear"), kind="lm"),
    "llama-prequantized8-pissa": Case(lambda: prequantize(llama(), 8), LoraConfig(rank=4, targets="attention-qv",
                                                                                  init="pissa"), kind="lm"),
}


def run_trial(model: nn.Module, case: Case, config: LoraConfig | None = None, seed: int = 0):
    """One trial: seeded inject(s), 3 AdamW steps, an evaluation; (losses, trained tensors)."""
    torch.manual_seed(seed)
    configs = [config] if config is not None else [case.config, *case.then]
    for c in configs:
        lora_tune.inject(model, c)
    nested = case.nested and config is None
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(STEPS):
        opt.zero_grad()
        if nested:
            set_active_rank(model, NESTED, NESTED.ranks[step % 2])
        case.loss(model, case.batch(step)).backward()
        opt.step()
    model.eval()
    if nested:
        set_active_rank(model, NESTED, None)
    if case.merge and config is None:
        lora_tune.merge(model)
    with torch.no_grad():
        losses = [case.loss(model, case.batch(99))]
        if nested:
            with truncated(model, NESTED, 2):
                losses.append(case.loss(model, case.batch(99)))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# -- what "exactly as it was" means ---------------------------------------------------------------
def _quant_tensors(q: QuantizedWeight) -> dict[str, torch.Tensor]:
    out = {n: b.clone() for n, b in q.named_buffers()}
    state = q._state
    while state is not None:
        out.update({f"{id(state)}.{k}": v.clone() for k, v in vars(state).items() if isinstance(v, torch.Tensor)})
        state = getattr(state, "state2", None)
    return out


def snapshot(model: nn.Module) -> dict[str, Any]:
    plain = (bool, int, float, str, type(None))
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},   # non-persistent ones too
        "params": [(n, id(p), p.requires_grad, p.grad is None) for n, p in model.named_parameters()],
        "modules": [(n, id(m), {k: v for k, v in vars(m).items() if isinstance(v, plain)})
                    for n, m in model.named_modules(remove_duplicate=False)],
        "quant": {n: (id(q), _quant_tensors(q)) for n, q in model.named_modules() if isinstance(q, QuantizedWeight)},
        "dict": sorted(k for k in model.__dict__ if k.startswith("_lora_tune")),
    }


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_as_before(model: nn.Module, before: dict[str, Any]) -> None:
    now = snapshot(model)
    _equal(now["state"], before["state"])
    _equal(now["buffers"], before["buffers"])
    assert now["params"] == before["params"]  # names, the same objects, requires_grad, no gradient
    assert now["modules"] == before["modules"]  # the same module objects, training and other flags
    assert list(now["quant"]) == list(before["quant"])
    for n, (qid, tensors) in now["quant"].items():
        assert qid == before["quant"][n][0]
        _equal(tensors, before["quant"][n][1])
    assert now["dict"] == before["dict"] == []
    assert not any(isinstance(m, _LoraState) for m in model.modules())


# -- the tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_detach_gives_the_base_back_bit_for_bit(name):
    case = CASES[name]
    model = case.build()
    before = snapshot(model)
    run_trial(model, case)
    assert isinstance(model.__dict__[ATTACHED], Attachment)
    if case.then:
        assert model.__dict__[ATTACHED].previous is not None
    assert detach(model) is model
    assert_as_before(model, before)


@pytest.mark.parametrize("name", list(CASES))
def test_a_trial_on_the_resident_base_equals_one_on_a_fresh_copy(name):
    """The same seeded trial, twice on one resident base with another trial between them, and once
    on a deep copy of the pristine base: bit-identical losses and trained tensors (fp32, CPU)."""
    case = CASES[name]
    resident = case.build()
    fresh = copy.deepcopy(resident)
    first = run_trial(resident, case)
    detach(resident)
    run_trial(resident, case, config=KINDS[case.kind][2], seed=1)
    detach(resident)
    again = run_trial(resident, case)
    detach(resident)
    reference = run_trial(fresh, case)
    for got in (first, again):
        assert all(torch.equal(a, b) for a, b in zip(got[0], reference[0]))
        _equal(got[1], reference[1])
    assert any("lora_A" in k for k in reference[1]) and any("lora_B" in k for k in reference[1])


def test_detach_refuses_a_model_with_nothing_attached():
    model = net()
    with pytest.raises(ConfigError, match="nothing is attached"):
        detach(model)
    lora_tune.inject(model, LoraConfig(targets=["fc1"]))
    detach(model)
    with pytest.raises(ConfigError, match="nothing is attached"):
        lora_tune.detach(model)  # the top-level export, twice
    lora_tune.inject(model, LoraConfig(targets=["fc1"]))
    lora_tune.merge_and_unload(model)
    with pytest.raises(ConfigError, match="merge_and_unload"):
        detach(model)


def test_pissa_leaves_the_base_tensors_unwritten_while_attached():
    model = net()
    weights = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    lora_tune.inject(model, LoraConfig(rank=4, targets=NET_ALL, init="pissa"))
    for n, (p, value) in weights.items():
        assert torch.equal(p, value), n  # the residual is a new parameter of the base layer
    assert model.fc1.base_layer.weight is not weights["fc1.weight"][0]
    detach(model)
    assert model.fc1.weight is weights["fc1.weight"][0]


def test_a_failure_while_committing_reverts_what_was_done(monkeypatch):
    """The second wrapper's install fails after the first was swapped in: all of it is undone."""
    from lora_tune.lora.layers import LoraLinear

    model = net()
    before = snapshot(model)
    calls = []
    real = LoraLinear.install_base

    def install(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "install_base", install)
    with pytest.raises(RuntimeError, match="boom"):
        lora_tune.inject(model, LoraConfig(targets=NET_ALL, init="pissa", bias="all", quant_bits=4))
    assert_as_before(model, before)


# -- LoRA over a QuantizedLinear -----------------------------------------------------------------------
def _quantized_pair(bits: int, seed: int = 0, original: nn.Linear | None = None):
    """A QuantizedLinear of ``original`` (default: a seeded nn.Linear(64, 32)) and an nn.Linear holding its
    dequantized weight and the same bias."""
    torch.manual_seed(seed)
    q = QuantizedLinear.from_linear(original or nn.Linear(64, 32), bits)
    dense = nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight.copy_(q.qweight.dequantize())
        dense.bias.copy_(q.bias)
    return q, dense


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("method", ["parallel", "merged"])
@pytest.mark.parametrize("bits", [4, 8])
def test_lora_over_a_quantized_linear_is_lora_over_its_dequantized_weight(bits, method, use_dora):
    q, dense = _quantized_pair(bits)
    models = nn.Sequential(q, nn.Tanh(), nn.Linear(32, 8)), nn.Sequential(dense, nn.Tanh(), nn.Linear(32, 8))
    models[1][2].load_state_dict(models[0][2].state_dict())
    config = LoraConfig(rank=4, alpha=8.0, targets=["0"], method=method, use_dora=use_dora)
    for m in models:
        torch.manual_seed(1)
        lora_tune.inject(m, config)
        torch.manual_seed(2)
        randomize_lora_b(m)
    wq, wd = models[0][0], models[1][0]
    assert wq.base_weight_q is q.qweight  # shared: not copied, not quantized again
    trained = [sorted(n for n, p in w.named_parameters() if p.requires_grad) for w in (wq, wd)]
    assert trained[0] == trained[1] == ["lora_A", "lora_B"] + (["lora_magnitude"] if use_dora else [])
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    grads = []
    for m in models:
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.pow(2).sum().backward()
        grads.append((y.detach(), xi.grad, *(p.grad for n, p in m.named_parameters() if p.requires_grad)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and an independent float64 reference over the dequantized weight
    A, B = wq.lora_A.detach().double(), wq.lora_B.detach().double()
    w = dense.weight.detach().double() + wq.scaling * B @ A
    if use_dora:
        w = dora_weight("linear", w, wq.lora_magnitude.detach().double())
    ref = reference_call(dense, {"weight": w, "bias": q.bias.detach()}, (x.double(),))
    torch.testing.assert_close(wq(x).double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_pissa_over_a_quantized_linear_quantizes_its_residual_into_a_new_weight(bits):
    torch.manual_seed(0)
    original = nn.Linear(64, 32)
    q, _ = _quantized_pair(bits, original=original)
    shared = _quant_tensors(q.qweight)
    model = nn.Sequential(q)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base_out = model(x)
        noise = (base_out - original(x)).norm() / base_out.norm()  # the base's own quantization error
    lora_tune.inject(model, LoraConfig(rank=8, targets=["0"], init="pissa"))
    w = model[0]
    assert w.base_weight_q is not q.qweight and w.base_weight_q.bits == bits
    assert w.base_weight_q.quant_type == q.qweight.quant_type
    _equal(_quant_tensors(q.qweight), shared)
    # W_res (quantized) + s*B@A stays close to the dequantized base: the residual's rounding
    # differs, by less than the base's own quantization error (the residual is the smaller matrix)
    with torch.no_grad():
        rel = (model(x) - base_out).norm() / base_out.norm()
    assert 0 < rel < noise
    detach(model)
    assert model[0] is q and q.qweight is not None


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_unmerge_and_unload_over_a_quantized_linear(bits):
    q, _ = _quantized_pair(bits)
    model = nn.Sequential(q)
    lora_tune.inject(model, LoraConfig(rank=4, targets=["0"]))
    randomize_lora_b(model)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x)
        lora_tune.merge(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        lora_tune.unmerge(model)
        assert torch.equal(model(x), y)
        expected = q.qweight.dequantize() + model[0].delta_weight()
    shared = _quant_tensors(q.qweight)
    lora_tune.merge_and_unload(model)
    assert type(model[0]) is nn.Linear and model[0].bias is q.bias
    assert torch.equal(model[0].weight, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    _equal(_quant_tensors(q.qweight), shared)


def test_presets_and_coverage_see_quantized_linears_as_linears():
    dense, quantized = llama(), prequantize(llama(), 4)
    assert lora_tune.target_presets(quantized) == lora_tune.target_presets(dense)
    for targets in ("all-linear", "attention", "mlp", "attention-qv"):
        config = LoraConfig(targets=targets)
        assert [n for n, _ in lora_tune.find_targets(quantized, config)] == [
            n for n, _ in lora_tune.find_targets(dense, config)]
        assert lora_tune.target_coverage(quantized, config).share == lora_tune.target_coverage(dense, config).share
    types = {t for _, t in lora_tune.find_targets(quantized, LoraConfig(targets="all-linear"))}
    assert types == {"QuantizedLinear"}


@pytest.mark.parametrize("fmt", ["lora-tune", "peft"])
def test_adapters_over_quantized_linears_save_and_load_like_over_linears(tmp_path, fmt):
    from safetensors.torch import load_file

    config = LoraConfig(rank=4, targets="all-linear", bias="lora_only")
    dense, quantized = llama(), prequantize(llama(), 4)
    files = {}
    for name, model in (("dense", dense), ("quantized", quantized)):
        torch.manual_seed(0)
        lora_tune.inject(model, config)
        randomize_lora_b(model)
        path = lora_tune.save_adapter(model, tmp_path / name, format=fmt)
        files[name] = {k: v.shape for k, v in load_file(str(next(path.glob("*.safetensors")))).items()}
    assert files["quantized"] == files["dense"]
    ids = tokens()
    with torch.no_grad():
        expected = quantized(input_ids=ids).logits
    fresh = prequantize(llama(), 4)
    lora_tune.load_adapter(fresh, tmp_path / "quantized")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected)
    detach(quantized)
    lora_tune.load_adapter(quantized, tmp_path / "quantized")  # into the resident base again
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=ids).logits, expected)
