"""One trial: sample the space, build and adapt the task's model, train with pruning, score it.

:class:`Objective` is what ``study.optimize`` calls. Per trial it

1. samples the search space (:mod:`lora_tune.study.schema.space`);
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
import dataclasses
import logging
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import optuna

from lora_tune.errors import NonFiniteLossError, TrainingOutOfMemoryError
from lora_tune.study.trial import record
from lora_tune.study.integrations.trial_binding import pruned_after_training
from lora_tune.study.trial.nested_trials import record_nested_ranks
from lora_tune.study.schema.space import TRAIN_KEYS, SearchSpace
from lora_tune.study.trial.trial_process import (
    Hooks, TrialChildError, TrialOutcome, TrialPlan, TrialProcessDied, release_memory, run_in_child,
    run_in_process,
)
from lora_tune.study.schema.spec import DRIVER_TRAIN_KEYS, StudySpec

_logger = logging.getLogger(__name__)

WORKER = f"{socket.gethostname()}:{os.getpid()}"


class TrialFailed(Exception):
    """A trial failed; its reason is already recorded in the trial's ``fail_reason``."""


@dataclass
class TrialTimes:
    """Where a trial's wall time went (seconds), for the driver-overhead benchmark."""

    total: float = 0.0
    build: float = 0.0  # task.build_model + inject
    setup: float = 0.0  # the trial's start -> its first optimizer step (``setup_seconds``)
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
        if resolve_isolation(self.spec) == "process":
            self.task = None  # each trial's child builds its own; the driver keeps no model in memory
        self.space = SearchSpace.from_spec(self.spec.search_space)
        self.metrics = self.spec.metrics
        self.prune = not self.spec.is_multi_objective

    def get_task(self) -> Any:
        """The task, built on first use; also loads bitsandbytes once when the space may
        quantize, so that one-off import (seconds) is not charged to a trial."""
        if self.task is None:
            from lora_tune.tasks import build_task

            self.task = build_task(self.spec.resolved_task())
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
        trial.set_user_attr(record.WORKER, WORKER)
        if record.IS_BASELINE not in trial.user_attrs:
            trial.set_user_attr(record.IS_BASELINE, False)
        try:
            return self._run(trial, times, start)
        except (optuna.TrialPruned, TrialFailed):
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM turned into one by the worker loop
            trial.set_user_attr(record.FAIL_REASON,
                                f"interrupted ({exc or 'Ctrl-C'}); the worker re-queues its parameters")
            raise
        except NonFiniteLossError as exc:
            self._fail(trial, f"non-finite loss: {exc}")
        except Exception as exc:  # user code (task, model, data): fail this trial, not the study
            trial.set_user_attr(record.TRACEBACK, traceback.format_exc()[-8000:])
            self._fail(trial, f"{type(exc).__name__}: {exc}")
        finally:
            if self.isolation() == "none":
                release_memory()  # the trial's model is gone: give its CUDA cache back
            times.total = time.perf_counter() - start
            if self.on_times is not None:
                self.on_times(trial.number, times)
        raise AssertionError("unreachable")  # pragma: no cover

    def _run(self, trial: optuna.trial.BaseTrial, times: TrialTimes, start: float) -> float | list[float]:
        """The trial; ``start`` is its ``time.perf_counter()`` when the objective was called."""
        values = self.space.sample(trial)
        train = self.spec.train
        train_values = {k: v for k, v in values.items() if k in TRAIN_KEYS}
        seed = trial.user_attrs.get(record.SEED)
        plan = TrialPlan(
            task_spec=self.spec.resolved_task(),
            lora={k: v for k, v in values.items() if k not in TRAIN_KEYS},
            train=train.train_config(**train_values, data_fraction=self.data_fraction(trial),
                                     **({"seed": int(seed)} if seed is not None else {})),
            threads=train.threads, params=dict(values),
            # the baseline (and its confirmation runs) trains its rank plainly
            nested=None if trial.user_attrs.get(record.IS_BASELINE) else self.space.nested_ranks(trial.params),
            explicit_train=tuple(sorted((train.model_fields_set | set(train_values)) - set(DRIVER_TRAIN_KEYS))))
        targets = plan.lora.get("targets", "all-linear")
        trial.set_user_attr(record.TARGET_PRESET, targets if isinstance(targets, str) else None)
        isolation = self.isolation()
        trial.set_user_attr(record.ISOLATION, isolation)
        trial.set_user_attr(record.EFFECTIVE_BATCH_SIZE, plan.train.effective_batch_size)

        reports = 0  # evaluations reported so far (a retried attempt goes on counting)
        pruned_at: list[int] = []
        trainable: list[int] = []
        t0 = time.perf_counter()

        def built(report: Any, base_load: str = record.BaseLoad.BUILT.value) -> bool:
            times.build = time.perf_counter() - t0
            trial.set_user_attr(record.BASE_LOAD, record.BaseLoad(base_load).value)
            if report.warnings:  # kept with the trial instead of printed once per trial
                trial.set_user_attr(record.WARNINGS, report.warnings)
            trial.set_user_attr(record.TARGET_MODULES, [name for name, _ in report.targets])
            trial.set_user_attr(record.TRAINABLE_PARAMS, int(report.trainable_after))
            trial.set_user_attr(record.ADAPTER_BYTES, int(report.adapter_bytes))
            trainable.append(int(report.trainable_after))
            return self._within_constraints(trial, report.trainable_after)

        def evaluated(step: int, eval_index: int, metrics: dict[str, float]) -> bool:
            nonlocal reports
            reports += 1
            if not self.prune:
                return False
            value = record.objective_value(self.metrics[0], metrics, trainable[-1])
            if not math.isfinite(value):
                return False  # the final check fails the trial with a clear reason
            trial.report(value, reports - 1)
            if step < self.min_steps:  # study.fidelity.min_steps: no decision this early
                return False
            if trial.should_prune():
                pruned_at.append(eval_index)
                return True
            return False

        outcome = self._train(trial, plan, Hooks(built, evaluated), isolation)
        try:
            return self._finish(trial, plan, outcome, times, start, pruned_at, trainable[-1] if trainable else 0)
        finally:
            outcome.close()  # give the base back: the adapter is saved (or the trial ends without one)

    def _finish(self, trial: optuna.trial.BaseTrial, plan: TrialPlan, outcome: TrialOutcome, times: TrialTimes,
                start: float, pruned_at: list[int], trainable: int) -> float | list[float]:
        """Record a trained (or constraint-stopped) trial's result and keep its adapter."""
        if outcome.since_first_step is not None:  # trial start -> first optimizer step, by this clock
            times.setup = max(0.0, time.perf_counter() - start - outcome.since_first_step)
            trial.set_user_attr(record.SETUP_SECONDS, times.setup)
        if outcome.result is None:  # stopped after building: a constraint was violated
            raise optuna.TrialPruned(trial.user_attrs.get(record.CONSTRAINT_VIOLATION, "stopped before training"))
        trial.set_user_attr(record.LORA_CONFIG, outcome.config.to_dict())
        result = outcome.result
        times.train, times.compute, times.evaluate = result.seconds, result.compute_seconds, result.eval_seconds
        fidelity = record.Fidelity(plan.train.data_fraction, int(result.steps), int(result.planned_steps))
        for key, value in {**record.run_attrs(result), record.FIDELITY: fidelity.to_attr()}.items():
            trial.set_user_attr(key, value)
        if result.diverged is not None:  # a training that clearly failed (lora_tune.train.divergence)
            trial.set_user_attr(record.DIVERGED, result.diverged)
            record_nested_ranks(trial, self, plan.nested, outcome, None)
            raise optuna.TrialPruned(f"diverged: {result.diverged}")
        if pruned_at and pruned_after_training(trial, pruned_at[0], result.steps, result.planned_steps):
            pruned_at.clear()
        if pruned_at:
            record_nested_ranks(trial, self, plan.nested, outcome, None)  # nested ranks: the smaller ones, pruned too
            raise optuna.TrialPruned(f"pruned after evaluation {pruned_at[0]} (step {result.steps})")

        out = []
        for name in self.metrics:
            value = record.objective_value(name, result.final_metrics, trainable)
            if not math.isfinite(value):
                self._fail(trial, f"metric {name} is {value} after {result.steps} steps")
            out.append(value)
        value = out[0] if len(out) == 1 else out
        if isinstance(trial, optuna.Trial):  # a real study: keep the adapter of each new best
            _save_adapter_if_best(trial, outcome, value)
        record_nested_ranks(trial, self, plan.nested, outcome, value)  # nested ranks: one result per smaller rank
        return value

    @property
    def min_steps(self) -> int:
        fidelity = self.spec.study.fidelity
        return fidelity.min_steps or 0 if fidelity is not None else 0

    def data_fraction(self, trial: optuna.trial.BaseTrial) -> float:
        """The trial's data fraction: ``study.fidelity``'s first, or its last for a confirmation run."""
        fidelity = self.spec.study.fidelity
        if fidelity is None:
            return 1.0
        confirming = record.kind_of(trial) == record.Kind.CONFIRMATION
        return fidelity.confirm_fraction if confirming else fidelity.trial_fraction

    def isolation(self) -> str:
        """``process`` or ``none`` (see :func:`resolve_isolation`)."""
        return resolve_isolation(self.spec)

    def _train(self, trial: optuna.trial.BaseTrial, plan: TrialPlan, hooks: Hooks, isolation: str) -> TrialOutcome:
        """Run the body where ``isolation`` says; on out-of-memory, fail the trial with the
        batch size and peak, or (``train.oom: halve_batch``) retry once with half the batch
        and twice the accumulation."""
        attempt = plan
        while True:
            try:
                if isolation == "process":
                    return run_in_child(attempt, hooks)
                return run_in_process(self.get_task(), attempt, hooks)
            except TrainingOutOfMemoryError as exc:
                train = attempt.train
                if self.spec.train.oom != "halve_batch" or attempt is not plan or train.batch_size < 2:
                    self._fail(trial, str(exc))
                half = dataclasses.replace(train, batch_size=train.batch_size // 2,
                                           gradient_accumulation_steps=train.gradient_accumulation_steps * 2)
                trial.set_user_attr(record.OOM_RETRY, f"{exc}; retried with batch size {half.batch_size} "
                                                 f"x {half.gradient_accumulation_steps} accumulation steps")
                attempt = dataclasses.replace(plan, train=half)
            except TrialProcessDied as exc:
                self._fail(trial, str(exc))
            except TrialChildError as exc:
                trial.set_user_attr(record.TRACEBACK, exc.traceback)
                self._fail(trial, str(exc))

    def _within_constraints(self, trial: optuna.trial.BaseTrial, trainable: int) -> bool:
        """Record the constraint; False (do not train) when the trial violates it."""
        limit = self.spec.constraints.max_trainable_params
        if limit is None:
            return True
        excess = float(trainable - limit)
        trial.set_constraint("max_trainable_params", excess)
        if excess > 0:
            reason = f"infeasible: {trainable:,} trainable parameters > max_trainable_params {limit:,}"
            trial.set_user_attr(record.CONSTRAINT_VIOLATION, reason)
            return False
        return True

    @staticmethod
    def _fail(trial: optuna.trial.BaseTrial, reason: str) -> None:
        reason = record.stored_reason(reason)  # whole; displays shorten it (record.short_reason)
        trial.set_user_attr(record.FAIL_REASON, reason)
        raise TrialFailed(reason)


