"""Where a trial trains: in this process, or in a fresh child process (``train.isolation``).

:func:`build_and_train` is the trial's body: build the task's model, inject the trial's LoRA
config, ask whether to go on (the constraint check), train with :func:`lora_tune.train.fit`.
It asks its :class:`Hooks` at two points and knows nothing of Optuna.

:func:`run_in_process` calls the body with hooks that call the parent's own functions.
:func:`run_in_child` runs it in the driver's long-lived trial process for the task
(:class:`TrialProcess`): forked from a ``forkserver`` that has only imported torch and lora-tune
(no CUDA context, no model, no driver memory is inherited), it builds the task once and keeps its
resident base (:mod:`lora_tune.tasks.resident`) across trials, so a later trial pays only for its
own adapters and training. The parent keeps the Optuna trial, receives the built model's report
and every evaluation over a pipe, answers each with its go/stop decision, and gets back the
:class:`~lora_tune.train.TrainResult` and the adapter archive. The process is replaced only when
it dies (the OOM killer, a segfault, SIGKILL: the parent raises :class:`TrialProcessDied` with
the reason) or reports an error that may have left its base dirty (CUDA out of memory), after
which it exits and its memory, CPU or GPU, goes back to the system; any other error in it comes
back as the same kind of error in the parent and it stays for the next trial.

:func:`call_in_child` runs other work in that process (the learning-rate probe before the first
trial: :mod:`lora_tune.study.run.lr_probe`), so it too uses the task and base the trials will.

Either way the outcome says how long before its hand-over the first optimizer step began
(:class:`FirstStepClock`; ``TrialOutcome.since_first_step``): the objective takes that from its own
time since the trial started, and records the rest as the trial's ``setup_seconds``.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import multiprocessing
import os
import signal
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

from lora_tune.errors import LoraTuneError, NonFiniteLossError, TrainingOutOfMemoryError
from lora_tune.train.train_config import torch_threads

OnBuilt = Callable[[Any, str], bool]  # (InjectReport, base load: built/resident/cache) -> go on?
OnEval = Callable[[int, int, dict], bool]  # (step, eval index, metrics) -> stop?


@dataclass
class TrialPlan:
    """Everything a trial's body needs, picklable: the task spec, the LoRA settings (without
    ``modules_to_save``, which come from the task), the training config and CPU threads."""

    task_spec: dict
    lora: dict
    train: Any  # lora_tune.train.TrainConfig
    threads: int | None = None
    adapter_archive: str | None = None  # where the child writes the trained adapter
    params: dict = field(default_factory=dict)  # the trial's sampled values
    explicit_train: tuple[str, ...] = ()  # training settings the study sets (file or search space)
    nested: Any = None  # lora_tune.lora.nested.NestedRanks: train with nested ranks, score each


@dataclass
class Hooks:
    built: OnBuilt
    evaluated: OnEval


@dataclass
class TrialOutcome:
    """What the body produced. ``model`` is None when it trained in a child process; then
    ``adapter_archive`` is the adapter it wrote."""

    report: Any  # InjectReport
    config: Any  # LoraConfig
    result: Any = None  # TrainResult, None when the trial stopped before training
    model: Any = None
    adapter_archive: str | None = None
    warnings: list[str] = field(default_factory=list)
    rank_archives: dict[int, str] = field(default_factory=dict)  # nested ranks, from a child: rank -> archive
    # seconds from the start of the first optimizer step to the hand-over of this outcome, measured
    # where it trained (a child's clock is not the parent's: the parent subtracts it from its own
    # time since the trial started to get the setup); None when it did not train
    since_first_step: float | None = None
    first_step_at: float | None = field(default=None, repr=False)  # perf_counter() there, at that start
    base_load: str = "built"  # how the base was had: built, resident or cache (record.BaseLoad)
    give_back: Callable[..., None] | None = field(default=None, repr=False)

    def close(self, clean: bool = True) -> None:
        """Give the leased base back (detaching the trial's adapters); once, idempotent."""
        give_back, self.give_back = self.give_back, None
        if give_back is not None:
            give_back(clean)

    def handed_over(self) -> TrialOutcome:
        """Note the time since the first optimizer step, now that the outcome leaves the body."""
        if self.first_step_at is not None:
            self.since_first_step = time.perf_counter() - self.first_step_at
        return self


class TrialProcessDied(LoraTuneError):
    """The trial's child process ended without a result (killed by a signal, or exited)."""


class TrialChildError(LoraTuneError):
    """An exception in the trial's child process; ``traceback`` is the child's."""

    def __init__(self, message: str, tb: str = ""):
        self.traceback = tb
        super().__init__(message)


# -- the body ----------------------------------------------------------------------------------

def build_and_train(task: Any, plan: TrialPlan, hooks: Hooks) -> TrialOutcome:
    """Lease the base, inject, check (``hooks.built``), train (``hooks.evaluated`` after each
    evaluation). The outcome holds the adapted model until :meth:`TrialOutcome.close` gives the
    base back (which detaches the adapters); an error gives it back at once."""
    from lora_tune import LoraConfig, inject
    from lora_tune.lora.nested import NestedTask
    from lora_tune.tasks.base import give_back_base, lease_base
    from lora_tune.train import fit, resolve_device

    config = LoraConfig(**plan.lora, modules_to_save=list(task.modules_to_save))
    adapt = getattr(task, "adapt", None)  # tasks may adapt with another injector (trainer: PEFT)
    with torch_threads(plan.threads):  # a base quantized on load honours train.threads
        if adapt is not None:
            model, how = task.build_model(), "built"
        else:
            model, how = lease_base(task, config, resolve_device(plan.train.device))
    outcome = TrialOutcome(report=None, config=config, model=model, base_load=how)
    if adapt is None:
        outcome.give_back = lambda clean=True: give_back_base(task, model, clean)
    try:
        with _seeded(plan.train.seed), warnings.catch_warnings():  # init depends on the seed only
            warnings.filterwarnings("ignore", message="rank .* is larger than min", category=UserWarning)
            model, outcome.report = adapt(model, config) if adapt is not None else (model, inject(model, config))
        outcome.model = model
        if not hooks.built(outcome.report, how):
            return outcome
        train_adapted = getattr(task, "train_adapted", None)  # tasks with their own trainer
        with torch_threads(plan.threads):
            if train_adapted is not None:  # its trainer's own setup counts as training
                outcome.first_step_at = time.perf_counter()
                outcome.result = train_adapted(model, plan.train, hooks.evaluated, params=plan.params,
                                               explicit=plan.explicit_train)
            else:
                fit_task = FirstStepClock(task if plan.nested is None
                                          else NestedTask(task, model, plan.nested, plan.train.seed))
                outcome.result = fit(model, fit_task, plan.train, on_eval=hooks.evaluated)
                outcome.first_step_at = fit_task.first_step_at
    except BaseException as exc:
        outcome.close(clean=not _may_leave_dirty(exc))
        raise
    return outcome


def _may_leave_dirty(exc: BaseException) -> bool:
    """Whether the base is not trusted after ``exc``: out of memory on CUDA, where a kernel may
    have stopped half-way (every other error leaves the frozen base untouched)."""
    return isinstance(exc, TrainingOutOfMemoryError) and str(exc.device).startswith("cuda")


class FirstStepClock:
    """``task`` as :func:`~lora_tune.train.fit` sees it, noting (``first_step_at``,
    ``time.perf_counter()``) when the first optimizer step begins: the first call of a method
    that ``fit`` calls for each step's micro-batches, after the model is on its device, the
    optimizer built and the first batches read. Everything else is the task's."""

    STEP_METHODS = frozenset({"loss_weight", "batch_tokens", "to_device", "loss"})

    def __init__(self, task: Any):
        self.__dict__.update(_task=task, first_step_at=None)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.__dict__["_task"], name)
        if name not in self.STEP_METHODS or self.__dict__["first_step_at"] is not None or not callable(value):
            return value

        def first_call(*args: Any, **kwargs: Any) -> Any:
            if self.__dict__["first_step_at"] is None:
                self.__dict__["first_step_at"] = time.perf_counter()
            return value(*args, **kwargs)

        return first_call


