"""A tiny task for study tests: a small attention-style MLP on synthetic 3-class data.

``make_task(**options)`` builds it; options: ``n_train``, ``n_test``, ``seed``,
``nan_after`` (the loss becomes NaN after that many calls), ``fail_in`` ("init", "build_model" or
"evaluate": raise there), ``die_at_loss_call`` (SIGKILL its own process at that call: for
trials in a child process only), ``oom_above_batch`` (raise torch's OutOfMemoryError for
training batches larger than that), ``cuda_oom`` (raise lora-tune's out-of-memory error as CUDA
reports it, at the first training batch: what a trial process must not survive). The base model
is a fixed random init, so LoRA has real work to do.
"""
from __future__ import annotations

import os
import signal

import torch
from torch import nn

from lora_tune.tasks.base import Task, classification_metrics, eval_mode, index_batches
from lora_tune.tasks.resident import ResidentBase
from lora_tune.errors import TrainingOutOfMemoryError

DIM, CLASSES, FEATURES = 16, 3, 8


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.q_proj(x) * self.k_proj(x))
        x = x + self.o_proj(gate * self.v_proj(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, DIM)
        self.blocks = nn.ModuleList([Block(DIM), Block(DIM)])
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class ToyTask(Task):
    name = "toy"
    metrics = ("accuracy", "macro_f1", "eval_loss")
    default_metric = "accuracy"
    default_direction = "maximize"
    modules_to_save = ["head"]
    baseline_targets = "attention-qv"

    def __init__(self, n_train: int = 192, n_test: int = 96, seed: int = 0, nan_after: int | None = None,
                 fail_in: str | None = None, die_at_loss_call: int | None = None,
                 oom_above_batch: int | None = None, cuda_oom: bool = False):
        if fail_in == "init":
            raise RuntimeError("toy task: init exploded")
        gen = torch.Generator().manual_seed(seed)
        centers = torch.randn(CLASSES, FEATURES, generator=gen) * 1.5
        def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, CLASSES, (n,), generator=gen)
            return centers[y] + torch.randn(n, FEATURES, generator=gen), y
        self.x_train, self.y_train = data(n_train)
        self.x_test, self.y_test = data(n_test)
        torch.manual_seed(seed)
        self._base = ToyModel().eval()
        self.nan_after, self.fail_in, self.calls = nan_after, fail_in, 0
        # trials lease one resident base, as the built-in tasks' do (lora_tune.tasks.resident)
        self.resident = ResidentBase(lambda variant: (self.build_model().to(variant.device), "built"))
        self.die_at_loss_call, self.oom_above_batch, self.cuda_oom = die_at_loss_call, oom_above_batch, cuda_oom

    def build_model(self) -> nn.Module:
        if self.fail_in == "build_model":
            raise RuntimeError("toy task: build_model exploded")
        model = ToyModel()
        model.load_state_dict(self._base.state_dict())
        return model.eval()

    def num_train_examples(self) -> int:
        return len(self.y_train)

    def train_batches(self, batch_size: int, seed: int, epoch: int):
        for idx in index_batches(len(self.y_train), batch_size, seed, epoch):
            yield self.x_train[idx], self.y_train[idx]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        self.calls += 1
        x, y = batch
        if self.die_at_loss_call is not None and self.calls >= self.die_at_loss_call:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.oom_above_batch is not None and len(y) > self.oom_above_batch:
            raise torch.OutOfMemoryError(f"toy task: no room for a batch of {len(y)}")
        if self.cuda_oom and model.training:
            raise TrainingOutOfMemoryError(len(y), 2**30, "cuda:0")
        loss = nn.functional.cross_entropy(model(x), y)
        if self.nan_after is not None and self.calls > self.nan_after:
            loss = loss * float("nan")
        return loss

    def evaluate(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        if self.fail_in == "evaluate":
            raise ValueError("toy task: evaluate exploded")
        with eval_mode(model):
            logits = model(self.x_test)
        metrics = classification_metrics(logits.argmax(-1), self.y_test, CLASSES)
        metrics["eval_loss"] = float(nn.functional.cross_entropy(logits, self.y_test))
        return metrics


def make_task(**options) -> ToyTask:
    return ToyTask(**options)
