"""Nested ranks (DyLoRA): one trained rank-R adapter whose first r components are a rank-r adapter.

Training with nested (ordered) rank dropout, as in DyLoRA (Valipour et al., 2023): each training
micro-batch draws a rank b uniformly from the listed ranks and computes with only the first b
components of every pair (A's first b rows, B's first b columns; per part for fused q/k/v layers),
scaled as a rank-b adapter is (``alpha_b / b``, or ``alpha_b / sqrt(b)`` with rslora). All of the
first b components are updated (DyLoRA's "full" mode); the later ones get no gradient that step.
Afterwards the first r components of the rank-R adapter form a rank-r adapter for every listed r.

* :class:`NestedRanks` -- the listed ranks and each rank's alpha (plain data, picklable);
* :func:`set_active_rank` -- make the wrappers compute with the first b components (training);
* :func:`truncate` / :func:`truncated` -- make the model's adapter a real rank-r adapter (factors
  sliced and copied, ``r``, ``alpha`` and ``scaling`` set), in place or for a ``with`` block: what
  evaluation scores and :func:`lora_tune.save_adapter` writes, so a saved truncation reloads
  into exactly the model that was scored;
* :class:`NestedTask` -- a task for :func:`lora_tune.train.fit` whose ``loss`` draws the rank and
  whose ``evaluate`` also scores every smaller rank (metrics named ``accuracy@rank4``, ...).

Only the layer knows its factors' layout: the slicing is ``lora_tune.lora.adapter_base.active_factor``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, Protocol, cast
from collections.abc import Iterator

import torch
from torch import nn

from lora_tune.errors import ConfigError
from lora_tune.lora.inject import _lora_params, lora_layers
from lora_tune.lora.config import scale_for

__all__ = ["NestedRanks", "NestedTask", "set_active_rank", "truncate", "truncated", "rank_key", "split_rank_metrics"]

RANK_SEP = "@rank"
SIZE_KEYS = ("trainable_params", "adapter_bytes")  # per-rank sizes NestedTask adds to each rank's metrics


@dataclass(frozen=True)
class NestedRanks:
    """The ranks one adapter is trained for, ascending (the last, R, is the trained rank), and the
    alpha of each rank's adapter. ``sample``: nested rank dropout while training (False trains
    rank R plainly; the smaller ranks are still scored, as plain truncations)."""

    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    rslora: bool = False
    sample: bool = True

    def __post_init__(self) -> None:
        ranks = tuple(self.ranks)
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks) or any(
                a >= b for a, b in zip(ranks, ranks[1:])):
            raise ConfigError("rank.nested", list(ranks), "integers >= 1 in increasing order")
        if len(self.alphas) != len(ranks) or any(not (a > 0 and math.isfinite(a)) for a in self.alphas):
            raise ConfigError("alpha", list(self.alphas), f"one alpha > 0 per nested rank ({len(ranks)})")
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))

    @property
    def top(self) -> int:
        return self.ranks[-1]

    @property
    def smaller(self) -> tuple[int, ...]:
        return self.ranks[:-1]

    def alpha_of(self, r: int) -> float:
        return self.alphas[self.ranks.index(r)]

    def scaling_of(self, r: int) -> float:
        return scale_for(r, self.alpha_of(r), self.rslora)


# -- the model's wrappers --------------------------------------------------------------------------

class _FactorOwner(Protocol):
    """A module that owns a pair (an nn.Module; ``active_rank``: see ``active_factor``)."""

    r: int
    active_rank: int | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]: ...


def _factor_modules(model: nn.Module) -> list[_FactorOwner]:
    """Modules that own a pair (``lora_A`` registered on them): wrappers, MHA projections."""
    return [cast(_FactorOwner, m) for m in model.modules() if "lora_A" in dict(m.named_parameters(recurse=False))]


def check_model(model: nn.Module, nested: NestedRanks) -> None:
    """Every pair must have rank R, be unmerged, and honour ``active_rank``."""
    factors = _factor_modules(model)
    if not factors:
        raise ConfigError("rank.nested", list(nested.ranks), "a model adapted by lora_tune.inject",
                          "the model has no lora-tune LoRA layers")
    for m in factors:
        if m.r != nested.top:
            raise ConfigError("rank.nested", list(nested.ranks), f"every adapted module at rank {nested.top}",
                              f"a {type(m).__name__} has rank {m.r}")
        whole = dict(m.named_parameters(recurse=False))["lora_A"]
        m.active_rank = nested.ranks[0]
        honoured = m.lora_A is not whole
        m.active_rank = None
        if not honoured and nested.smaller:
            raise ConfigError("rank.nested", list(nested.ranks), "layers whose factors can be truncated",
                              f"{type(m).__name__} does not support nested ranks")
    for _, w in lora_layers(model):
        if w.merged:
            raise ConfigError("rank.nested", list(nested.ranks), "an unmerged model", "call unmerge(model) first")
        if not math.isclose(w.scaling, nested.scaling_of(nested.top), rel_tol=1e-6):
            raise ConfigError("alpha", w.lora_alpha,
                              f"the alpha of nested rank {nested.top}: {nested.alpha_of(nested.top)}",
                              "every adapted module must use the study's alpha")


def set_active_rank(model: nn.Module, nested: NestedRanks, b: int | None) -> None:
    """Compute with the first ``b`` components of every pair, scaled as a rank-b adapter
    (``None`` or R: the whole adapter). The parameters themselves are not changed."""
    active = None if b is None or b == nested.top else int(b)
    scaling = nested.scaling_of(nested.top if active is None else active)
    for m in _factor_modules(model):
        m.active_rank = active
    for _, w in lora_layers(model):
        w.scaling = scaling


def truncate(model: nn.Module, nested: NestedRanks, r: int) -> nn.Module:
    """Make the model's rank-R adapter the rank-r adapter of its first r components, in place:
    the factors are sliced and copied into new parameters, and every wrapper's ``r``, ``lora_alpha``
    and ``scaling`` (and the recorded LoraConfig's rank and alpha) are those of rank r."""
    check_model(model, nested)
    if r not in nested.ranks:
        raise ConfigError("rank", r, "one of the nested ranks " + ", ".join(map(str, nested.ranks)))
    for m in _factor_modules(model):
        whole = dict(m.named_parameters(recurse=False))
        m.active_rank = r
        A, B = m.lora_A.detach().clone(), m.lora_B.detach().clone()
        m.active_rank = None
        m.lora_A = nn.Parameter(A, requires_grad=whole["lora_A"].requires_grad)
        m.lora_B = nn.Parameter(B, requires_grad=whole["lora_B"].requires_grad)
        m.r = r
    for _, w in lora_layers(model):
        w.r, w.lora_alpha, w.scaling = r, nested.alpha_of(r), nested.scaling_of(r)
    config = getattr(model, "_lora_tune_config", None)
    if config is not None:
        model._lora_tune_config = dataclasses.replace(config, rank=r, alpha=nested.alpha_of(r))
    return model


@contextlib.contextmanager
def truncated(model: nn.Module, nested: NestedRanks, r: int) -> Iterator[nn.Module]:
    """:func:`truncate` for the ``with`` block; the rank-R adapter (the same parameter objects,
    so an optimizer holding them goes on) is back afterwards."""
    factors = [(m, dict(m.named_parameters(recurse=False)), m.r) for m in _factor_modules(model)]
    wrappers = [(w, w.r, w.lora_alpha, w.scaling) for _, w in lora_layers(model)]
    config = getattr(model, "_lora_tune_config", None)
    try:
        yield truncate(model, nested, r)
    finally:
        for m, params, rank in factors:
            m.lora_A, m.lora_B, m.r = params["lora_A"], params["lora_B"], rank
        for w, rank, alpha, scaling in wrappers:
            w.r, w.lora_alpha, w.scaling = rank, alpha, scaling
        if config is not None:
            model._lora_tune_config = config


def adapter_sizes(model: nn.Module) -> dict[str, float]:
    """Trainable parameters and adapter bytes of the model as it is now (e.g. truncated)."""
    return {"trainable_params": float(sum(p.numel() for p in model.parameters() if p.requires_grad)),
            "adapter_bytes": float(sum(p.numel() * p.element_size() for p in _lora_params(model)))}


# -- metric names ----------------------------------------------------------------------------------

def rank_key(name: str, r: int) -> str:
    """The name of metric ``name`` of the rank-r truncation: ``accuracy@rank4``."""
    return f"{name}{RANK_SEP}{r}"


def split_rank_metrics(metrics: dict[str, float]) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """``(the full rank's metrics, {r: rank r's metrics})`` of a :class:`NestedTask` evaluation."""
    full: dict[str, float] = {}
    by_rank: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        name, sep, rank = key.rpartition(RANK_SEP)
        if sep and rank.isdigit():
            by_rank.setdefault(int(rank), {})[name] = value
        else:
            full[key] = value
    return full, dict(sorted(by_rank.items()))


# -- training ----------------------------------------------------------------------------------------

class NestedTask:
    """``task`` for :func:`lora_tune.train.fit` with nested rank dropout.

    ``loss`` draws the active rank of the step (uniformly from the listed ranks, from its own
    generator seeded with ``seed``: the global random state, and so a run without sampling, is
    untouched) -- once per micro-batch, which is once per optimizer step without gradient
    accumulation. ``evaluate`` scores the whole rank-R adapter under the task's metric names,
    then each smaller rank's truncation (:func:`truncated`) as ``NAME@rankR`` together with its
    ``trainable_params@rankR`` and ``adapter_bytes@rankR``. Everything else is the task's.
    """

    def __init__(self, task: Any, model: nn.Module, nested: NestedRanks, seed: int):
        check_model(model, nested)
        self.__dict__.update(_task=task, nested=nested, _rng=random.Random(seed))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_task"], name)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.nested.sample:
            set_active_rank(model, self.nested, self._rng.choice(self.nested.ranks))
        return self._task.loss(model, batch)

    def evaluate(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        set_active_rank(model, self.nested, None)
        metrics = dict(self._task.evaluate(model, batch_size))
        for r in self.nested.smaller:
            with truncated(model, self.nested, r):
                scored = {**self._task.evaluate(model, batch_size), **adapter_sizes(model)}
            metrics.update({rank_key(k, r): float(v) for k, v in scored.items()})
        return metrics
