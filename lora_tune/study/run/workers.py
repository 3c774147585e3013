"""Workers: the trial loop of one process, and ``--jobs N`` processes on one machine.

:func:`run_worker` runs trials until the study's global budget (its ``n_trials``) is used.
The budget is exact across any number of workers: the storage starts a trial only after
counting, under a lock shared by every worker, the trials that already use the budget
(:mod:`lora_tune.study.storage.budget`; behind a storage proxy, the proxy's storage does
it). A worker that finds the budget used while other workers' trials still run waits for
them: if one of those workers dies, its trial is failed and re-queued with the same
parameters, and a waiting worker runs it. A dead worker is recognised by its heartbeat going
stale (:mod:`lora_tune.study.storage.heartbeat`, any storage, any machine) or, on the same machine,
at once by its process id being gone.

:func:`run_jobs` starts N worker processes (``lora-tune worker``) sharing a storage that
several processes can use (a journal file, a database server or a storage proxy, never plain
SQLite). When a child dies, its unfinished trials are failed and re-queued at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lora_tune.errors import ConfigError
from lora_tune.study import _optuna_private as private
from lora_tune.study.storage.heartbeat import HeartbeatSettings, StaleWatch, TrialHeartbeat
from lora_tune.study.run.samplers import OrderedGridSampler
from lora_tune.study.storage.opening import OpenedStorage, mask_url, storage_kind
from lora_tune.study.storage.budget import BudgetReached, budget_done, study_budget
from lora_tune.study.storage.marks import WORKER_KEY, worker_id

_logger = logging.getLogger("lora_tune.workers")

Callback = Callable[[optuna.Study, FrozenTrial], None]


@dataclasses.dataclass
class WorkerStats:
    """What one worker did."""

    trials: int = 0
    states: dict[str, int] = dataclasses.field(default_factory=dict)
    budget_reached: bool = False
    interrupted: bool = False
    requeued: list[int] = dataclasses.field(default_factory=list)
    lost: list[int] = dataclasses.field(default_factory=list)  # trials failed by others while running here


def run_worker(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    callbacks: Iterable[Callback] = (),
    catch: tuple[type[BaseException], ...] = (Exception,),
    settings: HeartbeatSettings | None = None,
    wait_for_running: bool = True,
    poll_interval: float = 0.5,
    reseed: bool = True,
) -> WorkerStats:
    """Run trials of ``study`` in this process until its budget is used.

    The budget is the study's own (:func:`~lora_tune.study.storage.budget.study_budget`; none:
    run until ``n_trials`` / ``timeout``, which limit this worker only). Exceptions from the
    objective fail the trial, not the worker (``catch``). ``settings``: heartbeats and retries
    (default: the stored study file's). SIGTERM fails the running trial and re-queues its
    parameters, then the worker returns with ``interrupted`` set.

    When the budget is used but trials still run, the worker waits for them
    (``wait_for_running``): a dead worker's trial is re-queued and must be run by someone.
    A trial of this worker that another worker failed as stale meanwhile is dropped (logged,
    counted in ``lost``); its retry runs the same parameters.
    """
    storage = private.study_storage(study)
    if not isinstance(storage, OpenedStorage):
        raise TypeError("run_worker needs a study opened with lora_tune.study.storage.opening.open_storage")
    claim_sqlite(storage.url)
    settings = settings or HeartbeatSettings.from_study(study.user_attrs)
    if reseed:  # workers sharing a seeded sampler must not all draw the same points
        study.sampler.reseed_rng()
    order_grid(study)
    watch = StaleWatch(settings.grace)
    marked = study_budget(study.user_attrs) is not None and storage.marks_trials_as(worker_id())
    current: dict[str, int] = {}

    def recover() -> list[int]:
        return recover_trials(study, watch, settings, exclude=current.values())

    # trials left RUNNING by a crashed earlier run on this machine: retried now
    stats = WorkerStats(requeued=[])
    recover()
    callbacks = list(callbacks)

    def tracked(trial: optuna.Trial) -> Any:
        current["trial_id"] = private.trial_id(trial)
        with TrialHeartbeat(storage, current["trial_id"], settings.interval, on_beat=recover, marked=marked):
            return objective(trial)

    def count(study_: optuna.Study, trial: FrozenTrial) -> None:
        stats.trials += 1
        stats.states[trial.state.name] = stats.states.get(trial.state.name, 0) + 1
        current.pop("trial_id", None)

    start = time.monotonic()
    wait = poll_interval
    with _sigterm_as_interrupt():
        try:
            while not _done(stats, n_trials, timeout, start):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        study.optimize(tracked, n_trials=1, callbacks=[*callbacks, count], catch=catch)
                    wait = poll_interval
                except BudgetReached:
                    budget = study_budget(study.user_attrs)
                    trials = study.get_trials(deepcopy=False)
                    if budget is None or budget_done(trials) >= budget:
                        stats.budget_reached = True
                        break
                    if recover():
                        continue  # a dead worker's trial is queued again: run it
                    running = [t for t in trials if t.state == TrialState.RUNNING]
                    if not (wait_for_running and running):
                        stats.budget_reached = True
                        break
                    # others still run trials; one may die, be failed and re-queued: look again
                    # soon, then less often (at least every 2 s or heartbeat interval)
                    time.sleep(wait)
                    wait = min(wait * 2, max(poll_interval, min(2.0, settings.interval)))
                except Exception as exc:
                    lost = _lost_trial(study, current.pop("trial_id", None), exc)
                    if lost is None:
                        raise
                    stats.lost.append(lost.number)
                    _logger.warning(
                        "trial %d was failed by another worker while this one ran it (no heartbeat "
                        "reached the storage for %.0f s); its result is dropped and its retry runs "
                        "the same parameters", lost.number, settings.grace)
                if private.stop_requested(study):  # e.g. GridSampler: every grid point was evaluated
                    break
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM, in a trial or while waiting
            stats.interrupted = True
            trial_id = current.pop("trial_id", None)
            if trial_id is not None:
                stats.requeued += requeue_trials(study, [trial_id], settings.failed_trial_retries,
                                                 failed_by_us=True)
    storage.remove_session()
    return stats


def _done(stats: WorkerStats, n_trials: int | None, timeout: float | None, start: float) -> bool:
    if n_trials is not None and stats.trials >= n_trials:
        return True
    return timeout is not None and time.monotonic() - start >= timeout


def _lost_trial(study: optuna.Study, trial_id: int | None, exc: BaseException) -> FrozenTrial | None:
    """This worker's trial, if ``exc`` says someone else finished it meanwhile (a worker that
    judged it stale): Optuna then refuses the update or the tell of an already finished trial."""
    refused = isinstance(exc, optuna.exceptions.UpdateFinishedTrialError) or (
        isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a "))
    if trial_id is None or not refused:
        return None
    trial = private.study_storage(study).get_trial(trial_id)
    return trial if trial.state.is_finished() else None


def order_grid(study: optuna.Study) -> None:
    """Give ``study`` an :class:`~lora_tune.study.run.samplers.OrderedGridSampler` when its sampler
    is a plain GridSampler (one built outside lora-tune; sampler type ``grid`` already is one):
    the same grid in the same order, its points chosen in trial-number order."""
    sampler = study.sampler
    if isinstance(sampler, optuna.samplers.GridSampler) and not isinstance(sampler, OrderedGridSampler):
        study.sampler = OrderedGridSampler.like(sampler)


def requeue_trials(study: optuna.Study, trial_ids: Sequence[int], max_retry: int, *,
                   failed_by_us: bool = False, reason: str | None = None) -> list[int]:
    """Fail the given unfinished trials and queue their parameters again.

    Returns the numbers of the trials that were re-queued (a trial already retried
    ``max_retry`` times is only failed). Trials that finished meanwhile are left alone
    (someone else failed and re-queued them), except, with ``failed_by_us``, FAIL trials this
    process failed itself (an interrupted trial).
    """
    storage = private.study_storage(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    requeued = []
    for trial_id in trial_ids:
        trial = storage.get_trial(trial_id)
        if trial.state.is_finished():
            if not (failed_by_us and trial.state == TrialState.FAIL):
                continue
        else:
            try:
                if reason:
                    storage.set_trial_user_attr(trial_id, "fail_reason", reason)
                if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        failed = storage.get_trial(trial_id)
        if failed.state != TrialState.FAIL:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry(study, failed)
        # the callback re-queues unless the trial's retry history is already max_retry long
        if len(failed.system_attrs.get("retry_history", [])) < max_retry:
            requeued.append(failed.number)
    return requeued


def recover_trials(study: optuna.Study, watch: StaleWatch, settings: HeartbeatSettings,
                   exclude: Iterable[int] = ()) -> list[int]:
    """Fail and re-queue the RUNNING trials of dead workers: those of this machine whose
    process is gone (at once) and those whose heartbeat ``watch`` finds stale."""
    storage = private.study_storage(study)
    running = storage.get_all_trials(private.study_id(study), deepcopy=False, states=(TrialState.RUNNING,))
    skip = set(exclude)
    host, me = worker_id().rpartition(":")[0], os.getpid()
    requeued = []
    for trial in running:
        where, _, pid = str(trial.system_attrs.get(WORKER_KEY, "")).rpartition(":")
        if (where == host and pid.isdigit() and int(pid) != me and not _alive(int(pid))
                and private.trial_id(trial) not in skip):
            requeued += requeue_trials(study, [private.trial_id(trial)], settings.failed_trial_retries,
                                       reason=f"its worker {where}:{pid} exited mid-trial")
    for trial in watch.stale(running, skip):
        requeued += requeue_trials(study, [private.trial_id(trial)], settings.failed_trial_retries,
                                   reason=f"no heartbeat for {settings.grace:.0f} s (study.grace_period): "
                                          f"its worker {trial.system_attrs.get(WORKER_KEY, '?')} is presumed dead")
    return requeued


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def recover_worker(study: optuna.Study, worker: str, max_retry: int) -> list[int]:
    """Fail and re-queue the RUNNING trials of a worker (``hostname:pid``) known to be dead."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    ids = [private.trial_id(t) for t in running if t.system_attrs.get(WORKER_KEY) == worker]
    return requeue_trials(study, ids, max_retry)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (docker stop, scale down) into KeyboardInterrupt in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------ --jobs N
