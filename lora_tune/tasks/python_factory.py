"""``python``: bring your own model and data through a factory function.

Spec keys::

    type: python
    factory: my_package.tasks:make_task      # or path/to/file.py:make_task (relative to the study file)
    args: {size: 500}                        # optional keyword arguments for the factory

The factory is called once per process as ``factory(**args)`` and returns either

1. an object implementing the Task protocol (see :class:`lora_tune.tasks.base.Task`: ``build_model``,
   ``train_batches``, ``num_train_examples``, ``loss``, ``evaluate``, ``to_device`` and the
   attributes ``name``, ``metrics``, ``default_metric``, ``default_direction``,
   ``modules_to_save``, ``baseline_targets``), used as is; or
2. a dict with these keys:

   ``model`` (required)
       an ``nn.Module`` (deep-copied for every trial, so trials never share weights) or a
       zero-argument callable returning a fresh pretrained module.
   ``train`` (required), ``eval`` (required)
       the data: a tuple of tensors with the same first dimension (e.g. ``(inputs, targets)``),
       sliced into batches of tuples; or any sequence of examples (a list, a torch ``Dataset``),
       batched with ``torch.utils.data.default_collate``.
   ``loss`` (optional)
       ``loss(model, batch) -> scalar tensor``. Default: ``cross_entropy(model(x), y)`` for
       ``batch = (x, y)``.
   ``evaluate`` (optional)
       ``evaluate(model, batches) -> {metric: float}``, given an iterable of evaluation batches
       already on the model's device, called under ``torch.no_grad()`` in eval mode. Default:
       ``eval_loss`` (the mean of ``loss`` over the batches) plus ``accuracy`` when the default
       loss is used.
   ``metrics`` (required with ``evaluate``)
       the metric names ``evaluate`` returns; the first is the default metric.
   ``direction`` (optional)
       ``maximize`` or ``minimize`` for the default metric (default: minimize for names ending in
       loss, error, perplexity, mse, mae, rmse, wer or cer; else maximize:
       :func:`lora_tune.tasks.base.metric_direction`).
   ``modules_to_save`` (optional), ``baseline_targets`` (optional, default ``attention-qv``),
   ``model_kind`` (optional: ``decoder``, the default, ``encoder`` or ``vision``; the learning
   rates of ``warm_start: defaults`` follow it), ``name`` (optional).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from lora_tune.errors import ConfigError
from lora_tune.train.task import TrainTask, examples_weight
from lora_tune.tasks.base import (MODEL_KINDS, Field, Problems, Task, check_spec, eval_mode, index_batches, is_choice,
                                  metric_direction, model_device)

PROTOCOL_METHODS = ("build_model", "train_batches", "num_train_examples", "loss", "evaluate", "to_device")
PROTOCOL_ATTRS = ("name", "metrics", "default_metric", "default_direction", "modules_to_save", "baseline_targets")
DICT_KEYS = ("model", "train", "eval", "loss", "evaluate", "metrics", "direction", "modules_to_save",
             "baseline_targets", "model_kind", "name")


def _check_factory(value: Any) -> str | None:
    target, _, func = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not target:
        return f"must be 'package.module:function' or 'path/to/file.py:function', got {value!r}"
    if not func.isidentifier():
        return f"{func!r} after ':' is not a function name"
    if target.endswith(".py"):
        if not Path(target).expanduser().is_file():
            return f"file not found: {target!r}"
        return None
    try:
        with _cwd_on_path():
            found = importlib.util.find_spec(target)
    except Exception as exc:  # importing a parent package runs user code
        return f"cannot import {target!r}: {type(exc).__name__}: {exc}"
    return None if found is not None else f"module {target!r} not found (is it installed or on PYTHONPATH?)"


def _check_args(value: Any) -> str | None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        return f"must be a mapping of keyword arguments, got {value!r}"
    return None


FIELDS = {
    "type": Field(is_choice(("python",)), required=True),
    "factory": Field(_check_factory, required=True, help="'package.module:function' or 'file.py:function'"),
    "args": Field(_check_args),
}


def validate_spec(spec: Any) -> Problems:
    return check_spec(spec, FIELDS)


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Let ``module:function`` refer to modules in the current directory (as ``python -m`` does)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def load_factory(ref: str) -> Callable[..., Any]:
    """The function ``ref`` names; ConfigError('task.factory') when it cannot be loaded."""
    target, _, func = ref.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            name = f"lora_tune_user_{abs(hash(str(path)))}"
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {path}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            with _cwd_on_path():
                module = importlib.import_module(target)
    except Exception as exc:  # ImportError, or an error raised by the user's module while importing
        raise ConfigError("task.factory", ref, "an importable module or an existing .py file",
                          f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError("task.factory", ref, f"a callable named {func!r} in {target!r}")
    return fn


class TensorData:
    """A tuple of tensors (sliced) or a sequence of examples (collated) as indexable batches."""

    def __init__(self, data: Any, field: str):
        self.tensors = None
        if isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data):
            sizes = {t.shape[0] for t in data}
            if len(sizes) != 1:
                raise ConfigError(field, f"tensors with first dimensions {sorted(sizes)}",
                                  "a tuple of tensors with the same first dimension")
            self.tensors = data
            self.size = sizes.pop()
        elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            self.examples = data
            self.size = len(data)
        else:
            raise ConfigError(field, type(data).__name__, "a tuple of tensors or a sequence of examples")
        if self.size == 0:
            raise ConfigError(field, "(empty)", "at least one example")

    def batch(self, idx: torch.Tensor) -> Any:
        if self.tensors is not None:
            return tuple(t[idx] for t in self.tensors)
        from torch.utils.data import default_collate

        return default_collate([self.examples[i] for i in idx.tolist()])


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch[0], batch[1]
    return F.cross_entropy(model(x), y)


class DictTask(Task):
    """A task made from the dict protocol in the module docstring."""

    def __init__(self, parts: Mapping[str, Any]):
        unknown = sorted(set(parts) - set(DICT_KEYS))
        if unknown:
            raise ConfigError("task.factory", f"returned keys {unknown}", "keys " + ", ".join(DICT_KEYS))
        for key in ("model", "train", "eval"):
            if key not in parts:
                raise ConfigError("task.factory", f"a dict without {key!r}", "a dict with model, train and eval")
        model = parts["model"]
        if isinstance(model, torch.nn.Module):
            template = model.cpu().eval()
            self._make = lambda: copy.deepcopy(template)
        elif callable(model):
            self._make = model
        else:
            raise ConfigError("task.factory", f"model of type {type(model).__name__}",
                              "an nn.Module or a callable returning one")
        self.train = TensorData(parts["train"], "task.factory (train)")
        self.eval = TensorData(parts["eval"], "task.factory (eval)")
        self._loss = parts.get("loss") or _default_loss
        self._evaluate = parts.get("evaluate")
        if self._evaluate is not None:
            metrics = parts.get("metrics")
            if isinstance(metrics, str):
                metrics = [metrics]
            if not metrics or not all(isinstance(m, str) for m in metrics):
                raise ConfigError("task.factory", "evaluate without metrics",
                                  "a 'metrics' list naming what evaluate returns")
            self.metrics = tuple(metrics)
        else:
            self.metrics = ("eval_loss", "accuracy") if parts.get("loss") is None else ("eval_loss",)
        self.default_metric = self.metrics[0] if self._evaluate is not None else (
            "accuracy" if "accuracy" in self.metrics else "eval_loss")
        self.default_direction = parts.get("direction") or metric_direction(self.default_metric)
        if self.default_direction not in ("maximize", "minimize"):
            raise ConfigError("task.factory", self.default_direction, "direction 'maximize' or 'minimize'")
        self.modules_to_save = list(parts.get("modules_to_save") or [])
        self.baseline_targets = parts.get("baseline_targets") or "attention-qv"
        self.model_kind = parts.get("model_kind") or Task.model_kind
        if self.model_kind not in MODEL_KINDS:
            raise ConfigError("task.factory", f"model_kind {self.model_kind!r}", "model_kind " + ", ".join(MODEL_KINDS))
        self.name = parts.get("name") or "python"

    def build_model(self) -> torch.nn.Module:
        model = self._make()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError("task.factory", type(model).__name__, "a model callable returning an nn.Module")
        return model

    def num_train_examples(self) -> int:
        return self.train.size

    def train_batches(self, batch_size: int, seed: int, epoch: int) -> Iterator[Any]:
        for idx in index_batches(self.train.size, batch_size, seed, epoch):
            yield self.train.batch(idx)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self._loss(model, batch)

    def _eval_batches(self, batch_size: int, device: torch.device) -> Iterator[Any]:
        for start in range(0, self.eval.size, batch_size):
            idx = torch.arange(start, min(start + batch_size, self.eval.size))
            yield self.to_device(self.eval.batch(idx), device)

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        device = model_device(model)
        with eval_mode(model):
            if self._evaluate is not None:
                result = dict(self._evaluate(model, self._eval_batches(batch_size, device)))
                missing = [m for m in self.metrics if m not in result]
                if missing:
                    raise ConfigError("task.factory", f"evaluate() result without {missing}",
                                      f"a dict with every metric in {list(self.metrics)}")
                return {k: float(v) for k, v in result.items()}
            total = correct = count = 0.0
            for batch in self._eval_batches(batch_size, device):
                n = len(batch[0]) if isinstance(batch, (tuple, list)) else 1
                if "accuracy" in self.metrics:
                    logits = model(batch[0])
                    total += float(F.cross_entropy(logits, batch[1])) * n
                    correct += float((logits.argmax(-1) == batch[1]).sum())
                else:
                    total += float(self._loss(model, batch)) * n
                count += n
        out = {"eval_loss": total / count}
        if "accuracy" in self.metrics:
            out["accuracy"] = correct / count
        return out


def build(spec: dict) -> Task:
    factory = load_factory(spec["factory"])
    result = factory(**dict(spec.get("args") or {}))
    if isinstance(result, Mapping):
        return DictTask(result)
    missing = [m for m in PROTOCOL_METHODS if not callable(getattr(result, m, None))]
    missing += [a for a in PROTOCOL_ATTRS if not hasattr(result, a)]
    if missing:
        raise ConfigError("task.factory", f"{type(result).__name__} without {missing}",
                          "a dict (see lora_tune.tasks.python_factory) or an object with the Task protocol")
    return result if isinstance(result, TrainTask) else _WithDefaults(result)


class _WithDefaults:
    """A protocol object without ``loss_weight`` or ``batch_tokens``: its own where it has one,
    else :class:`Task`'s default."""

    def __init__(self, task: Any):
        self._task = task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def loss_weight(self, batch: Any) -> float:
        own = getattr(self._task, "loss_weight", None)
        return float(own(batch)) if callable(own) else examples_weight(batch)

    def batch_tokens(self, batch: Any) -> int:
        own = getattr(self._task, "batch_tokens", None)
        return int(own(batch)) if callable(own) else 0
