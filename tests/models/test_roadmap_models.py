"""The roadmap models: inject LoRA, train briefly, check what moved and what did not.

For each model: the adapted model starts out computing exactly what the base computes, only
LoRA factors are trainable, a short :func:`lora_tune.train.fit` lowers the evaluation loss,
every LoRA ``B`` factor leaves zero, and every frozen tensor is bit-for-bit unchanged.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_tune import LoraConfig, inject, target_presets
from lora_tune.models import GPTConfig, MiniGPT, TinyViT, ViTConfig
from lora_tune.tasks.python_factory import DictTask
from lora_tune.train import TrainConfig, fit


class EncoderClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class DecoderRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 32)
        layer = nn.TransformerDecoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers=2)
        self.out = nn.Linear(32, 4)

    def forward(self, batch):
        tgt, memory = batch
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.out(self.decoder(self.embed(tgt), self.embed(memory), tgt_mask=mask))


def hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def encoder_data(n):
    x = torch.randn(n, 6, 4, generator=_gen(1))
    return x, (x[:, :, 0].sum(1) > 0).long()


def decoder_data(n):
    tgt, memory = torch.randn(n, 5, 4, generator=_gen(2)), torch.randn(n, 3, 4, generator=_gen(3))
    return tgt, memory, memory.mean(1, keepdim=True).expand(-1, 5, -1) * 2 + tgt.flip(-1)


def image_data(n):
    y = torch.arange(n) % 4
    patterns = torch.randn(4, 8, 8, generator=_gen(4))
    return patterns[y] + 0.5 * torch.randn(n, 8, 8, generator=_gen(5)), y


def token_data(n, vocab=64, length=16):
    start = torch.randint(0, vocab, (n, 1), generator=_gen(6))
    seq = (start + torch.arange(length)) % vocab  # counting sequences: next token = token + 1
    return (seq,)


def lm_loss(logits, seq):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))


CASES: dict[str, dict] = {
    "nn.TransformerEncoder": dict(
        model=EncoderClassifier, data=encoder_data, targets="attention", lr=1e-2,
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]), forward=lambda m, b: m(b[0])),
    "nn.TransformerDecoder": dict(
        model=DecoderRegressor, data=decoder_data, targets="all-linear", lr=1e-2,
        loss=lambda m, b: F.mse_loss(m((b[0], b[1])), b[2]), forward=lambda m, b: m((b[0], b[1]))),
    "digits TinyViT": dict(
        model=lambda: TinyViT(ViTConfig(num_classes=4)), data=image_data, targets="attention-qv", lr=1e-2,
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]), forward=lambda m, b: m(b[0])),
    "minGPT-style decoder": dict(
        model=lambda: MiniGPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)),
        data=token_data, targets="all-linear", lr=3e-2,
        loss=lambda m, b: lm_loss(m(b[0]), b[0]), forward=lambda m, b: m(b[0])),
    "HF GPT-2 (Conv1D)": dict(
        model=hf_gpt2, data=token_data, targets="attention-qv", lr=3e-2,
        loss=lambda m, b: m(input_ids=b[0], labels=b[0]).loss, forward=lambda m, b: m(input_ids=b[0]).logits),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inject_and_short_train(case):
    spec = CASES[case]
    torch.manual_seed(0)
    base = spec["model"]().eval()
    data = spec["data"](96)
    train, evaluation = tuple(t[:64] for t in data), tuple(t[64:] for t in data)
    loss_fn: Callable = spec["loss"]
    task = DictTask({"model": base, "train": train, "eval": evaluation, "loss": loss_fn})
    model = task.build_model()
    assert spec["targets"] in target_presets(model)

    with torch.no_grad():
        expected = spec["forward"](model, evaluation)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        report = inject(model, LoraConfig(rank=4, alpha=8, targets=spec["targets"]))
    assert report.targets
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(spec["forward"](model, evaluation), expected, rtol=1e-5, atol=1e-5)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update({f"buffer:{n}": b.clone() for n, b in model.named_buffers()})
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_B")}
    start = task.evaluate(model, 32)["eval_loss"]

    result = fit(model, task, TrainConfig(epochs=6, batch_size=16, learning_rate=spec["lr"], evals_per_epoch=1))

    assert result.final_metrics["eval_loss"] < 0.8 * start, result.history
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], before) for n, before in lora_b.items())
    buffers = dict(model.named_buffers())
    for name, before in frozen.items():
        now = buffers[name[7:]] if name.startswith("buffer:") else params[name]
        assert torch.equal(now, before), f"{name} changed"