def check_parallel_storage(url: str, jobs: int) -> None:
    """Refuse ``jobs`` > 1 on a storage that one process only may use (plain SQLite)."""
    if jobs < 1:
        raise ConfigError("--jobs", jobs, "an integer >= 1")
    if jobs == 1:
        return
    kind = storage_kind(url)
    if kind in ("sqlite", "memory"):
        raise ConfigError(
            "--jobs", jobs,
            "1 with SQLite storage",
            f"SQLite ({mask_url(url)}) locks the whole database file, so several processes "
            "fail with 'database is locked' and can leave queued trials behind. For several "
            "processes on this machine use --storage journal:./lora_tune.log (a journal file); "
            "for several machines use postgresql+psycopg://USER@HOST/DB",
        )


_SQLITE_CLAIMS: dict[str, int] = {}
_SQLITE_CLAIMS_LOCK = threading.Lock()


def claim_sqlite(url: str) -> None:
    """Refuse a second worker process on one SQLite file (this process keeps the claim).

    SQLite locks the whole file for each write; several processes fail with "database is
    locked". Threads of one process are fine. Released when the process exits.
    """
    if storage_kind(url) != "sqlite":
        return
    import sqlalchemy as sa

    database = sa.engine.make_url(url).database or ""
    path = os.path.abspath(database) + ".lora-tune.pid"
    with _SQLITE_CLAIMS_LOCK:  # threads of this process share the claim
        if path not in _SQLITE_CLAIMS:
            _claim_file(url, path)


