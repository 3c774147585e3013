"""causal-lm with a GPT-2 built from a config (byte tokenizer) and from a saved directory."""
from __future__ import annotations

import math

import pytest
import torch

from lora_tune import LoraConfig, inject
from lora_tune.errors import ConfigError
from lora_tune.tasks import build_task, validate_task_spec
from lora_tune.train import TrainConfig, fit

GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
TEXT = "the cat sat on the mat. " * 60


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def spec_for(corpus, **extra):
    return {"type": "causal-lm", "model": {"gpt2_config": dict(GPT2)}, "train_file": str(corpus),
            "block_size": 32, **extra}


def test_blocks_and_byte_tokens(corpus):
    task = build_task(spec_for(corpus))
    blocks = len(TEXT.encode()) // 32
    assert len(task.train) + len(task.eval) == blocks and len(task.eval) == round(blocks * 0.1)
    assert task.train.shape[1] == 32 and int(task.train.max()) < 256
    assert bytes(task.train[0].tolist()).decode() == TEXT[:32]
    assert task.metrics == ("eval_loss", "perplexity") and task.default_direction == "minimize"
    assert task.modules_to_save == []


def test_lora_lowers_eval_loss_and_perplexity_is_exp_loss(corpus):
    # a larger initialisation than GPT-2's 0.02 lets a frozen random base express confident logits
    spec = spec_for(corpus)
    spec["model"]["gpt2_config"]["initializer_range"] = 0.3
    task = build_task(spec)
    model = task.build_model()
    start = task.evaluate(model, 16)
    assert math.isclose(start["perplexity"], math.exp(start["eval_loss"]), rel_tol=1e-9)
    frozen = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inject(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    result = fit(model, task, TrainConfig(epochs=3, batch_size=8, learning_rate=3e-2, evals_per_epoch=1))
    assert result.final_metrics["eval_loss"] < start["eval_loss"] - 1.0
    layer = model.transformer.h[0].mlp.c_fc
    assert torch.equal(layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight, frozen)


def test_loss_gradients_and_eval_match_transformers_full_logits_loss(corpus):
    # what the task did before: model(input_ids=batch, labels=batch).loss on full logits
    task = build_task(spec_for(corpus))
    assert task.lm_split
    model = task.build_model().eval()  # no dropout; gradients still flow
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inject(model, LoraConfig(rank=4, alpha=8, init="gaussian", targets="all-linear"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(std=0.05)
    batch = next(iter(task.train_batches(8, 0, 0)))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    seen = []
    hook = model.lm_head.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape)))
    results = []
    for compute in (lambda: model(input_ids=batch, labels=batch).loss, lambda: task.loss(model, batch)):
        model.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in trainable.items()}))
    hook.remove()
    assert seen == [(8, 32, GPT2["n_embd"]), (8 * 31, GPT2["n_embd"]), (8 * 31, GPT2["n_embd"])]  # rows, then rows
    (old, old_grads), (new, new_grads) = results
    assert math.isclose(old, new, rel_tol=1e-6) and len(old_grads) == 16  # 2 blocks x 4 layers x (A, B)
    for name, grad in old_grads.items():
        torch.testing.assert_close(new_grads[name], grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        expected = sum(float(model(input_ids=task.eval[i:i + 3], labels=task.eval[i:i + 3]).loss) *
                       len(task.eval[i:i + 3]) for i in range(0, len(task.eval), 3)) / len(task.eval)
    metrics = task.evaluate(model, 3)
    assert math.isclose(metrics["eval_loss"], expected, rel_tol=1e-6)
    assert math.isclose(metrics["perplexity"], math.exp(expected), rel_tol=1e-6)


def test_eval_file_caps_and_seed(corpus, tmp_path):
    held_out = tmp_path / "held.txt"
    held_out.write_text("a dog ran in the park. " * 10, encoding="utf-8")
    task = build_task(spec_for(corpus, eval_file=str(held_out), max_train_blocks=5, max_eval_blocks=2, seed=3))
    assert len(task.train) == 5 and len(task.eval) == 2
    other = build_task(spec_for(corpus, seed=4))
    assert not torch.equal(task.build_model().lm_head.weight, other.build_model().lm_head.weight)


def test_model_from_a_local_directory(corpus, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, **GPT2)).save_pretrained(str(tmp_path / "gpt2"))
    task = build_task({"type": "causal-lm", "model": str(tmp_path / "gpt2"), "tokenizer": "bytes",
                       "train_file": [str(corpus), str(corpus)], "block_size": 32})
    assert len(task.train) + len(task.eval) == len((TEXT + "\n\n" + TEXT).encode()) // 32
    assert math.isfinite(task.evaluate(task.build_model(), 8)["eval_loss"])


def test_problems_are_reported_with_paths(corpus, tmp_path):
    bad = {"type": "causal-lm", "model": {"gpt2_config": {"n_layer": 0, "n_embd": 30, "n_head": 4, "vocab_size": 100,
                                                          "depth": 3}},
           "train_file": str(tmp_path / "none.txt"), "eval_file": str(corpus), "eval_fraction": 0.2, "block": 3}
    problems = dict(validate_task_spec(bad))
    assert set(problems) == {
        "task.model.gpt2_config.n_layer", "task.model.gpt2_config.n_embd", "task.model.gpt2_config.vocab_size",
        "task.model.gpt2_config.depth", "task.train_file", "task.eval_fraction", "task.block"}
    assert "none.txt" in problems["task.train_file"]
    assert "gpt2_config" in dict(validate_task_spec({"type": "causal-lm", "model": {"gpt": {}},
                                                     "train_file": str(corpus)}))["task.model"]


def test_text_shorter_than_a_block_is_an_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        build_task({"type": "causal-lm", "model": {"gpt2_config": dict(GPT2)}, "train_file": str(short),
                    "block_size": 32})
    assert info.value.field == "task.train_file"


def test_block_size_beyond_the_model_positions_is_an_error(corpus):
    with pytest.raises(ConfigError) as info:
        build_task(spec_for(corpus, block_size=128))
    assert info.value.field == "task.block_size"
