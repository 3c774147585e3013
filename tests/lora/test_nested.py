"""Nested ranks (lora_tune.lora.nested): active ranks, truncation, and training with NestedTask."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lora_tune import LoraConfig, inject, load_adapter, merge, save_adapter
from lora_tune.errors import ConfigError
from lora_tune.lora.nested import NestedRanks, NestedTask, set_active_rank, split_rank_metrics, truncate, truncated
from lora_tune.train import TrainConfig, fit
from tests.study.toy_task import ToyTask


class Mixed(nn.Module):
    """One layer of every family: embedding, fused q/k/v (q and v adapted), linear, conv, MHA."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.qkv = nn.Linear(12, 36)
        self.lin = nn.Linear(36, 12)
        self.conv = nn.Conv1d(12, 12, 3, padding=1)
        self.mha = nn.MultiheadAttention(12, 2, batch_first=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.lin(self.qkv(self.emb(ids)))
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.mha(x, x, x)[0]


TARGETS = ["emb", "qkv[q,v]", "lin", "conv", "mha"]
IDS = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))


def _adapted(targets: list[str], rank: int, alpha: float = 16.0, method: str = "parallel", seed: int = 0) -> nn.Module:
    torch.manual_seed(0)
    model = Mixed().eval()
    inject(model, LoraConfig(rank=rank, alpha=alpha, targets=targets, method=method, qkv_sizes={"qkv": [12, 12, 12]}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero: give every factor values, so that the delta is not trivially 0
        for name, p in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _factors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


@pytest.mark.parametrize("method", ["parallel", "merged"])
@pytest.mark.parametrize("target", TARGETS)
def test_active_rank_computes_with_the_first_components_of_every_pair(target, method):
    # alpha_b / b is 4 at both ranks, so a rank-4 adapter whose B columns 2..3 are zero is the
    # rank-2 adapter of its first two components: an active rank of 2 must compute the same
    nested = NestedRanks((2, 4), alphas=(8.0, 16.0))
    model = _adapted([target], 4, alpha=16.0, method=method)
    with torch.no_grad():
        for name, p in _factors(model).items():
            if name.endswith("lora_B"):
                p[:, 2:] = 0
    whole = model(IDS)
    set_active_rank(model, nested, 2)
    assert torch.allclose(model(IDS), whole, atol=1e-5)
    with torch.no_grad():  # and only the first two components count: the others are ignored
        for name, p in _factors(model).items():
            if name.endswith("lora_B"):
                p[:, 2:] = 5.0
    assert torch.allclose(model(IDS), whole, atol=1e-5)
    set_active_rank(model, nested, None)
    assert not torch.allclose(model(IDS), whole, atol=1e-3)


def test_active_rank_scales_as_the_rank_b_adapter_and_trains_only_its_components():
    nested = NestedRanks((2, 4), alphas=(16.0, 16.0))  # a fixed alpha: scaling alpha / b, as in DyLoRA
    model = _adapted(TARGETS, 4)
    set_active_rank(model, nested, 2)
    wrapper = model.lin
    assert wrapper.scaling == 8.0 and wrapper.lora_A.shape == (2, 36) and wrapper.lora_B.shape == (12, 2)
    assert model.qkv.lora_A.shape == (4, 12)  # two parts (q, v), two components each
    model(IDS).square().sum().backward()
    for name, p in _factors(model).items():
        grad = p.grad.unflatten(0, (-1, 4)) if name.endswith("lora_A") else p.grad.transpose(0, 1)
        first, rest = (grad[:, :2], grad[:, 2:]) if name.endswith("lora_A") else (grad[:2], grad[2:])
        assert first.abs().sum() > 0 and rest.abs().sum() == 0, name
    set_active_rank(model, nested, None)
    assert wrapper.scaling == 4.0 and wrapper.lora_A.shape == (4, 36)


@pytest.mark.parametrize("fmt", ["lora-tune", "peft"])
def test_a_truncated_adapter_saves_and_reloads_into_exactly_the_model_that_was_scored(tmp_path, fmt):
    nested = NestedRanks((2, 4, 8), alphas=(4.0, 8.0, 16.0))  # an alpha ratio of 2 at every rank
    targets = TARGETS if fmt == "lora-tune" else ["emb", "lin", "conv"]  # PEFT's format: no MHA, no part selectors
    model = _adapted(targets, 8)
    config = LoraConfig(rank=8, alpha=16.0, targets=targets, qkv_sizes={"qkv": [12, 12, 12]})
    for r in (2, 4):
        with truncated(model, nested, r):
            scored = model(IDS)
            assert model.lin.r == r and model.lin.scaling == 2.0 and model.lin.lora_A.shape == (r, 36)
            save_adapter(model, tmp_path / f"r{r}", format=fmt,
                         config=dataclasses.replace(config, rank=r, alpha=2.0 * r))
        torch.manual_seed(0)
        fresh = load_adapter(Mixed().eval(), tmp_path / f"r{r}")
        assert torch.equal(fresh(IDS), scored)
        assert {n: p.shape for n, p in _factors(fresh).items()} == {
            n: p.shape for n, p in _factors(truncate(copy.deepcopy(model), nested, r)).items()}


def test_truncated_gives_back_the_same_parameters_afterwards():
    nested = NestedRanks((2, 4), alphas=(16.0, 16.0))
    model = _adapted(TARGETS, 4)
    before = {n: (p, p.detach().clone()) for n, p in _factors(model).items()}
    whole = model(IDS)
    with truncated(model, nested, 2):
        shapes = {n: tuple(p.shape) for n, p in _factors(model).items()}
        assert all(shape[1] == 2 for n, shape in shapes.items() if n.endswith("lora_B"))
        assert shapes["mha.in_proj.lora_A"] == (3 * 2, 12)  # q, k and v: two components each
        assert model.lin.r == 2 and model.mha.out_proj.r == 2 and model._lora_tune_config.rank == 2
    after = _factors(model)
    assert all(after[n] is p and torch.equal(p, value) for n, (p, value) in before.items())
    assert model.lin.r == 4 and model.lin.scaling == 4.0 and model._lora_tune_config.rank == 4
    assert torch.equal(model(IDS), whole)


def test_models_nested_ranks_cannot_use_are_refused():
    nested = NestedRanks((2, 4), alphas=(16.0, 16.0))
    with pytest.raises(ConfigError, match="rank 8"):
        truncate(_adapted(TARGETS, 8), nested, 2)
    merged = _adapted(TARGETS, 4)
    merge(merged)
    with pytest.raises(ConfigError, match="unmerge"):
        truncate(merged, nested, 2)
    with pytest.raises(ConfigError, match="alpha"):
        truncate(_adapted(TARGETS, 4, alpha=32.0), nested, 2)
    with pytest.raises(ConfigError, match="increasing"):
        NestedRanks((4, 2), alphas=(1.0, 1.0))


# -- training ----------------------------------------------------------------------------------------

TRAIN = TrainConfig(epochs=3, batch_size=32, learning_rate=1e-2, evals_per_epoch=1, device="cpu", seed=0)


def _trained(nested: NestedRanks, task: ToyTask) -> tuple[nn.Module, dict]:
    model = task.build_model()
    torch.manual_seed(0)
    inject(model, LoraConfig(rank=nested.top, alpha=nested.alpha_of(nested.top), targets="all-linear",
                             modules_to_save=["head"]))
    result = fit(model, NestedTask(task, model, nested, seed=0), TRAIN)
    return model, result


def test_every_evaluation_scores_each_rank_and_the_scored_truncation_is_what_reloads(tmp_path):
    task = ToyTask()
    nested = NestedRanks((2, 4, 8), alphas=(16.0, 16.0, 16.0))
    model, result = _trained(nested, task)
    assert len(result.history) == 3
    for row in result.history:
        full, by_rank = split_rank_metrics(row)
        assert sorted(by_rank) == [2, 4] and "accuracy" in full
        assert by_rank[2]["trainable_params"] < by_rank[4]["trainable_params"]
    _, final = split_rank_metrics(result.final_metrics)
    assert model.blocks[0].fc1.lora_A.shape == (8, 16)  # the trained rank-8 adapter is back after evaluating
    for r in (2, 4):
        with truncated(model, nested, r):
            save_adapter(model, tmp_path / f"r{r}", config=LoraConfig(rank=r, alpha=16.0, targets="all-linear",
                                                                    modules_to_save=["head"]))
        reloaded = load_adapter(task.build_model(), tmp_path / f"r{r}")
        metrics = task.evaluate(reloaded, 32)
        assert metrics == {k: v for k, v in final[r].items() if k not in ("trainable_params", "adapter_bytes")}
        assert final[r]["trainable_params"] == sum(p.numel() for p in reloaded.parameters() if p.requires_grad)


def test_without_nested_dropout_training_is_plain_rank_r_training():
    task = ToyTask()
    off = NestedRanks((2, 4, 8), alphas=(16.0, 16.0, 16.0), sample=False)
    _, nested = _trained(off, task)
    model = task.build_model()
    torch.manual_seed(0)
    inject(model, LoraConfig(rank=8, alpha=16.0, targets="all-linear", modules_to_save=["head"]))
    plain = fit(model, task, TRAIN)
    assert split_rank_metrics(nested.final_metrics)[0] == plain.final_metrics
    assert [row["train_loss"] for row in nested.history] == [row["train_loss"] for row in plain.history]


def test_nested_dropout_makes_the_small_ranks_better_than_truncating_a_plain_adapter():
    task = ToyTask()
    ranks, alphas = (2, 4, 8), (16.0, 16.0, 16.0)
    _, on = _trained(NestedRanks(ranks, alphas), task)
    _, off = _trained(NestedRanks(ranks, alphas, sample=False), task)
    assert on.final_metrics["eval_loss@rank2"] < off.final_metrics["eval_loss@rank2"]
