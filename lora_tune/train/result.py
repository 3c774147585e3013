"""What one training run measured: :class:`TrainResult`, made by :func:`lora_tune.train.fit`
and (as a :class:`~lora_tune.train.callbacks.CallbackSummary`) by the framework callbacks.
The study layer stores it as a trial's record (:func:`lora_tune.study.trial.record.run_attrs`)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainResult:
    """What a training run did.

    ``steps``/``planned_steps`` count optimizer steps. ``seconds`` is the wall time of the whole
    loop; ``compute_seconds`` the part spent in forward/backward/optimizer steps and
    ``eval_seconds`` the part in ``task.evaluate``. ``throughput`` is training examples and
    ``tokens_per_second`` non-padding tokens (tasks with ``batch_tokens``) per second of
    compute. ``peak_memory_bytes`` is the growth over the start of the loop,
    ``peak_memory_total_bytes`` the device's absolute peak. ``history`` holds one dict per
    evaluation: the :data:`~lora_tune.train.loop.HISTORY_KEYS` and every metric;
    ``final_metrics`` the last evaluation's metrics.
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
    compute_seconds: float = 0.0
    eval_seconds: float = 0.0
    tokens: int = 0
    tokens_per_second: float = 0.0
    peak_memory_total_bytes: int = 0
    effective_batch_size: int = 0