def run_in_process(task: Any, plan: TrialPlan, hooks: Hooks) -> TrialOutcome:
    """The body in this process; the caller calls :func:`release_memory` when done with it."""
    return build_and_train(task, plan, hooks).handed_over()


def release_memory() -> None:
    """Collect the trial's garbage and give cached CUDA blocks back (no-op without CUDA)."""
    import gc

    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


# -- the child ------------------------------------------------------------------------------------

def run_in_child(plan: TrialPlan, hooks: Hooks, poll_seconds: float = 0.5) -> TrialOutcome:
    """The body in this driver's long-lived trial process for ``plan.task_spec``; see the module
    docstring. A process that died, or reported an error that may have left its base dirty, is
    replaced for the next trial; an interrupted trial takes its process down with it."""
    with tempfile.TemporaryDirectory(prefix="lora-tune-trial-") as tmp, _lease(plan.task_spec) as child:
        plan = TrialPlan(**{**plan.__dict__, "adapter_archive": str(Path(tmp) / "adapter.zip")})
        child.conn.send(("trial", plan))
        outcome = _serve(child, hooks, poll_seconds)
        if outcome.adapter_archive:  # keep it past the temporary directory
            outcome.adapter_archive = _keep(outcome.adapter_archive)
        outcome.rank_archives = {r: _keep(path) for r, path in outcome.rank_archives.items()}
        return outcome