def resolve_isolation(spec: StudySpec) -> str:
    """Where trials train: ``process`` or ``none``; ``auto`` is the trial process when training on
    CUDA (where an out-of-memory or a leak must not take the driver down)."""
    from lora_tune.train import resolve_device

    chosen = spec.train.isolation
    if chosen == "auto":
        return "process" if resolve_device(spec.train.device).type == "cuda" else "none"
    return chosen


def _save_adapter_if_best(trial: optuna.Trial, outcome: TrialOutcome, value: Any) -> None:
    """Artifacts attach only to running trials, so this runs inside the objective. A storage
    problem here is recorded and logged; it does not fail a trial whose metric is sound."""
    from lora_tune.errors import LoraTuneError
    from lora_tune.study.trial.artifacts import save_best_adapter

    try:
        save_best_adapter(trial, outcome.model, value, config=outcome.config, archive=outcome.adapter_archive)
    except (OSError, LoraTuneError) as exc:
        trial.set_user_attr(record.ARTIFACT_ERROR, _one_line(str(exc)))
        _logger.warning("trial %d: adapter not saved: %s", trial.number, exc)
    finally:
        if outcome.adapter_archive:
            with contextlib.suppress(OSError):
                os.unlink(outcome.adapter_archive)


def _one_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:500]
