"""Gradient checkpointing on a tiny Llama with lora-tune's LoRA: transformers' non-reentrant
activation checkpointing recomputes every decoder layer in the backward pass (the wrappers'
forwards run again, as far as torch needs them), and the loss and every LoRA gradient come out as without it.

Tolerance: recomputation replays the same CPU kernels on the same inputs, so loss and gradients
must agree to float32 round-off, ``rtol=1e-6, atol=1e-8`` (in practice they are bit-identical);
a wrapper that recomputed a different function (another dropout mask, a stale merged weight, a
different dequantized base) would be off by far more.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from lora_tune import LoraConfig, inject
from lora_tune.lora.inject import lora_layers

from .hf_models import LAYERS, tiny_causal_lm, tokens

pytest.importorskip("transformers")

RTOL, ATOL = 1e-6, 1e-8


def adapted_llama(method: str, bits: int | None):
    model = tiny_causal_lm("llama")
    inject(model, LoraConfig(rank=4, alpha=8.0, targets="all-linear", method=method, quant_bits=bits,
                             dropout=0.0))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # nonzero B, so that A gets gradients too and the deltas matter
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def loss_and_grads(model, ids):
    """Loss, LoRA gradients, and how many times each wrapper's forward ran."""
    calls = Counter()
    hooks = [m.register_forward_hook(lambda *_, name=n: calls.update([name])) for n, m in lora_layers(model)]
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls


@pytest.mark.parametrize("bits", [None, 4], ids=["fp32", "nf4"])
@pytest.mark.parametrize("method", ["parallel", "merged"])
def test_checkpointing_gives_the_same_loss_and_lora_gradients(method, bits):
    model = adapted_llama(method, bits)
    ids = tokens(batch=2, length=12)
    assert len(list(lora_layers(model))) == LAYERS * 7

    loss, grads, calls = loss_and_grads(model, ids)
    assert set(calls.values()) == {1}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads(model, ids)

    # torch stops recomputing a layer once it has every tensor backward needs (the last
    # projection may not rerun), but each layer's attention projections run again
    for i in range(LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert calls_ckpt[f"model.layers.{i}.self_attn.{proj}"] == 2, f"layer {i} {proj} was not recomputed"
    torch.testing.assert_close(loss_ckpt, loss, rtol=RTOL, atol=ATOL)
    assert grads_ckpt.keys() == grads.keys() and all(n.endswith(("lora_A", "lora_B")) for n in grads)
    for name, g in grads.items():
        assert g.abs().max() > 0, f"{name} got a zero gradient"
        torch.testing.assert_close(grads_ckpt[name], g, rtol=RTOL, atol=ATOL, msg=name)


def test_checkpointing_with_lora_dropout_replays_the_same_mask():
    """With dropout the recomputed forward must draw the same mask (torch restores the RNG state)."""
    model = tiny_causal_lm("llama")
    inject(model, LoraConfig(rank=4, targets="all-linear", dropout=0.3, method="merged"))
    model.train()
    ids = tokens(batch=2, length=12)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        loss, grads, _ = loss_and_grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        loss_ckpt, grads_ckpt, _ = loss_and_grads(model, ids)
    torch.testing.assert_close(loss_ckpt, loss, rtol=RTOL, atol=ATOL)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=RTOL, atol=ATOL, msg=name)
