"""The digits quickstart: a real pretrained base, a real domain gap, and LoRA closing it."""
from __future__ import annotations

import time

import pytest
import torch

import lora_tune.tasks.digits as digits
from lora_tune import LoraConfig, inject, target_presets
from lora_tune.errors import ConfigError
from lora_tune.tasks import build_task, validate_task_spec
from lora_tune.train import TrainConfig, fit

pytestmark = pytest.mark.slow  # the session pretrains the base once (a few seconds)


def test_pretrained_base_is_good_upright_and_poor_on_the_target_domain(digits_task):
    model = digits_task.build_model()
    upright = digits_task.evaluate_on(model, *digits_task.upright_eval)["accuracy"]
    target = digits_task.evaluate(model, 64)["accuracy"]
    assert upright > 0.9
    assert target < 0.3
    assert digits_task.num_train_examples() == 500 and len(digits_task.eval_y) == 297


def test_lora_closes_the_domain_gap(digits_task):
    model = digits_task.build_model()
    frozen = digits_task.evaluate(model, 64)["accuracy"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        report = inject(model, LoraConfig(rank=8, alpha=16, targets="attention"))
    start = time.perf_counter()
    result = fit(model, digits_task, TrainConfig(epochs=3, batch_size=32, learning_rate=3e-3, evals_per_epoch=2))
    assert time.perf_counter() - start < 30
    assert report.trainable_after < 10_000
    assert result.final_metrics["accuracy"] > frozen + 0.4
    assert len(result.history) == 6


def test_presets_find_attention_and_mlp_layers(digits_task):
    presets = target_presets(digits_task.build_model())
    assert presets["attention-qv"] == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj",
                                       "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert {"blocks.0.mlp.fc1", "blocks.1.mlp.fc2"} <= set(presets["mlp"])
    assert "head" not in presets["all-linear"]
    assert digits_task.baseline_targets in presets


def test_build_model_returns_independent_fresh_copies(digits_task):
    a, b = digits_task.build_model(), digits_task.build_model()
    with torch.no_grad():
        a.head.weight.add_(1.0)
    c = digits_task.build_model()
    assert torch.equal(b.head.weight, c.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)
    assert all(p.device.type == "cpu" for p in c.parameters()) and not c.training


def test_cache_file_is_written_and_reloaded_identically(digits_task, digits_cache):
    path = digits.pretrained_path()
    assert path.parent == digits_cache and path.is_file()
    original = digits_task.build_model().state_dict()
    digits._TEMPLATES.clear()  # force a load from disk
    start = time.perf_counter()
    again = build_task({"type": "digits"})
    assert time.perf_counter() - start < 5
    reloaded = again.build_model().state_dict()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)


def test_pretraining_is_deterministic():
    images, labels = digits.load_digits_tensors()
    a = digits.pretrain_base(images[:64], labels[:64]).state_dict()
    b = digits.pretrain_base(images[:64], labels[:64]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_batches_cover_the_data_once_per_epoch_in_a_seeded_order(digits_task):
    def labels(seed, epoch):
        return torch.cat([y for _, y in digits_task.train_batches(64, seed, epoch)])

    first = labels(0, 0)
    assert len(first) == 500
    assert torch.equal(first.sort().values, digits_task.train_y.sort().values)
    assert torch.equal(first, labels(0, 0))
    assert not torch.equal(first, labels(0, 1)) and not torch.equal(first, labels(1, 0))


@pytest.mark.parametrize("domain", digits.DOMAINS)
def test_domains_transform_images(domain):
    images = torch.rand(3, 8, 8)
    moved = digits.to_domain(images, domain)
    assert moved.shape == images.shape and not torch.equal(moved, images)


def test_max_examples_and_domain(digits_cache):
    task = build_task({"type": "digits", "domain": "flip", "max_train_examples": 40, "max_eval_examples": 30})
    assert task.num_train_examples() == 40 and len(task.eval_y) == 30
    images, _ = digits.load_digits_tensors()
    assert torch.equal(task.train_x, torch.flip(images[digits.SOURCE_SIZE:digits.SOURCE_SIZE + 40], (2,)))
    assert task.describe()["domain"] == "flip"


def test_spec_problems_are_all_reported_with_paths():
    problems = validate_task_spec({"type": "digits", "domain": "sideways", "max_train_examples": 0, "colour": 1})
    paths = [p for p, _ in problems]
    assert sorted(paths) == ["task.colour", "task.domain", "task.max_train_examples"]
    assert "rotate90" in dict(problems)["task.domain"]
    with pytest.raises(ConfigError) as info:
        build_task({"type": "digits", "domain": "sideways"})
    assert info.value.field == "task.domain"


def test_a_corrupt_cache_file_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TUNE_CACHE", str(tmp_path))
    monkeypatch.setitem(digits.PRETRAIN, "epochs", 1)  # a different cache key, pretrained in a moment
    path = digits.pretrained_path()
    path.write_bytes(b"not a safetensors file")
    task = build_task({"type": "digits", "max_eval_examples": 10})
    assert task.evaluate(task.build_model(), 10)["accuracy"] >= 0.0
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(task.build_model().state_dict())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind
