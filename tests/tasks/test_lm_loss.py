"""The chunked next-token loss (lora_tune.tasks.lm_loss) against the full-logits computation:
loss and every trainable parameter's gradient on tiny models of each family, LoRA and
``modules_to_save`` on the output layer, tied embeddings, gradient checkpointing, logits only
ever computed one chunk at a time, the fallback for a model that cannot be split, and the
backend guard (Liger Kernel only on CUDA).

Tolerances (float32): the two computations run the same operations and differ only in the
order of float32 additions (chunk sums, and the output layer applied to fewer rows), so the
loss agrees to a relative 1e-6 and each gradient element to ``atol=1e-6, rtol=1e-5`` (the
largest difference seen is ~2e-7 on gradients of magnitude ~1)."""
from __future__ import annotations

import math

import pytest
import torch

from lora_tune import LoraConfig, inject
from lora_tune.errors import ConfigError
from lora_tune.models.tiny_lm import TINY_SIZES, causal_lm_from_config, tiny_config
from lora_tune.tasks import lm_loss
from lora_tune.tasks.lm_loss import (
    IGNORE, chunk_rows, choose_backend, full_logits_loss, lm_head_of, next_token_loss, split_reproduces_logits,
)
from lora_tune.train import enable_gradient_checkpointing

VOCAB = 300
IDS = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
CONFIGS = {t: tiny_config(t, **IDS) for t in TINY_SIZES}
CONFIGS["gemma"] = {"model_type": "gemma", **TINY_SIZES["llama"], "head_dim": 16, **IDS}
CONFIGS["gemma2"]["final_logit_softcapping"] = 2.0  # small, so the soft-capping changes the loss clearly
# not families lora-tune lists, but their logit scaling is handled: Granite divides, Cohere multiplies
CONFIGS["granite"] = {"model_type": "granite", **TINY_SIZES["llama"], "logits_scaling": 4.0, **IDS}
CONFIGS["cohere"] = {"model_type": "cohere", **TINY_SIZES["llama"], "logit_scale": 0.5, **IDS}
LOSS_RTOL = 1e-6
GRAD_TOL = {"atol": 1e-6, "rtol": 1e-5}


