"""One trial: sample the space, build and adapt the task's model, train with pruning, score it.

:class:`Objective` is what ``study.optimize`` calls. Per trial it

1. samples the search space (:mod:`lora_tune.study.space`);
2. builds a fresh copy of the task's pretrained base model and injects LoRA with
   :func:`lora_tune.inject` (the task's ``modules_to_save`` are trained fully);
3. checks ``constraints.max_trainable_params`` with ``trial.set_constraint``; an infeasible
   trial is pruned before training (no compute is spent on it);
4. trains with :func:`lora_tune.train.fit`, reporting the objective metric after every
   evaluation and stopping when the pruner says so (single-objective studies only);
5. returns the metric value(s).

Every trial records the user attributes listed in docs/architecture.md. A non-finite loss or
metric, or an exception anywhere in the trial, fails the trial (``fail_reason``, and
``traceback`` for exceptions) by raising :class:`TrialFailed`, which the runner passes to
``study.optimize(catch=...)`` so the study goes on.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import optuna

from lora_tune.errors import NonFiniteLossError
from lora_tune.study.space import SearchSpace
from lora_tune.study.spec import StudySpec

_logger = logging.getLogger(__name__)

WORKER = f"{socket.gethostname()}:{os.getpid()}"


class TrialFailed(Exception):
    """A trial failed; its reason is already recorded in the trial's ``fail_reason``."""


@dataclass
class TrialTimes:
    """Where a trial's wall time went (seconds), for the driver-overhead benchmark."""

    total: float = 0.0
    build: float = 0.0  # task.build_model + inject
    train: float = 0.0  # the whole fit() call
    compute: float = 0.0  # forward/backward/optimizer steps inside fit
    evaluate: float = 0.0  # task.evaluate inside fit


