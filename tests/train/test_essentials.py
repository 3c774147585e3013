"""Training essentials: accumulation, schedules, LoRA+, precision, optimizers, eval_steps, tokens/s."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lora_tune import LoraConfig, inject
from lora_tune.errors import ConfigError, NonFiniteLossError
from lora_tune.tasks.base import Task, eval_mode, index_batches
from lora_tune.train import TrainConfig, fit, lr_factor, parameter_groups, resolve_precision, warmup_steps
from tests.study.toy_task import ToyTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB, LENGTH = 32, 12


class TokenTask(Task):
    """Next-token prediction on random sequences of different lengths: the loss is a mean over
    supervised tokens (labels -100 past each sequence's end), weighted by their count."""

    name = "tokens"
    metrics = ("eval_loss",)
    default_metric = "eval_loss"
    default_direction = "minimize"

    def __init__(self, n: int = 32, weighted: bool = True):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=gen)
        lengths = torch.randint(2, LENGTH + 1, (n,), generator=gen)
        self.labels = self.ids.clone()
        self.labels[torch.arange(LENGTH)[None, :] >= lengths[:, None]] = -100
        if not weighted:  # weigh micro-batches by examples, Task's default
            self.loss_weight = lambda batch: Task.loss_weight(self, batch)

    def build_model(self) -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, VOCAB))

    def num_train_examples(self) -> int:
        return len(self.ids)

    def train_batches(self, batch_size, seed, epoch):
        for idx in index_batches(len(self.ids), batch_size, seed, epoch):
            yield self.ids[idx], self.labels[idx]

    def loss(self, model, batch):
        ids, labels = batch
        return F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)

    def loss_weight(self, batch) -> int:
        return int((batch[1] != -100).sum())

    def batch_tokens(self, batch) -> int:
        return int((batch[1] != -100).sum())

    def evaluate(self, model, batch_size):
        with eval_mode(model):
            return {"eval_loss": float(self.loss(model, (self.ids, self.labels)))}


def first_step_gradients(task: Task, **train) -> dict[str, torch.Tensor]:
    """The gradients the optimizer sees at the first step of ``fit``."""
    seen: dict[str, torch.Tensor] = {}
    model = task.build_model()
    names = {id(p): n for n, p in model.named_parameters()}

    def grab(optimizer, args, kwargs):
        if not seen:
            for group in optimizer.param_groups:
                seen.update({names[id(p)]: p.grad.clone() for p in group["params"]})

    handle = register_optimizer_step_pre_hook(grab)
    try:
        fit(model, task, TrainConfig(**{"epochs": 1, "max_steps": 1, "grad_clip": None, "device": "cpu", **train}))
    finally:
        handle.remove()
    return seen


def test_accumulating_k_micro_batches_gives_the_gradient_of_one_batch_of_k_times_b():
    task = TokenTask()
    whole = first_step_gradients(task, batch_size=16)
    accumulated = first_step_gradients(task, batch_size=4, gradient_accumulation_steps=4)
    assert whole.keys() == accumulated.keys()
    for name in whole:  # float32; the sums differ only in order
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-7)


def test_weighting_micro_batches_by_examples_instead_of_tokens_would_be_wrong():
    whole = first_step_gradients(TokenTask(), batch_size=16)
    naive = first_step_gradients(TokenTask(weighted=False), batch_size=4, gradient_accumulation_steps=4)
    assert any(not torch.allclose(naive[n], whole[n], rtol=1e-3, atol=1e-6) for n in whole)


def test_accumulation_counts_optimizer_steps_and_reports_the_effective_batch():
    result = fit(TokenTask(n=30).build_model(), TokenTask(n=30),
                 TrainConfig(epochs=2, batch_size=4, gradient_accumulation_steps=3, device="cpu"))
    assert result.planned_steps == result.steps == 2 * 3  # ceil(ceil(30 / 4) / 3) = 3 per epoch
    assert result.effective_batch_size == 12
    assert result.examples == 60


