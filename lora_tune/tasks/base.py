"""The Task protocol, shared helpers for built-in tasks, and task-spec checking.

A task owns a pretrained base model and its data. A trial leases the base
(``lease_model``: the task's resident base, :mod:`lora_tune.tasks.resident`, or a fresh copy from
``build_model()`` for tasks without one), injects LoRA, runs :func:`lora_tune.train.fit` (which
uses ``train_batches`` / ``loss`` / ``evaluate`` / ``to_device``) and gives the base back
(``give_back_model``), which detaches the adapters. Tasks cache everything expensive
(pretrained weights, tokenized data) so a trial pays only for training.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from lora_tune.errors import ConfigError, short
from lora_tune.train.task import examples_weight
from lora_tune.tasks.data_files import regular_file_problem
from lora_tune.tasks.resident import BaseVariant, ResidentBase

Problems = list[tuple[str, str]]
MODEL_KINDS = ("decoder", "encoder", "vision")  # Task.model_kind: picks the typical LoRA learning rate
# metrics minimized, by the end of their name (losses, errors, perplexity, the adapter's size)
MINIMIZED_METRICS = ("loss", "error", "perplexity", "mse", "mae", "rmse", "wer", "cer", "trainable_params")


def metric_direction(metric: str) -> str:
    """Which way ``metric`` goes when nobody said: ``minimize`` for names ending in one of
    :data:`MINIMIZED_METRICS` (any case), else ``maximize``. Studies, python factories and the
    ``trainer`` task all use this rule."""
    return "minimize" if metric.lower().endswith(MINIMIZED_METRICS) else "maximize"


class Task:
    """Base class of tasks. Subclasses set the attributes and implement the methods."""

    name: str = "task"
    metrics: tuple[str, ...] = ()
    default_metric: str = ""
    default_direction: str = "maximize"
    modules_to_save: list[str] = []
    baseline_targets: str = "attention-qv"
    model_kind: str = "decoder"  # one of MODEL_KINDS; the warm-start prior's learning rates follow it

    resident: ResidentBase | None = None  # the base kept across trials (None: a fresh copy per trial)
    majority_accuracy: float | None = None  # accuracy of predicting the eval set's majority class (classifiers)
    prior_loss: float | None = None  # cross-entropy of predicting the training labels' frequencies (classifiers)

    def build_model(self) -> torch.nn.Module:
        """A fresh copy of the pretrained base model (CPU, eval mode)."""
        raise NotImplementedError

    def lease_model(self, config: Any, device: Any = "cpu") -> tuple[torch.nn.Module, str]:
        """The base a trial with LoRA config ``config`` attaches its adapters to, and how it was had
        (``built``, ``resident`` or ``cache``); give it back with :meth:`give_back_model`."""
        if self.resident is None:
            return self.build_model(), "built"
        return self.resident.lease(BaseVariant.of(config, device))

    def give_back_model(self, model: torch.nn.Module, clean: bool = True) -> None:
        """The trial is done with ``model``: detach its adapters from the resident base (or drop
        the base, ``clean=False``, when the trial may have left it inconsistent)."""
        if self.resident is not None:
            self.resident.give_back(model, clean)

    def structure(self) -> torch.nn.Module:
        """A model with the base's modules and shapes, for checks of targets and layers (its
        weights may be empty); not trained, not changed."""
        template = getattr(self, "template", None)
        return template.structure if isinstance(template, ModelTemplate) else self.build_model()

    def train_batches(self, batch_size: int, seed: int, epoch: int) -> Iterable[Any]:
        """One epoch of training batches in a deterministic order for ``(seed, epoch)``."""
        raise NotImplementedError

    def num_train_examples(self) -> int:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        """Every metric named in ``metrics``; leaves the model's train/eval mode as it found it."""
        raise NotImplementedError

    def to_device(self, batch: Any, device: torch.device | str) -> Any:
        return move_to_device(batch, device)

    def loss_weight(self, batch: Any) -> float:
        """The units :meth:`loss` averages over: the examples of the batch (tokens for LMs)."""
        return examples_weight(batch)

    def batch_tokens(self, batch: Any) -> int:
        """Non-padding tokens of a batch; 0 for tasks that do not count tokens."""
        return 0

    def describe(self) -> dict[str, Any]:
        """A small JSON-able summary (sizes, model name) for logs and reports."""
        return {"name": self.name, "train_examples": self.num_train_examples()}


def lease_base(task: Any, config: Any, device: Any = "cpu") -> tuple[torch.nn.Module, str]:
    """``task.lease_model`` for any task object: one with the bare protocol (no ``lease_model``)
    builds a fresh model per trial."""
    lease = getattr(task, "lease_model", None)
    return lease(config, device) if lease is not None else (task.build_model(), "built")


def give_back_base(task: Any, model: torch.nn.Module, clean: bool = True) -> None:
    """``task.give_back_model`` for any task object (nothing to do without one)."""
    give_back = getattr(task, "give_back_model", None)
    if give_back is not None:
        give_back(model, clean)


def structure_of(task: Any) -> torch.nn.Module:
    """``task.structure()`` for any task object (a fresh model without one)."""
    structure = getattr(task, "structure", None)
    return structure() if structure is not None else task.build_model()


# -- model templates ------------------------------------------------------------------------