def call_in_child(task_spec: dict, function: Callable[..., Any], *args: Any, poll_seconds: float = 0.5) -> Any:
    """``function(task, *args)`` in this driver's trial process for ``task_spec`` (``function`` a
    module-level function, pickled by name; its result pickled back): work that must run where the
    trials run and keep no model in the driver, such as the learning-rate probe before the first
    trial. The process and its resident base stay in the pool for the trials; errors come back as
    :func:`run_in_child`'s do."""
    with _lease(task_spec) as child:
        child.conn.send(("call", function, args))
        kind, payload = _receive(child, poll_seconds)
        if kind == "result":
            return payload[0]
        if kind == "error":
            *described, dirty = payload
            raise _ChildFailed(_rebuild_error(*described), dirty)
        raise RuntimeError(f"unexpected message {kind!r} from the trial process")  # pragma: no cover


def _key(task_spec: dict) -> str:
    return json.dumps(task_spec, sort_keys=True, default=str)


@contextlib.contextmanager
def _lease(task_spec: dict) -> Iterator[TrialProcess]:
    """This driver's idle trial process for ``task_spec`` (a new one when none is idle), out of the
    pool while in use (a concurrent trial starts its own) and back in it after, unless it died, was
    interrupted or reported an error that may have left its base dirty: then it is closed."""
    key = _key(task_spec)
    with _LOCK:
        child = _POOL.pop(key, None)
    if child is None or not child.process.is_alive():
        child = TrialProcess(task_spec)
    keep = False
    try:
        yield child
        keep = True
    except _ChildFailed as failed:
        keep = not failed.dirty
        raise failed.error from None
    finally:
        _pool(key, child, keep)


def _pool(key: str, child: TrialProcess, keep: bool = True) -> None:
    """Keep ``child`` as the idle process of its task, or close it."""
    if not keep or not child.process.is_alive():
        child.close(wait=0.0)
        return
    with _LOCK:
        pooled = _POOL.setdefault(key, child) is child
    if not pooled:  # another process of the task went back first: one idle per task is enough
        child.close()


class TrialProcess:
    """A trial process for one task spec: it builds the task (and so its resident base) once and
    runs the trials sent to it, one at a time, until told to exit or its pipe closes."""

    def __init__(self, task_spec: dict):
        ctx = _context(task_spec.get("type"))
        self.conn, child_end = ctx.Pipe()
        self.process = ctx.Process(target=_child_main, args=(child_end, dict(task_spec)),
                                   name="lora-tune-trial", daemon=True)
        self.process.start()
        child_end.close()

    def close(self, wait: float = 5.0) -> None:
        """Ask the process to exit; after ``wait`` seconds terminate it, then kill it."""
        with contextlib.suppress(OSError, ValueError):
            if wait > 0:
                self.conn.send(("exit",))
        with contextlib.suppress(OSError):
            self.conn.close()
        _stop(self.process, wait)


