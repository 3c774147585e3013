"""The training loop: what is trained, when evaluation happens, stopping, failures, determinism."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_tune.errors import ConfigError, LoraTuneError, NonFiniteLossError
from lora_tune.tasks.base import Task, classification_metrics, eval_mode, index_batches
from lora_tune.train import TrainConfig, eval_steps, fit, resolve_device


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class BlobsTask(Task):
    """Three Gaussian blobs in 8 dimensions; ``nan_at`` poisons one training example."""

    name = "blobs"
    metrics = ("accuracy", "macro_f1")
    default_metric = "accuracy"

    def __init__(self, n: int = 100, nan_at: int | None = None):
        gen = torch.Generator().manual_seed(0)
        centers = torch.randn(3, 8, generator=gen) * 3
        self.y = torch.arange(n) % 3
        self.x = centers[self.y] + torch.randn(n, 8, generator=gen)
        if nan_at is not None:
            self.x[nan_at] = float("nan")
        self.modules_to_save = []

    def build_model(self) -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))

    def num_train_examples(self) -> int:
        return len(self.y)

    def train_batches(self, batch_size, seed, epoch):
        for idx in index_batches(len(self.y), batch_size, seed, epoch):
            yield self.x[idx], self.y[idx]

    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    def evaluate(self, model, batch_size):
        clean = ~torch.isnan(self.x).any(1)
        with eval_mode(model):
            preds = model(self.x[clean]).argmax(-1)
        return classification_metrics(preds, self.y[clean], 3)


def frozen_first_layer(task: BlobsTask) -> nn.Module:
    model = task.build_model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def test_fit_trains_only_trainable_parameters_and_learns():
    task = BlobsTask()
    model = frozen_first_layer(task)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = task.evaluate(model, 32)["accuracy"]
    result = fit(model, task, TrainConfig(epochs=5, batch_size=10, learning_rate=1e-2))
    after = model.state_dict()
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
    assert not torch.equal(after["3.weight"], before["3.weight"])
    assert result.final_metrics["accuracy"] > max(start, 0.9)
    assert set(result.final_metrics) == {"accuracy", "macro_f1"}
    assert result.examples == 500 and result.steps == result.planned_steps == 50
    assert result.throughput > 0 and result.seconds >= result.compute_seconds + result.eval_seconds
    assert not model.training  # left in eval mode


def test_evaluations_are_spread_over_each_epoch_and_reported():
    calls = []
    result = fit(frozen_first_layer(BlobsTask()), BlobsTask(),
                 TrainConfig(epochs=2, batch_size=10, evals_per_epoch=3, diverged_after=None),
                 on_eval=lambda step, i, m: calls.append((step, i, sorted(m))) and False)
    assert [c[:2] for c in calls] == [(3, 0), (7, 1), (10, 2), (13, 3), (17, 4), (20, 5)]
    assert all(c[2] == ["accuracy", "macro_f1"] for c in calls)
    assert [h["step"] for h in result.history] == [3, 7, 10, 13, 17, 20]
    assert [h["epoch"] for h in result.history] == [0, 0, 0, 1, 1, 1]
    assert all(h["train_loss"] > 0 for h in result.history)
    assert result.final_metrics == {k: result.history[-1][k] for k in ("accuracy", "macro_f1")}


def test_on_eval_returning_true_stops_training():
    result = fit(frozen_first_layer(BlobsTask()), BlobsTask(),
                 TrainConfig(epochs=3, batch_size=10, evals_per_epoch=2),
                 on_eval=lambda step, i, m: i == 1)
    assert result.stopped_early
    assert result.steps == 10 and result.planned_steps == 30 and len(result.history) == 2


def test_max_steps_caps_training_and_evaluates_at_the_end():
    result = fit(frozen_first_layer(BlobsTask()), BlobsTask(),
                 TrainConfig(epochs=3, batch_size=10, evals_per_epoch=2, max_steps=7))
    assert result.steps == result.planned_steps == 7
    assert [h["step"] for h in result.history] == [5, 7]
    assert not result.stopped_early


def test_non_finite_loss_names_the_step():
    task = BlobsTask(nan_at=0)
    order = list(index_batches(100, 10, 0, 0))
    step = next(i for i, idx in enumerate(order, 1) if 0 in idx.tolist())
    with pytest.raises(NonFiniteLossError) as info:
        fit(frozen_first_layer(task), task, TrainConfig(epochs=1, batch_size=10, diverged_after=None))
    assert info.value.step == step and f"step {step}" in str(info.value)
    assert isinstance(info.value, LoraTuneError) and not isinstance(info.value, ValueError)


def test_same_seed_gives_the_same_result():
    def run(seed):
        task = BlobsTask()
        model = frozen_first_layer(task)
        result = fit(model, task, TrainConfig(epochs=2, batch_size=10, seed=seed))
        return model.state_dict()["3.weight"], [h["train_loss"] for h in result.history]

    w1, h1 = run(0)
    w2, h2 = run(0)
    w3, _ = run(1)
    assert torch.equal(w1, w2) and h1 == h2
    assert not torch.equal(w1, w3)


def test_fit_leaves_global_rng_as_it_was():
    torch.manual_seed(5)
    task = BlobsTask()
    model = frozen_first_layer(task)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fit(model, task, TrainConfig(epochs=1, batch_size=10))
    assert torch.equal(torch.rand(3), expected)


def test_model_without_trainable_parameters_is_refused():
    task = BlobsTask()
    model = task.build_model().requires_grad_(False)
    with pytest.raises(ConfigError, match="trainable"):
        fit(model, task, TrainConfig(epochs=1))


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("batch_size", -1), ("evals_per_epoch", 1.5), ("learning_rate", 0.0),
    ("learning_rate", float("nan")), ("weight_decay", -0.1), ("grad_clip", 0), ("max_steps", 0), ("seed", "x"),
])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: value})
    assert info.value.field == f"train.{field}"


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="train.device"):
        resolve_device("warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("steps, evals, expected", [
    (10, 2, [5, 10]), (10, 3, [3, 7, 10]), (2, 5, [1, 2]), (1, 1, [1]), (7, 1, [7]),
])
def test_eval_steps(steps, evals, expected):
    assert eval_steps(steps, evals) == expected


class ShortEpochTask(BlobsTask):
    """Yields only the first two batches of each epoch, fewer than num_train_examples suggests."""

    def train_batches(self, batch_size, seed, epoch):
        for i, batch in enumerate(super().train_batches(batch_size, seed, epoch)):
            if i == 2:
                return
            yield batch


def test_an_epoch_shorter_than_planned_still_ends_with_an_evaluation():
    task = ShortEpochTask()
    result = fit(frozen_first_layer(task), task, TrainConfig(epochs=2, batch_size=10, evals_per_epoch=2))
    assert [h["step"] for h in result.history] == [2, 4]
    assert result.steps == 4 and result.planned_steps == 20


def test_a_task_without_training_examples_is_refused():
    task = BlobsTask()
    task.y = task.y[:0]
    with pytest.raises(ConfigError, match="training example"):
        fit(frozen_first_layer(task), task, TrainConfig())


class LeakyTask(BlobsTask):
    """Holds 8 MB more after every training step."""

    def __init__(self):
        super().__init__()
        self.kept = []

    def loss(self, model, batch):
        self.kept.append(torch.ones(2_000_000))
        return super().loss(model, batch)


def test_peak_memory_counts_memory_held_during_training():
    task = LeakyTask()
    result = fit(frozen_first_layer(task), task, TrainConfig(epochs=1, batch_size=10))
    assert result.peak_memory_bytes >= 0.8 * 10 * 8_000_000
    quiet = fit(frozen_first_layer(BlobsTask()), BlobsTask(), TrainConfig(epochs=1, batch_size=10))
    assert quiet.peak_memory_bytes < 0.5 * result.peak_memory_bytes
