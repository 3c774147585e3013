"""What the Trainer and Lightning callbacks (``hf_callback``, ``lightning_callback``) share,
without Optuna or either framework: :class:`Pruning` (each evaluation -> a go/stop decision by a
:data:`Report` function; under ``torch.distributed`` rank 0 decides for every rank) and
:class:`RunMeter` (the run measured as :func:`lora_tune.train.fit` measures it).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any
from collections.abc import Callable, Mapping

import torch

from lora_tune.errors import ConfigError
from lora_tune.train.memory import MemoryMeter, peak_total_bytes
from lora_tune.train.result import TrainResult

Report = Callable[[int, int, dict], bool]  # (global step, eval index, metrics) -> stop training?

# broadcast codes of rank 0's decision
_GO, _STOP, _FAILED = 0, 1, 2


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation: its 0-based index (the step Optuna sees), the global optimizer step it
    followed, and the monitored metric's value (None when no metric is monitored)."""

    eval_index: int
    step: int
    value: float | None


@dataclass
class CallbackSummary(TrainResult):
    """What a callback measured over one training run (all ranks combined under DDP), with its
    evaluations; ``seconds`` is the wall time from train begin to train end."""

    trainable_params: int = 0
    evaluations: list[EvalRecord] = field(default_factory=list)
    pruned_at: EvalRecord | None = None

    # the names this summary had before it was a TrainResult (public: users' callbacks read them)
    train_seconds = property(lambda self: self.seconds)
    train_tokens = property(lambda self: self.tokens)
    train_examples = property(lambda self: self.examples)
    train_steps = property(lambda self: self.steps)
    metric_values = property(lambda self: self.final_metrics)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- torch.distributed ------------------------------------------------------------------------------

def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def _collective_device() -> torch.device:
    """Where a tensor must be for the default process group: CPU for gloo and mpi, else the accelerator."""
    backend = str(torch.distributed.get_backend())
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def broadcast_code(code: int) -> int:
    """Rank 0's ``code`` on every rank (a no-op without an initialized process group)."""
    if not distributed() or torch.distributed.get_world_size() == 1:
        return code
    tensor = torch.tensor([code], dtype=torch.int64, device=_collective_device())
    torch.distributed.broadcast(tensor, src=0)
    return int(tensor.item())