_POOL: dict[str, TrialProcess] = {}  # task spec (JSON) -> its idle trial process
_LOCK = threading.Lock()


def prestart(task_spec: dict) -> None:
    """Start the trial process for ``task_spec`` now and let it build its task (imports, data),
    so that the first trial does not wait for them; a no-op when one is already idle."""
    with _LOCK:
        if _key(task_spec) in _POOL:
            return
    child = TrialProcess(task_spec)
    child.conn.send(("warm",))
    _pool(_key(task_spec), child)


def close_trial_processes() -> None:
    """End every idle trial process of this driver (at the end of a run; also at exit)."""
    with _LOCK:
        children = list(_POOL.values())
        _POOL.clear()
    for child in children:
        child.close()


def trial_process_pids() -> list[int]:
    """Process ids of this driver's idle trial processes."""
    with _LOCK:
        return [c.process.pid for c in _POOL.values() if c.process.pid is not None]


atexit.register(close_trial_processes)


class _ChildFailed(Exception):
    """An error reported by the trial process; ``dirty``: it exits, not to be reused."""

    def __init__(self, error: BaseException, dirty: bool):
        super().__init__(str(error))
        self.error, self.dirty = error, dirty


def _keep(path: str) -> str:
    """Move a file out of the trial's temporary directory; returns its new path."""
    with tempfile.NamedTemporaryFile(prefix="lora-tune-adapter-", suffix=".zip", delete=False) as kept:
        pass  # only its (reserved) name is needed; the file is closed before it is replaced
    os.replace(path, kept.name)
    return kept.name


def _context(task_type: str | None) -> Any:
    """The forkserver context; its server (started with the first trial) preloads the modules
    every child needs, with the module of the task type (e.g. transformers for ``sft``)."""
    import importlib

    from lora_tune.tasks import TASK_TYPES, task_module_name

    ctx = multiprocessing.get_context("forkserver")
    extra: list[str] = []
    if task_type in TASK_TYPES:
        name = task_module_name(task_type)
        extra = [name, *getattr(importlib.import_module(name), "HEAVY_IMPORTS", ())]
    ctx.set_forkserver_preload(list(PRELOAD) + extra)
    return ctx


# Imported once by the fork server; a module that is not installed is skipped by multiprocessing.
PRELOAD = ("torch", "lora_tune.study.trial.trial_process", "lora_tune.tasks", "lora_tune.train",
           "lora_tune.study.trial.artifacts")


def _receive(child: TrialProcess, poll_seconds: float) -> tuple[str, list[Any]]:
    """The trial process's next message; :class:`TrialProcessDied` when it dies first."""
    conn, process = child.conn, child.process
    while not conn.poll(poll_seconds):
        if not process.is_alive():
            process.join()
            raise TrialProcessDied(_death_reason(process.exitcode))
    try:
        kind, *payload = conn.recv()
    except (EOFError, OSError):
        process.join(timeout=10)
        raise TrialProcessDied(_death_reason(process.exitcode)) from None
    return kind, payload


def _serve(child: TrialProcess, hooks: Hooks, poll_seconds: float) -> TrialOutcome:
    """Answer the child's messages until it sends its outcome or dies."""
    conn = child.conn
    report = None
    while True:
        kind, payload = _receive(child, poll_seconds)
        if kind == "built":
            report, base_load = payload
            go = hooks.built(report, base_load)
            conn.send(go)
            if not go:
                return TrialOutcome(report=report, config=None, base_load=base_load)
        elif kind == "eval":
            conn.send(bool(hooks.evaluated(*payload)))
        elif kind == "done":
            result, config, archive, archive_error, rank_archives, since_first_step = payload
            outcome = TrialOutcome(report=report, config=config, result=result, adapter_archive=archive,
                                   rank_archives=rank_archives, since_first_step=since_first_step)
            if archive_error:
                outcome.warnings.append(f"adapter not written: {archive_error}")
            return outcome
        elif kind == "error":
            *described, dirty = payload
            raise _ChildFailed(_rebuild_error(*described), dirty)
        else:  # pragma: no cover - a programming error
            raise RuntimeError(f"unknown message {kind!r} from the trial process")


