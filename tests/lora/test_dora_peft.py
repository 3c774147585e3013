"""DoRA interop against the real peft 0.21 (tiny models built from configs, no downloads): an
adapter lora-tune saves with ``use_dora`` loads into ``peft.PeftModel`` with the same outputs, one
PEFT saved loads into lora-tune with PEFT's outputs, a training step (dropout on) gives the same
loss and gradients, and ``LoraConfig.to_peft`` / ``from_peft`` carry ``use_dora`` both ways.
Tolerance: float32, rtol 1e-5, atol 1e-6 (1e-5 for gradients and convs: summation order)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from lora_tune import AdapterFormatError, LoraConfig, inject, load_adapter, save_adapter
from lora_tune.lora.inject import lora_layers
from tests.lora.hf_models import tiny_causal_lm, tokens

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = tokens(batch=2, length=9)
TOL = {"rtol": 1e-5, "atol": 1e-6}


def gpt2():
    return tiny_causal_lm("gpt2")


def llama():
    return tiny_causal_lm("llama")


def bert(dropout: float = 0.0):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, (3, 2), padding=1)
        self.c3 = nn.Conv3d(3, 4, 2, stride=(1, 2, 1), bias=False)

    def forward(self, x):
        return torch.cat([self.c1(x[..., 0, 0]).flatten(1), self.c2(x[..., 0]).flatten(1), self.c3(x).flatten(1)], 1)


CONV_X = torch.randn(2, 3, 6, 6, 6, generator=torch.Generator().manual_seed(0))


def outputs(model):
    model.eval()
    with torch.no_grad():
        base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
        if isinstance(base, Convs):
            return model(CONV_X)
        return model(TOKENS).logits


def randomize(model, seed=5):
    """Nonzero A and B, and magnitudes away from the norms they start at."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


