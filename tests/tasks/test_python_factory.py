"""python tasks: factories by module or file path, the dict protocol, the Task protocol, errors."""
from __future__ import annotations

import textwrap

import pytest
import torch

from lora_tune import LoraConfig, inject
from lora_tune.errors import ConfigError
from lora_tune.tasks import build_task, validate_task_spec
from lora_tune.tasks.base import Task
from lora_tune.train import TrainConfig, fit

FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn

    def blobs(n=120, seed=0):
        gen = torch.Generator().manual_seed(seed)
        centers = torch.randn(3, 6, generator=gen) * 3
        y = torch.arange(n) % 3
        x = centers[y] + torch.randn(n, 6, generator=gen)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        return {"model": model, "train": (x[:90], y[:90]), "eval": (x[90:], y[90:])}

    def regression():
        x = torch.linspace(-1, 1, 64).unsqueeze(1)
        examples = [(x[i], 3 * x[i]) for i in range(64)]

        def loss(model, batch):
            return ((model(batch[0]) - batch[1]) ** 2).mean()

        def evaluate(model, batches):
            errors = [((model(a) - b) ** 2).mean().item() for a, b in batches]
            return {"mse": sum(errors) / len(errors), "n_batches": len(errors)}

        return {"model": lambda: nn.Linear(1, 1), "train": examples, "eval": examples[:10], "loss": loss,
                "evaluate": evaluate, "metrics": ["mse", "n_batches"], "name": "line"}

    def not_a_task():
        return 42

    def bad_keys():
        return {"model": nn.Linear(1, 1), "train": (torch.zeros(2, 1),), "eval": (torch.zeros(2, 1),), "extra": 1}

    def encoder(kind="encoder"):
        return {**blobs(), "model_kind": kind}
''')


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_tasks.py"
    path.write_text(FACTORIES, encoding="utf-8")
    return path


def test_dict_factory_from_a_file_trains_with_lora(factory_file):
    task = build_task({"type": "python", "factory": f"{factory_file}:blobs", "args": {"n": 150}})
    assert task.metrics == ("eval_loss", "accuracy")
    assert task.default_metric == "accuracy" and task.default_direction == "maximize"
    assert task.num_train_examples() == 90
    model = task.build_model()
    first = model[0].weight.detach().clone()
    start = task.evaluate(model, 16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inject(model, LoraConfig(rank=2, alpha=4, targets=["0"], modules_to_save=["2"]))
    result = fit(model, task, TrainConfig(epochs=5, batch_size=16, learning_rate=3e-2))
    assert result.final_metrics["accuracy"] > max(start["accuracy"], 0.9)
    assert result.final_metrics["eval_loss"] < start["eval_loss"]
    assert torch.equal(model[0].base_layer.weight, first)
    # the template model is deep-copied: trials never share weights
    assert torch.equal(task.build_model()[0].weight, first)


def test_dict_factory_from_a_module_with_custom_loss_and_metrics(factory_file, monkeypatch):
    monkeypatch.syspath_prepend(str(factory_file.parent))
    task = build_task({"type": "python", "factory": "my_tasks:regression"})
    assert task.name == "line" and task.metrics == ("mse", "n_batches")
    assert task.default_metric == "mse" and task.default_direction == "minimize"
    model = task.build_model()
    before = task.evaluate(model, 4)
    assert before["n_batches"] == 3  # 10 examples in batches of 4
    result = fit(model, task, TrainConfig(epochs=20, batch_size=8, learning_rate=0.1, evals_per_epoch=1))
    assert result.final_metrics["mse"] < before["mse"] / 10
    batch = next(iter(task.train_batches(8, 0, 0)))
    assert batch[0].shape == (8, 1)  # a list of (x, y) examples is collated


class ProtocolTask(Task):
    name = "protocol"
    metrics = ("score",)
    default_metric = "score"
    modules_to_save = []

    def build_model(self):
        return torch.nn.Linear(2, 2)


def make_protocol_task():
    return ProtocolTask()


def test_an_object_with_the_task_protocol_is_used_as_is():
    task = build_task({"type": "python", "factory": "tests.tasks.test_python_factory:make_protocol_task"})
    assert isinstance(task, ProtocolTask)


class WeighingOnly:
    """The Task protocol without subclassing Task, with ``loss_weight`` but no ``batch_tokens``."""

    name, metrics, default_metric, default_direction = "weighing", ("score",), "score", "maximize"
    modules_to_save: list[str] = []
    baseline_targets = "attention-qv"
    build_model = train_batches = num_train_examples = loss = evaluate = to_device = staticmethod(lambda *a: None)

    def loss_weight(self, batch):
        return 7.0


def make_weighing_only():
    return WeighingOnly()


def make_bare_protocol():
    bare = WeighingOnly()
    bare.loss_weight = None  # not callable: as if it had none
    return bare


def test_an_object_missing_a_weighing_method_gets_the_default_for_that_one_only():
    batch = (torch.zeros(3, 2), torch.zeros(3))
    task = build_task({"type": "python", "factory": "tests.tasks.test_python_factory:make_weighing_only"})
    assert task.loss_weight(batch) == 7.0 and task.batch_tokens(batch) == 0  # its own weight is kept
    bare = build_task({"type": "python", "factory": "tests.tasks.test_python_factory:make_bare_protocol"})
    assert bare.loss_weight(batch) == 3.0 and bare.batch_tokens(batch) == 0  # the examples of the batch


@pytest.mark.parametrize("factory, message", [
    ("no_colon", "package.module:function"),
    ("missing_file.py:f", "file not found"),
    ("not_a_module_xyz:f", "not found"),
    ("os:123", "not a function name"),
])
def test_bad_factory_references_are_reported(factory, message):
    problems = dict(validate_task_spec({"type": "python", "factory": factory, "args": [1]}))
    assert message in problems["task.factory"]
    assert "task.args" in problems


def test_dict_factory_model_kind_defaults_to_decoder_and_is_checked(factory_file):
    assert build_task({"type": "python", "factory": f"{factory_file}:blobs"}).model_kind == "decoder"
    assert build_task({"type": "python", "factory": f"{factory_file}:encoder"}).model_kind == "encoder"
    with pytest.raises(ConfigError, match="model_kind 'llm'.*decoder, encoder, vision"):
        build_task({"type": "python", "factory": f"{factory_file}:encoder", "args": {"kind": "llm"}})


@pytest.mark.parametrize("name, message", [
    ("not_a_task", "Task protocol"), ("bad_keys", "extra"), ("nothing_here", "callable named"),
])
def test_bad_factory_results_raise_config_errors(factory_file, name, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_task({"type": "python", "factory": f"{factory_file}:{name}"})
    assert info.value.field == "task.factory"


def test_unknown_task_type_and_non_mapping():
    assert validate_task_spec({"type": "vision"})[0][0] == "task.type"
    assert "digits" in validate_task_spec({"type": "vision"})[0][1]
    assert validate_task_spec({})[0][0] == "task.type"
    assert validate_task_spec(["digits"])[0][0] == "task"


def test_a_factory_file_that_fails_to_import_is_a_config_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def make(:\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="SyntaxError") as info:
        build_task({"type": "python", "factory": f"{broken}:make"})
    assert info.value.field == "task.factory"