def batch(rows: int = 3, width: int = 17, seed: int = 0):
    """Right-padded inputs (row 2 has 12 tokens) and labels with an unsupervised prompt."""
    ids = torch.randint(3, VOCAB, (rows, width), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    attention = torch.ones_like(ids)
    labels[2, 12:], attention[2, 12:], ids[2, 12:] = IGNORE, 0, 0
    return {"input_ids": ids, "attention_mask": attention, "use_cache": False}, labels


def both(model, inputs, labels, rows=5):
    """(loss, {name: grad}) of the full-logits path and of the chunked one, in training mode
    under the same seed (GPT-2 and OPT have dropout)."""
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    results = []
    for compute in (lambda: full_logits_loss(model, inputs, labels),
                    lambda: next_token_loss(model, inputs, labels, rows=rows)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        total, count = compute()
        loss = total / count
        loss.backward()
        results.append((float(loss.detach()), count, {n: p.grad.clone() for n, p in trainable.items()}))
    return results


def assert_same(model, inputs, labels, rows=5):
    (full, n_full, grads_full), (chunked, n_chunked, grads_chunked) = both(model, inputs, labels, rows)
    assert n_full == n_chunked == int((labels[:, 1:] != IGNORE).sum()) > rows  # several chunks
    assert math.isclose(full, chunked, rel_tol=LOSS_RTOL), (full, chunked)
    assert grads_full and grads_full.keys() == grads_chunked.keys()
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_chunked[name], grad, **GRAD_TOL, msg=lambda m, n=name: f"{n}: {m}")
    return grads_full


def lora_model(config, seed=1, **lora):
    """A tiny model with LoRA whose B factors are nonzero too (so every factor has a gradient)."""
    model = causal_lm_from_config(config, seed=0)
    assert split_reproduces_logits(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject(model, LoraConfig(**{"rank": 4, "alpha": 8, "init": "gaussian", **lora}))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(std=0.05)
    return model


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_loss_and_lora_gradients_match_full_logits(model_type):
    model = lora_model(CONFIGS[model_type])  # all-linear: every block's linear layers
    grads = assert_same(model, *batch())
    assert all(".lora_" in n for n in grads) and len(grads) >= 16
    assert all(g.abs().max() > 0 for g in grads.values())


def test_gemma2_soft_capping_is_applied():
    model = causal_lm_from_config(CONFIGS["gemma2"])
    head = lm_head_of(model)
    assert head is not None and head.softcap == 2.0 and head.multiplier is None and head.divisor is None
    inputs, _ = batch()
    with torch.no_grad():
        hidden = head.hidden(inputs)
        logits = model(**inputs).logits
        assert torch.equal(head.logits(hidden), logits) and logits.abs().max() < 2.0
        assert not torch.allclose(head.module(hidden), logits, atol=1e-3)  # the cap matters here


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_lora_on_the_output_layer_goes_through_its_wrapper(model_type):
    model = lora_model(CONFIGS[model_type], targets=["lm_head"])  # GPT-2's lm_head is tied to wte
    assert type(lm_head_of(model).module) is not torch.nn.Linear
    grads = assert_same(model, *batch())
    assert sorted(grads) == ["lm_head.lora_A", "lm_head.lora_B"]
    assert all(g.abs().max() > 0 for g in grads.values())


def test_modules_to_save_output_layer_and_tied_embeddings():
    model = lora_model(CONFIGS["llama"], modules_to_save=["lm_head"])
    assert "lm_head.weight" in assert_same(model, *batch())
    tied = lora_model(dict(CONFIGS["llama"], tie_word_embeddings=True), modules_to_save=["model.embed_tokens"])
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert "model.embed_tokens.weight" in assert_same(tied, *batch())  # gradient of both uses of the weight
    gpt2 = lora_model(CONFIGS["gpt2"], modules_to_save=["transformer.wte"])  # GPT-2 ties by default
    assert "transformer.wte.weight" in assert_same(gpt2, *batch())


def test_gradient_checkpointing_still_works():
    model = lora_model(CONFIGS["llama"])
    enable_gradient_checkpointing(model)  # what train.gradient_checkpointing does
    calls = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        assert_same(model, *batch())
    finally:
        hook.remove()
    assert len(calls) == 4  # each path: the forward, and the recomputation in the backward


def test_logits_exist_one_chunk_at_a_time():
    model = lora_model(CONFIGS["llama"], targets=["lm_head", ".q_proj"])
    inputs, labels = batch(rows=4, width=33)
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    try:
        total, count = next_token_loss(model, inputs, labels, rows=8)
        total.backward()
    finally:
        hook.remove()
    chunks = math.ceil(count / 8)
    assert count == int((labels[:, 1:] != IGNORE).sum()) and chunks >= 10
    assert len(shapes) == 2 * chunks  # each chunk once in the forward, once more in its backward
    assert all(len(s) == 2 and s[0] <= 8 and s[1] == VOCAB for s in shapes)


def test_eval_without_gradients_and_no_supervised_tokens():
    model = lora_model(CONFIGS["qwen2"], targets=["lm_head"])
    inputs, labels = batch()
    with torch.no_grad():
        full, n = full_logits_loss(model, inputs, labels)
        chunked, m = next_token_loss(model, inputs, labels, rows=4)
    assert n == m and math.isclose(float(full), float(chunked), rel_tol=LOSS_RTOL)
    nothing = torch.full_like(labels, IGNORE)
    total, count = next_token_loss(model, inputs, nothing)
    assert count == 0 and float(total.detach()) == 0.0 and total.requires_grad  # connected: backward works
    total.backward()


def test_bfloat16_weights_agree_with_full_logits():
    model = causal_lm_from_config(CONFIGS["llama"]).to(torch.bfloat16)
    assert split_reproduces_logits(model)
    inputs, labels = batch()
    with torch.no_grad():
        full, _ = full_logits_loss(model, inputs, labels)
        chunked, _ = next_token_loss(model, inputs, labels, rows=4)
    assert full.dtype == chunked.dtype == torch.float32
    assert math.isclose(float(full), float(chunked), rel_tol=1e-3)


def scaled_llama():
    """A causal LM whose forward does something after the output layer that lm_loss does not know."""
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model = causal_lm_from_config(CONFIGS["llama"])
    scaled = ScaledLlama(model.config)
    scaled.load_state_dict(model.state_dict())
    return scaled


def test_a_model_that_cannot_be_split_uses_full_logits():
    model = scaled_llama()
    assert lm_head_of(model) is not None and not split_reproduces_logits(model)
    assert not split_reproduces_logits(torch.nn.Linear(4, 4)) and lm_head_of(torch.nn.Linear(4, 4)) is None
    inputs, labels = batch()
    with torch.no_grad():
        full, n = full_logits_loss(model, inputs, labels)
        fallback, m = next_token_loss(model, inputs, labels, split=False)
    assert torch.equal(full, fallback) and n == m


def test_chunk_rows_follow_the_vocabulary():
    assert chunk_rows(151_936) == 441 and chunk_rows(32_000) == 2097
    assert chunk_rows(300) == 4096 and chunk_rows(10**9) == 128


def test_liger_only_on_cuda_with_a_plain_output_layer(monkeypatch):
    model = causal_lm_from_config(CONFIGS["llama"])
    head = lm_head_of(model)
    # here (no CUDA, liger-kernel not installed) the own implementation is always chosen
    assert choose_backend(head, "cpu") == "chunked"
    if not lm_loss._liger_installed():
        assert choose_backend(head, "cuda") == "chunked"
    monkeypatch.setattr(lm_loss, "_liger_installed", lambda: True)
    assert choose_backend(head, "cpu") == "chunked"  # liger-kernel is CUDA only
    assert choose_backend(head, "cuda:0") == "liger"
    assert choose_backend(head, "cuda", "chunked") == "chunked" and choose_backend(head, "cuda", "full") == "full"
    with torch.no_grad():
        assert choose_backend(head, "cuda") == "chunked"  # evaluation: nothing to fuse with a backward
    granite = lm_head_of(causal_lm_from_config(CONFIGS["granite"]))
    assert choose_backend(granite, "cuda") == "chunked"  # Liger has no logit scaling
    wrapped = lora_model(CONFIGS["llama"], targets=["lm_head"])
    assert choose_backend(lm_head_of(wrapped), "cuda") == "chunked"  # Liger would bypass the adapter
    assert choose_backend(None, "cuda") == "full"
    inputs, labels = batch()
    total, _ = next_token_loss(model, inputs, labels)  # on CPU: never reaches liger (not importable here)
    assert math.isfinite(float(total.detach()))


def test_environment_override(monkeypatch):
    model = causal_lm_from_config(CONFIGS["llama"])
    inputs, labels = batch()
    monkeypatch.setenv(lm_loss.ENV, "full")
    calls = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: calls.append(out.shape))
    with torch.no_grad():
        next_token_loss(model, inputs, labels)
    hook.remove()
    assert calls == [torch.Size([3, 17, VOCAB])]
    monkeypatch.setenv(lm_loss.ENV, "fused")
    with pytest.raises(ConfigError) as info:
        next_token_loss(model, inputs, labels)
    assert info.value.field == lm_loss.ENV and "auto, chunked, full" in str(info.value)