def gather_values(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (one list per rank, rank order); just ``[values]`` alone."""
    if not distributed() or torch.distributed.get_world_size() == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    everyone = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everyone, mine)
    return [t.tolist() for t in everyone]


# -- deciding ------------------------------------------------------------------------------------------

def metric_key(metric: str, metrics: Mapping[str, Any], field_name: str = "metric") -> str:
    """The key of ``metric`` in ``metrics``: the name itself, or with the ``eval_`` prefix that
    transformers' Trainer adds (as its ``metric_for_best_model`` accepts both)."""
    if metric in metrics:
        return metric
    if f"eval_{metric}" in metrics:
        return f"eval_{metric}"
    returned = ", ".join(sorted(metrics)) or "(none)"
    raise ConfigError(field_name, metric, f"a metric the evaluation returned: {returned}",
                      f"Pass {field_name}= one of those (or compute the metric in the evaluation, "
                      "e.g. with compute_metrics or self.log).")


class Pruning:
    """The go/stop decision after each evaluation: ``metric`` (None: nothing) is checked on every
    rank, ``report`` decides on rank 0 (without one training never stops early)."""

    def __init__(self, metric: str | None, report: Report | None, metric_field: str = "metric"):
        self.metric = metric
        self.metric_field = metric_field
        self.report = report
        self.reset()

    def reset(self) -> None:
        self.evaluations: list[EvalRecord] = []
        self.pruned_at: EvalRecord | None = None
        self.last_metrics: dict[str, float] = {}

    @property
    def main(self) -> bool:
        """Whether this process reports (and records): rank 0."""
        return rank() == 0

    def evaluated(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Record an evaluation after global ``step``; True when training should stop."""
        if self.pruned_at is not None:
            return True
        metrics = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        value = float(metrics[metric_key(self.metric, metrics, self.metric_field)]) if self.metric else None
        record = EvalRecord(len(self.evaluations), int(step), value)
        self.evaluations.append(record)
        self.last_metrics = metrics
        code = _GO
        if self.main and self.report is not None:
            try:
                code = _STOP if self.report(record.step, record.eval_index, dict(metrics)) else _GO
            except BaseException:
                broadcast_code(_FAILED)  # let the other ranks fail too instead of waiting
                raise
        code = broadcast_code(code)
        if code == _FAILED:
            raise RuntimeError(f"rank 0 failed while reporting evaluation {record.eval_index} (step {record.step}); "
                               "see its error")
        if code == _STOP:
            self.pruned_at = record
        return self.pruned_at is not None


def _is_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- measuring ------------------------------------------------------------------------------------------

class RunMeter:
    """Compute time (inside optimizer steps, synchronized on CUDA), examples, tokens (device
    tensors, read at the end), memory and steps of one training run."""

    def __init__(self, model: Any, device: torch.device):
        self.device = device
        params = model.parameters() if model is not None else ()
        self.trainable_params = sum(p.numel() for p in params if p.requires_grad)
        self.memory = MemoryMeter(device)
        self.start = time.perf_counter()
        self.compute = 0.0
        self.examples = 0
        self.tokens: Any = 0
        self._step_start: float | None = None

    def step_begin(self) -> None:
        self._step_start = time.perf_counter()

    def step_end(self) -> None:
        if self._step_start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compute += time.perf_counter() - self._step_start
        self._step_start = None
        self.memory.sample()

    @property
    def in_step(self) -> bool:
        return self._step_start is not None

    def batch(self, batch: Any) -> None:
        """Count a training micro-batch's examples and non-padding tokens."""
        self.examples += batch_examples(batch)
        tokens = batch_tokens(batch)
        if tokens is not None:
            self.tokens = self.tokens + tokens

    def finish(self, pruning: Pruning, train_steps: int, planned_steps: int) -> CallbackSummary:
        """The summary, every rank's counts combined (a collective call under DDP)."""
        self.memory.sample()
        tokens = int(self.tokens.item()) if isinstance(self.tokens, torch.Tensor) else int(self.tokens)
        wall = time.perf_counter() - self.start
        ranks = gather_values([tokens, self.examples, self.compute, wall, self.memory.peak(),
                               peak_total_bytes(self.device)])
        tokens, examples = (int(sum(r[i] for r in ranks)) for i in (0, 1))
        compute, wall, peak, peak_total = (max(r[i] for r in ranks) for i in (2, 3, 4, 5))
        return CallbackSummary(
            steps=int(train_steps), planned_steps=int(planned_steps), seconds=wall, examples=examples,
            throughput=examples / compute if compute > 0 else 0.0, peak_memory_bytes=int(peak),
            final_metrics=dict(pruning.last_metrics), stopped_early=pruning.pruned_at is not None,
            compute_seconds=compute, tokens=tokens, tokens_per_second=tokens / compute if compute > 0 else 0.0,
            peak_memory_total_bytes=int(peak_total), trainable_params=self.trainable_params,
            evaluations=list(pruning.evaluations), pruned_at=pruning.pruned_at)


class ReportingBase:
    """What the framework callbacks share: the decision, the run's meter, and its summary."""

    def __init__(self, pruning: Pruning):
        self.pruning = pruning
        self.summary: CallbackSummary | None = None
        self._meter: RunMeter | None = None

    @property
    def pruned(self) -> bool:
        return self.pruning.pruned_at is not None

    def finished(self, summary: CallbackSummary) -> None:
        """Called on every rank with the run's summary (subclasses record it)."""

    def _start(self, model: Any, device: torch.device) -> RunMeter:
        self.pruning.reset()
        self.summary = None
        self._meter = RunMeter(model, device)
        return self._meter

    def _end(self, steps: int, planned_steps: int) -> None:
        if self._meter is not None:
            self.summary = self._meter.finish(self.pruning, steps, planned_steps)
            self._meter = None
            self.finished(self.summary)


def batch_tokens(batch: Any) -> Any:
    """Non-padding tokens of a batch mapping: its ``attention_mask``'s sum (a 0-d tensor), else its
    ``input_ids``' size (packed batches); None for a batch without either."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # (batch, seq); 4-d masks are additive
        return mask.detach().sum()
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    return None


def batch_examples(batch: Any) -> int:
    """Examples in a batch: the first dimension of its first tensor (0 when it has none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return 0
    for item in items:
        size = batch_examples(item)
        if size:
            return size
    return 0