def _claim_file(url: str, path: str) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no claim
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            "storage", mask_url(url), "one worker process at a time with SQLite",
            f"Process {other} is already running trials on this file; SQLite locks the whole file, "
            "so several processes fail with 'database is locked'. For several processes on this "
            "machine use --storage journal:./lora_tune.log; for several machines use "
            "postgresql+psycopg://USER@HOST/DB",
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _SQLITE_CLAIMS[path] = fd


def worker_command(name: str, extra: Sequence[str] = ()) -> list[str]:
    """The command line of one ``lora-tune worker`` process. The storage URL travels in the
    child's ``LORA_TUNE_STORAGE``, never on the command line, where ``ps`` would show a password."""
    return [sys.executable, "-m", "lora_tune.cli.main", "worker", name, *extra]


def visible_gpus(environ: dict[str, str] | None = None) -> list[str]:
    """GPU ids to spread ``--jobs`` workers over: ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``."""
    import shutil

    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        out = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def run_jobs(
    study: optuna.Study,
    url: str,
    jobs: int,
    *,
    extra_args: Sequence[str] = (),
    failed_trial_retries: int | None = None,
    max_rounds: int = 3,
    env: dict[str, str] | None = None,
) -> int:
    """Run ``jobs`` worker processes on ``study`` until its budget is used.

    Returns the number of children that failed (0 when all were fine). With GPUs, worker i
    sees only GPU ``i mod n`` (``CUDA_VISIBLE_DEVICES``). A child that dies (killed, crashed)
    has its RUNNING trials failed and re-queued at once; if queued trials are left when every
    child has exited, a new round of workers is started (up to ``max_rounds``). SIGTERM or
    Ctrl-C stops the children (each re-queues its running trial) and then this process.
    """
    check_parallel_storage(url, jobs)
    if failed_trial_retries is None:
        failed_trial_retries = HeartbeatSettings.from_study(study.user_attrs).failed_trial_retries
    base_env = dict(os.environ if env is None else env)
    gpus = visible_gpus(base_env)
    name = study.study_name
    failures = 0
    with _sigterm_as_interrupt():
        for _round in range(max_rounds):
            children = []
            for i in range(jobs):
                child_env = dict(base_env)
                child_env["LORA_TUNE_STORAGE"] = url
                if gpus:
                    child_env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
                children.append(subprocess.Popen(worker_command(name, extra_args), env=child_env))
            try:
                failures += _wait_children(study, children, failed_trial_retries)
            except KeyboardInterrupt:
                for child in children:
                    if child.poll() is None:
                        child.terminate()
                for child in children:
                    child.wait()
                raise
            trials = study.get_trials(deepcopy=False)
            waiting = [t for t in trials if t.state == TrialState.WAITING]
            budget = study_budget(study.user_attrs)
            if not waiting or (budget is not None and budget_done(trials) >= budget):
                break
            _logger.warning("%d queued trial(s) left after the workers exited; starting workers again",
                            len(waiting))
    return failures


def _wait_children(study: optuna.Study, children: list[subprocess.Popen], max_retry: int) -> int:
    host = worker_id().rpartition(":")[0]
    failures = 0
    alive = list(children)
    while alive:
        time.sleep(0.2)
        for child in list(alive):
            code = child.poll()
            if code is None:
                continue
            alive.remove(child)
            if code != 0:
                failures += 1
                requeued = recover_worker(study, f"{host}:{child.pid}", max_retry)
                _logger.warning(
                    "worker %d exited with %s; re-queued trial(s) %s", child.pid, code, requeued or "none",
                )
    return failures