class InfiniteToy(ToyTask):
    """The toy task whose loss becomes +inf after ``after`` calls (``nan_after`` gives NaN)."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def loss(self, model, batch):
        loss = super().loss(model, batch)
        return loss * float("inf") if self.calls > self.after else loss


@pytest.mark.parametrize("poisoned, shown", [(lambda: ToyTask(nan_after=4), "nan"), (lambda: InfiniteToy(4), "inf")],
                         ids=["nan", "inf"])
def test_a_non_finite_loss_stops_its_step_before_the_optimizer_applies_it(poisoned, shown):
    config = {"epochs": 1, "batch_size": 16, "gradient_accumulation_steps": 3, "device": "cpu",
              "diverged_after": None}
    task = poisoned()  # micro-batches 4-6 make step 2; the 5th loss is the first non-finite one
    model = task.build_model()
    with pytest.raises(NonFiniteLossError) as info:
        fit(model, task, TrainConfig(**config))
    assert (info.value.step, str(info.value.value)) == (2, shown) and f"loss {shown} at step 2" in str(info.value)
    assert task.calls == 6  # the rest of the step ran, no further step did
    clean = ToyTask()
    reference = clean.build_model()
    fit(reference, clean, TrainConfig(**config, max_steps=1))
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(param, expected), name  # step 1 applied, step 2 not
        assert param.grad is None, name


class HostReads(torch.Tensor):
    """A loss that counts how often its value is read on the host (on a GPU, each read waits
    for the device)."""

    count = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__):
            cls.count += 1
        return super().__torch_function__(func, types, args, kwargs or {})


class CountedToy(ToyTask):
    def __init__(self):
        super().__init__()
        self.values: list[float] = []

    def loss(self, model, batch):
        loss = super().loss(model, batch)
        self.values.append(loss.detach().clone())
        return loss.as_subclass(HostReads)


def test_the_loss_is_read_once_per_optimizer_step_not_per_micro_batch(monkeypatch):
    monkeypatch.setattr(HostReads, "count", 0)
    task = CountedToy()
    result = fit(task.build_model(), task, TrainConfig(epochs=1, batch_size=16, gradient_accumulation_steps=4,
                                                       max_steps=3, evals_per_epoch=1, device="cpu"))
    assert (result.steps, task.calls, HostReads.count) == (3, 12, 3)
    # equal micro-batches weigh the same: the logged train loss is the mean of all twelve
    assert result.history[-1]["train_loss"] == pytest.approx(float(torch.stack(task.values).mean()), rel=1e-6)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedules_match_transformers_get_scheduler(kind):
    from transformers import get_scheduler

    layer = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    hf_name = "constant_with_warmup" if kind == "constant" else kind
    hf = get_scheduler(hf_name, optimizer, num_warmup_steps=3, num_training_steps=20)
    for step in range(20):
        assert lr_factor(step, 20, 3, kind) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12), step
        optimizer.step()
        hf.step()


def test_fit_uses_the_schedule_at_every_step_with_warmup_from_the_ratio():
    task = TokenTask()
    config = TrainConfig(epochs=1, batch_size=4, learning_rate=0.1, lr_scheduler="cosine", warmup_ratio=0.25,
                         eval_steps=1, device="cpu")
    result = fit(task.build_model(), task, config)
    assert warmup_steps(config, 8) == 2
    used = [row["learning_rate"] for row in result.history]
    assert used == pytest.approx([0.1 * lr_factor(s, 8, 2, "cosine") for s in range(8)])
    assert used[0] == 0.0 and used[2] == pytest.approx(0.1)
    assert [row["step"] for row in result.history] == list(range(1, 9))  # eval_steps=1: after every step


def test_eval_steps_evaluates_every_n_optimizer_steps_and_at_the_end():
    task = TokenTask()
    config = TrainConfig(epochs=2, batch_size=4, eval_steps=3, device="cpu", diverged_after=None)
    result = fit(task.build_model(), task, config)
    assert [row["step"] for row in result.history] == [3, 6, 9, 12, 15, 16]


def _lora_model() -> nn.Module:
    model = TokenTask().build_model()
    inject(model, LoraConfig(rank=2, targets=["1", "3"]))
    return model


def test_loraplus_trains_every_lora_b_at_ratio_times_the_rate():
    model = _lora_model()
    groups = parameter_groups(model, TrainConfig(learning_rate=1e-3, loraplus_lr_ratio=16))
    by_name = {g["name"]: g for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert by_name["lora_B"]["lr"] == pytest.approx(16e-3) and by_name["base"]["lr"] == pytest.approx(1e-3)
    assert sorted(names[id(p)] for p in by_name["lora_B"]["params"]) == ["1.lora_B", "3.lora_B"]
    assert sorted(names[id(p)] for p in by_name["base"]["params"]) == ["1.lora_A", "3.lora_A"]
    without = parameter_groups(model, TrainConfig(learning_rate=1e-3))
    assert len(without) == 1 and len(without[0]["params"]) == 4


def test_loraplus_without_lora_factors_is_a_config_error():
    with pytest.raises(ConfigError, match="train.loraplus_lr_ratio"):
        parameter_groups(TokenTask().build_model(), TrainConfig(loraplus_lr_ratio=4))


def test_bf16_autocast_trains_on_cpu():
    task = TokenTask()
    model = _lora_model()
    dtypes: list[torch.dtype] = []
    model[3].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    result = fit(model, task, TrainConfig(epochs=3, batch_size=8, learning_rate=2e-2, precision="bf16", device="cpu"))
    assert torch.bfloat16 in dtypes
    assert result.history[-1]["eval_loss"] < result.history[0]["eval_loss"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast of the weights


def test_fp16_on_cpu_is_refused_naming_train_precision():
    with pytest.raises(ConfigError, match=r"train\.precision.*CUDA"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_8bit_optimizers_train(name):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.optim

    task = TokenTask()
    model = task.build_model()
    created: list[type] = []
    handle = register_optimizer_step_pre_hook(lambda opt, a, k: created.append(type(opt)))
    try:
        result = fit(model, task, TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2, optimizer=name, device="cpu"))
    finally:
        handle.remove()
    expected = {"adamw_8bit": bitsandbytes.optim.AdamW8bit, "paged_adamw_8bit": bitsandbytes.optim.PagedAdamW8bit}
    assert created and all(c is expected[name] for c in created)
    assert result.history[-1]["eval_loss"] < result.history[0]["eval_loss"]


def test_tokens_per_second_counts_the_tasks_tokens():
    task = TokenTask()
    result = fit(task.build_model(), task, TrainConfig(epochs=1, batch_size=8, device="cpu", diverged_after=None))
    assert result.tokens == int((task.labels != -100).sum())
    assert result.tokens_per_second == pytest.approx(result.tokens / result.compute_seconds)
    assert result.peak_memory_total_bytes > 0


def test_gradient_checkpointing_needs_a_model_that_supports_it():
    task = TokenTask()
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        fit(_lora_model(), task, TrainConfig(gradient_checkpointing=True, device="cpu"))


@pytest.mark.parametrize("field, value", [("gradient_accumulation_steps", 0), ("warmup_ratio", 1.0),
                                          ("lr_scheduler", "step"), ("optimizer", "sgd"), ("precision", "fp8"),
                                          ("eval_steps", 0), ("loraplus_lr_ratio", 0)])
def test_bad_training_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"train.{field}"):
        TrainConfig(**{field: value})
