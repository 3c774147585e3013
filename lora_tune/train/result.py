"""What one training run measured: :class:`TrainResult` (also the framework callbacks' summary)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainResult:
    """What a training run did. ``seconds`` is the loop's wall time, ``compute_seconds`` its part
    in optimizer steps, which ``throughput`` (examples) and ``tokens_per_second`` are per second
    of; ``peak_memory_bytes`` is the growth over the start. ``history`` holds one dict per
    evaluation: the :data:`~lora_tune.train.loop.HISTORY_KEYS` and every metric. ``log`` holds
    the library warnings and log records the run kept instead of printing them
    (:func:`lora_tune.quiet.captured_library_output`).
    """

    steps: int
    planned_steps: int
    seconds: float
    examples: int
    throughput: float
    peak_memory_bytes: int
    history: list[dict] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    diverged: str | None = None  # why it stopped as diverged (lora_tune.train.divergence), else None
    compute_seconds: float = 0.0
    eval_seconds: float = 0.0
    tokens: int = 0
    tokens_per_second: float = 0.0
    peak_memory_total_bytes: int = 0
    effective_batch_size: int = 0
    log: list[str] = field(default_factory=list)