@dataclass
class Objective:
    """Callable objective for ``study.optimize``; holds the task (built once per process)."""

    spec: StudySpec
    task: Any = None
    on_times: Callable[[int, TrialTimes], None] | None = None
    space: SearchSpace = field(init=False)

    def __post_init__(self) -> None:
        self.space = SearchSpace.from_spec(self.spec.search_space)
        self.metrics = self.spec.metrics
        self.prune = not self.spec.is_multi_objective

    def get_task(self) -> Any:
        """The task, built on first use; also loads bitsandbytes once when the space may
        quantize, so that one-off import (seconds) is not charged to a trial."""
        if self.task is None:
            from lora_tune.tasks import build_task

            self.task = build_task(dict(self.spec.task))
            quant = self.space["quant_bits"]
            if quant is not None and any(b in (4, 8) for b in (quant.choices if quant.sampled else [quant.value])):
                with contextlib.suppress(Exception):  # absent: those trials fail with a clear reason
                    from lora_tune.lora.quant import warm_up

                    warm_up()
        return self.task

    # -- the trial -----------------------------------------------------------------------
    def __call__(self, trial: optuna.trial.BaseTrial) -> float | list[float]:
        times = TrialTimes()
        start = time.perf_counter()
        trial.set_user_attr("worker", WORKER)
        if "is_baseline" not in trial.user_attrs:
            trial.set_user_attr("is_baseline", False)
        try:
            return self._run(trial, times)
        except (optuna.TrialPruned, TrialFailed):
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM turned into one by the worker loop
            trial.set_user_attr("fail_reason", f"interrupted ({exc or 'Ctrl-C'}); the worker re-queues its parameters")
            raise
        except NonFiniteLossError as exc:
            self._fail(trial, f"non-finite loss: {exc}")
        except Exception as exc:  # user code (task, model, data): fail this trial, not the study
            trial.set_user_attr("traceback", traceback.format_exc()[-8000:])
            self._fail(trial, f"{type(exc).__name__}: {_one_line(str(exc))}")
        finally:
            times.total = time.perf_counter() - start
            if self.on_times is not None:
                self.on_times(trial.number, times)
        raise AssertionError("unreachable")  # pragma: no cover

    def _run(self, trial: optuna.trial.BaseTrial, times: TrialTimes) -> float | list[float]:
        from lora_tune import LoraConfig, inject
        from lora_tune.train import TrainConfig, fit

        task = self.get_task()
        values = self.space.sample(trial)
        lora_kwargs = {k: v for k, v in values.items() if k not in _TRAIN_KEYS}
        train_kwargs = self.spec.train.model_dump()
        threads = train_kwargs.pop("threads", None)
        train_kwargs.update({k: v for k, v in values.items() if k in _TRAIN_KEYS})

        t0 = time.perf_counter()
        targets = lora_kwargs.get("targets", "all-linear")
        preset = targets if isinstance(targets, str) else None
        config = LoraConfig(**lora_kwargs, modules_to_save=list(task.modules_to_save))
        with _seeded(train_kwargs["seed"]), warnings.catch_warnings():  # init depends on the seed only
            warnings.filterwarnings("ignore", message="rank .* is larger than min", category=UserWarning)
            model = task.build_model()
            report = inject(model, config)
        if report.warnings:  # kept with the trial instead of printed once per trial
            trial.set_user_attr("warnings", report.warnings)
        times.build = time.perf_counter() - t0

        trial.set_user_attr("lora_config", config.to_dict())
        trial.set_user_attr("target_preset", preset)
        trial.set_user_attr("target_modules", [name for name, _ in report.targets])
        trial.set_user_attr("trainable_params", int(report.trainable_after))
        trial.set_user_attr("adapter_bytes", int(report.adapter_bytes))
        self._check_constraints(trial, report.trainable_after)

        pruned_at: list[int] = []

        def on_eval(step: int, eval_index: int, metrics: dict[str, float]) -> bool:
            if not self.prune:
                return False
            value = _objective_value(self.metrics[0], metrics, report.trainable_after)
            if not math.isfinite(value):
                return False  # the final check fails the trial with a clear reason
            trial.report(value, eval_index)
            if trial.should_prune():
                pruned_at.append(eval_index)
                return True
            return False

        with _torch_threads(threads):
            result = fit(model, task, TrainConfig(**train_kwargs), on_eval=on_eval)
        times.train, times.compute, times.evaluate = result.seconds, result.compute_seconds, result.eval_seconds
        trial.set_user_attr("peak_memory_bytes", int(result.peak_memory_bytes))
        trial.set_user_attr("train_seconds", float(result.seconds))
        trial.set_user_attr("throughput", float(result.throughput))
        trial.set_user_attr("train_steps", int(result.steps))
        trial.set_user_attr("planned_steps", int(result.planned_steps))
        trial.set_user_attr("metric_values", {k: _jsonable(v) for k, v in result.final_metrics.items()})
        if pruned_at:
            raise optuna.TrialPruned(f"pruned after evaluation {pruned_at[0]} (step {result.steps})")

        out = []
        for name in self.metrics:
            value = _objective_value(name, result.final_metrics, report.trainable_after)
            if not math.isfinite(value):
                self._fail(trial, f"metric {name} is {value} after {result.steps} steps")
            out.append(value)
        value = out[0] if len(out) == 1 else out
        if isinstance(trial, optuna.Trial):  # a real study: keep the adapter of each new best
            _save_adapter_if_best(trial, model, value, config)
        return value

    def _check_constraints(self, trial: optuna.trial.BaseTrial, trainable: int) -> None:
        limit = self.spec.constraints.max_trainable_params
        if limit is None:
            return
        excess = float(trainable - limit)
        trial.set_constraint("max_trainable_params", excess)
        if excess > 0:
            reason = f"infeasible: {trainable:,} trainable parameters > max_trainable_params {limit:,}"
            trial.set_user_attr("constraint_violation", reason)
            raise optuna.TrialPruned(reason)

    @staticmethod
    def _fail(trial: optuna.trial.BaseTrial, reason: str) -> None:
        trial.set_user_attr("fail_reason", reason)
        raise TrialFailed(reason)


_TRAIN_KEYS = ("learning_rate", "weight_decay", "epochs", "batch_size", "grad_clip")


def _objective_value(name: str, metrics: dict[str, float], trainable: int) -> float:
    if name == "trainable_params":
        return float(trainable)
    if name not in metrics:
        raise KeyError(f"the task did not report metric {name!r}; it reported {sorted(metrics)}")
    return float(metrics[name])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with torch's CPU generator seeded, restoring the caller's random state after."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (None: unchanged), restoring the previous count."""
    import torch

    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _save_adapter_if_best(trial: optuna.Trial, model: Any, value: Any, config: Any) -> None:
    """Artifacts attach only to running trials, so this runs inside the objective. A storage
    problem here is recorded and logged; it does not fail a trial whose metric is sound."""
    from lora_tune.errors import LoraTuneError
    from lora_tune.study.artifacts import save_best_adapter

    try:
        save_best_adapter(trial, model, value, config=config)
    except (OSError, LoraTuneError) as exc:
        trial.set_user_attr("artifact_error", _one_line(str(exc)))
        _logger.warning("trial %d: adapter not saved: %s", trial.number, exc)


def _jsonable(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _one_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:500]
