"""CLI: ``lora-tune worker NAME`` over :mod:`lora_tune.study.run.runner` and :mod:`lora_tune.study.run.workers`."""
from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from typing import Any

import click

from lora_tune.errors import ConfigError

ALLOW_CODE_HELP = ("Let the stored study import names matching this shell pattern (its task.factory, "
                   "model_factory, metric 'module:function'); repeatable; also $LORA_TUNE_ALLOW_CODE "
                   "(comma-separated). Without it only a --study-file's names are imported.")
STUDY_FILE_HELP = ("The study file the study was created from: its code names are allowed when the stored "
                   "task section is the same.")


def register(cli: click.Group, study: click.Group) -> None:
    """Add this module's commands to the root group and the `study` group."""
    cli.add_command(worker)


@click.command("worker")
@click.argument("name")
@click.option("--storage", "storage_url", default=None, metavar="URL",
              help="Study storage: postgresql+psycopg://USER@HOST/DB, grpc://HOST:PORT (a lora-tune "
                   "storage-proxy), journal:PATH or sqlite:///FILE (default: $LORA_TUNE_STORAGE, then "
                   "sqlite:///lora_tune.db).")
@click.option("--jobs", "-j", type=int, default=1, show_default=True,
              help="Worker processes to start on this machine (needs a journal or database storage).")
@click.option("--n-trials", type=int, default=None, help="Run at most this many trials in this worker.")
@click.option("--timeout", type=float, default=None, help="Start no new trial after this many seconds.")
@click.option("--objective", "objective_path", default=None, metavar="MODULE:FUNCTION",
              help="Run your own Optuna objective instead of the study file's LoRA objective "
                   "(for a plain Optuna study; its user attribute n_trials is the budget).")
@click.option("--allow-code", "allow_code", multiple=True, metavar="PATTERN",
              help=ALLOW_CODE_HELP)
@click.option("--study-file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help=STUDY_FILE_HELP)
@click.option("--quiet", "-q", is_flag=True, help="Print only errors.")
def worker(name: str, storage_url: str | None, jobs: int, n_trials: int | None, timeout: float | None,
           objective_path: str | None, allow_code: tuple[str, ...], study_file: str | None, quiet: bool) -> None:
    """Run trials of study NAME until its n_trials budget is used by all workers together.

    Start one per GPU on any number of machines with the same --storage (a database, or
    grpc://HOST:PORT of a `lora-tune storage-proxy`); a killed worker's trial is failed by
    heartbeat and retried with the same parameters by another worker.
    """
    from lora_tune.study.storage import opening as st
    from lora_tune.study.run import workers as wk
    st.install_log_masking()
    logging.getLogger("lora_tune").setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if n_trials is not None and n_trials < 1:
        raise ConfigError("--n-trials", n_trials, "an integer >= 1")
    if timeout is not None and timeout <= 0:
        raise ConfigError("--timeout", timeout, "a number of seconds > 0")
    url = st.resolve_storage_url(storage_url, None)
    wk.check_parallel_storage(url, jobs)
    if objective_path:  # a plain Optuna study: no torch, no study file
        from lora_tune.study.run.samplers import load_plain_study

        study, spec = load_plain_study(name, url), None
    else:  # its own sampler seed per process, so concurrent workers do not propose the same points
        from lora_tune.study.run import runner
        study, spec = runner.load_study(name, url, seed_offset=os.getpid(), allow_code=allow_code,
                                        study_file=study_file)
    try:
        objective = _import_objective(objective_path) if objective_path else None
        if jobs > 1:
            extra = ["--quiet"] if quiet else []
            if objective_path:
                extra += ["--objective", objective_path]
            if n_trials is not None:
                extra += ["--n-trials", str(n_trials)]
            if timeout is not None:
                extra += ["--timeout", str(timeout)]
            for pattern in allow_code:
                extra += ["--allow-code", pattern]
            if study_file is not None:
                extra += ["--study-file", os.path.abspath(study_file)]
            if not quiet:
                click.echo(f"starting {jobs} workers on study {name!r} in {st.mask_url(url)}")
            try:
                failed = wk.run_jobs(study, url, jobs, extra_args=extra)
            except KeyboardInterrupt:
                _summary(study, quiet, "interrupted; the workers re-queued their running trials")
                raise click.exceptions.Exit(130) from None
            _summary(study, quiet, f"{jobs} workers done ({failed} failed)")
            if failed:
                raise click.exceptions.Exit(1)
            return
        if not quiet:
            click.echo(f"worker {wk.worker_id()} on study {name!r} in {st.mask_url(url)}")
        if objective is not None:
            stats = wk.run_worker(study, objective, n_trials=n_trials, timeout=timeout)
            if stats.interrupted:
                _summary(study, quiet, f"interrupted; re-queued trial(s) {stats.requeued or 'none'}")
                raise click.exceptions.Exit(130)
            _summary(study, quiet, f"this worker ran {stats.trials} trial(s)")
            return
        result = runner.optimize(study, spec, n_trials=n_trials, timeout=timeout)
        _summary(study, quiet, f"this worker ran {result.trials_run} trial(s), stopped by {result.stop_reason}")
        if result.stop_reason == "interrupted":
            raise click.exceptions.Exit(130)
    finally:
        st.close_study(study)


def _import_objective(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError("--objective", path, "MODULE:FUNCTION, e.g. mypkg.search:objective")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("--objective", path, "an importable module", str(exc)) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError("--objective", path, f"a callable named {attr!r} in module {module_name}")
    return function


def _summary(study: Any, quiet: bool, head: str) -> None:
    if quiet:
        return
    from optuna.trial import TrialState

    counts = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                            TrialState.RUNNING, TrialState.WAITING)}
    for trial in study.get_trials(deepcopy=False):
        key = trial.state.name.lower()
        counts[key] = counts.get(key, 0) + 1
    click.echo(f"{head}; study {study.study_name!r}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