class ModelTemplate:
    """Keeps one pretrained model in memory: hands out deep copies of it (``fresh``) and a
    resident base (``resident``: one copy per base variant, quantized at inject) for trials."""

    def __init__(self, model: torch.nn.Module):
        self._model = model.cpu().eval()
        for p in self._model.parameters():
            p.requires_grad_(True)
        # each variant's copy lives on the trial's device (adapters are attached and detached there)
        self.resident = ResidentBase(lambda variant: (self.fresh().to(variant.device), "built"))

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self._model)

    @property
    def structure(self) -> torch.nn.Module:
        """The template itself, for checks that only read it."""
        return self._model


# -- batching -------------------------------------------------------------------------------

def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**63))
    return torch.randperm(n, generator=gen)


def index_batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    order = epoch_permutation(n, seed, epoch)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(move_to_device(v, device) for v in batch)
    if isinstance(batch, list):
        return [move_to_device(v, device) for v in batch]
    return batch


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class eval_mode:
    """Context manager: ``model.eval()`` and ``torch.no_grad()``, restoring the previous mode."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self) -> torch.nn.Module:
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


# -- metrics --------------------------------------------------------------------------------

def majority_share(labels: torch.Tensor) -> float:
    """The accuracy of always predicting the most frequent of ``labels`` (``Task.majority_accuracy``)."""
    return float(torch.bincount(labels.long().flatten().cpu()).max()) / max(1, labels.numel())


def prior_loss(labels: torch.Tensor) -> float:
    """The cross-entropy of predicting ``labels``' frequencies for every input (``Task.prior_loss``):
    the loss a classifier reaches without reading its input (their entropy, in nats)."""
    counts = torch.bincount(labels.long().flatten().cpu()).double()
    share = counts[counts > 0] / counts.sum().clamp(min=1)
    return float(-(share * share.log()).sum())


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over classes present in labels or predictions)."""
    preds = preds.long().cpu()
    labels = labels.long().cpu()
    if labels.numel() == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    accuracy = float((preds == labels).float().mean())
    k = max(num_classes, int(preds.max()) + 1, int(labels.max()) + 1)
    tp = torch.bincount(labels[preds == labels], minlength=k).double()
    pred_count = torch.bincount(preds, minlength=k).double()
    true_count = torch.bincount(labels, minlength=k).double()
    present = (pred_count + true_count) > 0
    f1 = 2 * tp / (pred_count + true_count).clamp(min=1)
    return {"accuracy": accuracy, "macro_f1": float(f1[present].mean())}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


# -- cache ----------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$LORA_TUNE_CACHE``, else ``$XDG_CACHE_HOME/lora-tune``, else ``~/.cache/lora-tune``."""
    env = os.environ.get("LORA_TUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lora-tune"


# -- spec checking --------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One key of a task spec: ``check(value) -> message or None``."""

    check: Callable[[Any], str | None]
    required: bool = False
    help: str = ""


def check_spec(spec: Any, fields: Mapping[str, Field], prefix: str = "task") -> Problems:
    """Every problem of ``spec`` against ``fields``: unknown keys, missing keys, bad values."""
    if not isinstance(spec, Mapping):
        return [(prefix, f"must be a mapping, got {type(spec).__name__}")]
    problems: Problems = []
    for key in spec:
        if key not in fields:
            problems.append((f"{prefix}.{key}", "unknown key; allowed: " + ", ".join(sorted(fields))))
    for key, field in fields.items():
        if key not in spec or spec[key] is None:
            if field.required:
                problems.append((f"{prefix}.{key}", f"is required ({field.help})" if field.help else "is required"))
            continue
        message = field.check(spec[key])
        if message:
            problems.append((f"{prefix}.{key}", message))
    return problems


def is_str(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else f"must be a non-empty string, got {short(value)}"


def is_int(low: int = 1) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"must be an integer >= {low}, got {short(value)}"
        return None
    return check


def is_fraction(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        return f"must be a number between 0 and 1 (exclusive), got {short(value)}"
    return None


def is_str_list(value: Any) -> str | None:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        return f"must be a list of module-name patterns, got {short(value)}"
    return None


def is_choice(choices: Sequence[Any]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}; got {short(value)}"
    return check


def is_existing_file(suffixes: Sequence[str] = (), many: bool = False) -> Callable[[Any], str | None]:
    """An existing file (with one of ``suffixes``); with ``many``, also a non-empty list of them."""
    def check(value: Any) -> str | None:
        if many and isinstance(value, (list, tuple)) and value:
            messages = [check(v) for v in value]
            return next((m for m in messages if m), None)
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            return f"must be a file path, got {short(value)}"
        path = Path(value).expanduser()
        if not path.is_file():  # missing, a directory, a FIFO, a device
            return regular_file_problem(path) or f"file not found: {short(str(path))}"
        if suffixes and path.suffix.lower() not in suffixes:
            return f"{str(path)!r} has suffix {path.suffix!r}; allowed: {', '.join(suffixes)}"
        return None
    return check


def raise_problems(problems: Problems, spec: Any) -> None:
    """Raise a :class:`ConfigError` naming the first problem and listing the rest."""
    if not problems:
        return
    path, message = problems[0]
    error = ConfigError(path, _lookup(spec, path), message)
    error.problems = list(problems)
    lines = [f"{len(problems)} problem(s) in the task spec:"] + [f"  {p}: {m}" for p, m in problems]
    error.args = ("\n".join(lines),)
    raise error


def _lookup(spec: Any, path: str) -> Any:
    value = {"task": spec}
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            return None
    return value