CASES = {
    # c_attn (fused q/k/v, GPT-2 Conv1D layout), c_proj / c_fc (Conv1D), wte (Embedding)
    "gpt2": (gpt2, LoraConfig(rank=4, alpha=8.0, targets=["c_attn", "c_proj", "c_fc", "wte"], use_dora=True)),
    "llama-all-linear": (llama, LoraConfig(rank=2, alpha=6.0, use_dora=True, rslora=True)),
    "bert-embeddings-head": (bert, LoraConfig(rank=4, alpha=16.0, targets=["query", "value", "word_embeddings"],
                                              modules_to_save=["classifier"], use_dora=True)),
    "llama-pissa": (llama, LoraConfig(rank=4, alpha=4.0, targets="attention-qv", init="pissa", use_dora=True)),
    "convs": (Convs, LoraConfig(rank=2, alpha=5.0, targets=["c1", "c2", "c3"], use_dora=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_dora_adapter_gives_the_same_outputs_in_peft(tmp_path, case):
    build, cfg = CASES[case]
    model = build()
    inject(model, cfg)
    randomize(model)
    ours = outputs(model)
    assert not torch.allclose(ours, outputs(build()), atol=1e-3)
    save_adapter(model, tmp_path, format="peft", config=cfg)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    pm = quiet(peft.PeftModel.from_pretrained, build(), str(tmp_path))
    assert any(n.endswith("lora_magnitude_vector.default.weight") for n, _ in pm.named_parameters())
    tol = {"rtol": 1e-5, "atol": 1e-5} if case in ("convs", "llama-pissa") else TOL
    torch.testing.assert_close(outputs(pm), ours, **tol)
    again = build()  # and back through lora-tune's PEFT reader
    load_adapter(again, tmp_path)
    assert all(w.use_dora for _, w in lora_layers(again))
    torch.testing.assert_close(outputs(again), ours, **tol)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_dora_adapter_loads_with_peft_outputs(tmp_path, case):
    """PEFT's own model from to_peft, saved by PEFT, into a fresh model and into an injected one."""
    build, cfg = CASES[case]
    pm = quiet(peft.get_peft_model, build(), cfg.to_peft(build()))
    randomize(pm, seed=11)
    want = outputs(pm)
    quiet(pm.save_pretrained, str(tmp_path))
    tol = {"rtol": 1e-5, "atol": 1e-5} if case in ("convs", "llama-pissa") else TOL
    fresh = build()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(outputs(fresh), want, **tol)
    injected = build()
    inject(injected, cfg)
    load_adapter(injected, tmp_path)
    torch.testing.assert_close(outputs(injected), want, **tol)


def test_a_training_step_with_dropout_matches_peft(tmp_path):
    """PEFT applies dropout to the input of the DoRA branch and of its base correction; lora-tune
    does the same with one mask per layer, so with the same seed the losses and the gradients of
    A, B and the magnitude agree."""
    cfg = LoraConfig(rank=4, alpha=8.0, targets=["query", "value", "dense"], dropout=0.2, use_dora=True)
    ours = bert(dropout=0.1)
    inject(ours, cfg)
    randomize(ours)
    save_adapter(ours, tmp_path, format="peft", config=cfg)
    pm = quiet(peft.get_peft_model, bert(dropout=0.1), cfg.to_peft(bert()))
    from safetensors.torch import load_file

    assert not peft.set_peft_model_state_dict(pm, load_file(tmp_path / "adapter_model.safetensors")).unexpected_keys
    labels = torch.tensor([0, 2])
    grads = []
    for model in (ours, pm):
        model.train()
        torch.manual_seed(7)
        loss = model(input_ids=TOKENS, labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), {_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_ours, g_ours), (loss_peft, g_peft) = grads
    torch.testing.assert_close(loss_ours, loss_peft, **TOL)
    assert g_ours.keys() == g_peft.keys() and any("magnitude" in k for k in g_ours)
    for key in g_ours:
        torch.testing.assert_close(g_ours[key], g_peft[key], rtol=1e-4, atol=1e-5, msg=key)
    # and dropout was on: a second step with another seed differs
    ours.zero_grad()
    torch.manual_seed(8)
    assert not torch.allclose(ours(input_ids=TOKENS, labels=labels).loss, loss_ours)


def _name(n: str) -> str:
    n = n.removeprefix("base_model.model.").replace(".base_layer", "").replace(".default.weight", "")
    return n.replace(".default", "").replace("lora_magnitude_vector", "lora_magnitude").replace(".modules_to_save", "")


def test_to_peft_and_from_peft_carry_use_dora():
    pcfg = LoraConfig(rank=4, targets=["q_proj"], use_dora=True).to_peft(llama())
    assert pcfg.use_dora is True
    assert LoraConfig(rank=4, targets=["q_proj"]).to_peft(llama()).use_dora is False
    assert LoraConfig.from_peft(pcfg).use_dora is True
    assert LoraConfig.from_peft({"target_modules": ["q_proj"], "use_dora": True}).use_dora is True
    assert LoraConfig.from_peft({"target_modules": ["q_proj"]}).use_dora is False


def test_dora_mismatch_between_adapter_and_injected_model_is_refused(tmp_path):
    pm = quiet(peft.get_peft_model, bert(), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    quiet(pm.save_pretrained, str(tmp_path / "dora"))
    plain = bert()
    inject(plain, LoraConfig(rank=2, alpha=8.0, targets=["query"]))
    with pytest.raises(AdapterFormatError, match="use_dora=False in the model but the adapter has use_dora=True"):
        load_adapter(plain, tmp_path / "dora")
    pm = quiet(peft.get_peft_model, bert(), peft.LoraConfig(r=2, target_modules=["query"]))
    quiet(pm.save_pretrained, str(tmp_path / "plain"))
    dora = bert()
    inject(dora, LoraConfig(rank=2, alpha=8.0, targets=["query"], use_dora=True))
    with pytest.raises(AdapterFormatError, match="use_dora=True in the model"):
        load_adapter(dora, tmp_path / "plain")


def test_a_magnitude_missing_from_a_dora_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = quiet(peft.get_peft_model, bert(), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    quiet(pm.save_pretrained, str(tmp_path))
    weights = load_file(tmp_path / "adapter_model.safetensors")
    dropped = min(k for k in weights if "magnitude" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "adapter_model.safetensors")
    model = bert()
    with pytest.raises(AdapterFormatError, match="lacks the lora_magnitude_vector"):
        load_adapter(model, tmp_path)
    assert not list(lora_layers(model))


def test_dora_on_some_fused_parts_is_refused_for_peft(tmp_path):
    model = gpt2()
    cfg = LoraConfig(rank=2, targets=["c_attn[q,v]"], use_dora=True)
    inject(model, cfg)
    with pytest.raises(AdapterFormatError, match="enable_lora parts"):
        save_adapter(model, tmp_path, format="peft", config=cfg)