def _child_main(conn: Any, task_spec: dict) -> None:
    """Entry point of a trial process: build the task on the first message (``warm``, sent by
    :func:`prestart`, or the first trial), then run each trial sent, send its outcome and give its
    base back; exit on ``exit``, a closed pipe, or an error that may have left the base dirty."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    task = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message[0] not in ("trial", "warm", "call"):
            break
        try:
            if task is None:
                from lora_tune.tasks import build_task

                task = build_task(dict(task_spec))
            if message[0] == "trial":
                _child_trial(conn, task, message[1])
            elif message[0] == "call":  # call_in_child
                function, args = message[1], message[2]
                conn.send(("result", function(task, *args)))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            if message[0] == "warm":  # nobody waits for it: the first trial builds the task again and says why
                continue
            dirty = _may_leave_dirty(exc) or not isinstance(exc, Exception)
            with contextlib.suppress(Exception):
                conn.send(("error", *_describe_error(exc), dirty))
            if dirty:
                break
        finally:
            release_memory()
    conn.close()


def _child_trial(conn: Any, task: Any, plan: TrialPlan) -> None:
    """One trial in the trial process: the body with hooks over the pipe, the adapter archives."""

    def built(report: Any, base_load: str) -> bool:
        conn.send(("built", report, base_load))
        return bool(conn.recv())

    def evaluated(step: int, index: int, metrics: dict) -> bool:
        conn.send(("eval", step, index, metrics))
        return bool(conn.recv())

    outcome = build_and_train(task, plan, Hooks(built, evaluated))
    try:
        if outcome.result is None:  # stopped after building: the parent has its answer
            return
        archive, archive_error, rank_archives = None, None, {}
        if plan.adapter_archive:
            from lora_tune.study.trial.artifacts import write_adapter_archive

            try:
                write_adapter_archive(outcome.model, Path(plan.adapter_archive), config=outcome.config)
                archive = plan.adapter_archive
                if plan.nested is not None:  # each smaller rank's truncated adapter too
                    from lora_tune.study.trial.nested_trials import write_rank_archives

                    rank_archives = write_rank_archives(outcome.model, plan.nested, outcome.config,
                                                        Path(plan.adapter_archive).parent)
            except (OSError, LoraTuneError) as exc:
                archive_error = str(exc)
        outcome.handed_over()
        conn.send(("done", outcome.result, outcome.config, archive, archive_error, rank_archives,
                   outcome.since_first_step))
    finally:
        outcome.close()


def _describe_error(exc: BaseException) -> tuple:
    tb = traceback.format_exc()[-8000:]
    if isinstance(exc, TrainingOutOfMemoryError):
        return ("oom", str(exc), tb, (exc.batch_size, exc.peak_bytes, exc.device))
    if isinstance(exc, NonFiniteLossError):
        return ("nonfinite", str(exc), tb, (exc.step, exc.value))
    if isinstance(exc, LoraTuneError) and isinstance(exc, ValueError):
        return ("config", f"{type(exc).__name__}: {exc}", tb, ())
    return ("other", f"{type(exc).__name__}: {exc}", tb, ())


def _rebuild_error(kind: str, message: str, tb: str, extra: tuple) -> BaseException:
    if kind == "oom":
        return TrainingOutOfMemoryError(*extra)
    if kind == "nonfinite":
        return NonFiniteLossError(*extra)
    return TrialChildError(message, tb)


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the kernel's OOM killer sends SIGKILL when memory runs out)" if name == "SIGKILL" else ""
        return f"the trial process was killed by {name}{hint}"
    return f"the trial process exited with code {exitcode} before sending a result"


def _stop(process: Any, wait: float) -> None:
    """Let the child exit by itself for ``wait`` seconds, then terminate it, then kill it."""
    process.join(timeout=wait)
    if process.is_alive():
        process.terminate()
        process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join()


# -- helpers -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with torch's CPU generator seeded, restoring the caller's random state after."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


