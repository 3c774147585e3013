"""CLI: ``lora-tune worker NAME`` - run trials of a stored study until its budget is used.

Start one per GPU, on as many machines as you like, all with the same ``--storage``
(PostgreSQL for several machines); the study's ``n_trials`` is shared by all of them.
``--jobs N`` starts N worker processes on this machine.
"""
from __future__ import annotations

import importlib
import os
import logging
from typing import Any, Callable

import click

from lora_tune.errors import ConfigError, StudyNotFoundError


def register(cli: click.Group, study: click.Group) -> None:
    """Add this module's commands to the root group and the `study` group."""
    cli.add_command(worker)


@click.command("worker")
@click.argument("name")
@click.option("--storage", "storage_url", default=None, metavar="URL",
              help="Study storage: postgresql+psycopg://USER@HOST/DB, journal:PATH or sqlite:///FILE "
                   "(default: $LORA_TUNE_STORAGE, then sqlite:///lora_tune.db).")
@click.option("--jobs", "-j", type=int, default=1, show_default=True,
              help="Worker processes to start on this machine (needs a journal or database storage).")
@click.option("--n-trials", type=int, default=None, help="Run at most this many trials in this worker.")
@click.option("--timeout", type=float, default=None, help="Start no new trial after this many seconds.")
@click.option("--objective", "objective_path", default=None, metavar="MODULE:FUNCTION",
              help="Run your own Optuna objective instead of the study file's LoRA objective "
                   "(for a plain Optuna study; its user attribute n_trials is the budget).")
@click.option("--quiet", "-q", is_flag=True, help="Print only errors.")
def worker(name: str, storage_url: str | None, jobs: int, n_trials: int | None, timeout: float | None,
           objective_path: str | None, quiet: bool) -> None:
    """Run trials of study NAME until its n_trials budget is used by all workers together.

    Start one per GPU on any number of machines with the same --storage; a killed worker's
    trial is failed by heartbeat and retried with the same parameters by another worker.
    """
    from lora_tune.study import storage as st
    from lora_tune.study import workers as wk

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

    study, spec = _load(name, url, plain=objective_path is not None)
    storage = study._storage
    try:
        settings = _spec_settings(spec)
        st.configure_heartbeat(storage, **settings)
        retries = settings["failed_trial_retries"]
        if retries is None:
            retries = st.DEFAULT_FAILED_TRIAL_RETRIES
        if jobs > 1:
            extra = ["--quiet"] if quiet else []
            if objective_path:
                extra += ["--objective", objective_path]
            if n_trials is not None:
                extra += ["--n-trials", str(n_trials)]
            if timeout is not None:
                extra += ["--timeout", str(timeout)]
            if not quiet:
                click.echo(f"starting {jobs} workers on study {name!r} in {st.mask_url(url)}")
            try:
                failed = wk.run_jobs(study, url, jobs, extra_args=extra, failed_trial_retries=retries)
            except KeyboardInterrupt:
                _summary(study, quiet, "interrupted; the workers re-queued their running trials")
                raise click.exceptions.Exit(130) from None
            _summary(study, quiet, f"{jobs} workers done ({failed} failed)")
            if failed:
                raise click.exceptions.Exit(1)
            return
        if not quiet:
            click.echo(f"worker {wk.worker_id()} on study {name!r} in {st.mask_url(url)}")
        if objective_path:
            stats = wk.run_worker(study, _import_objective(objective_path), n_trials=n_trials,
                                  timeout=timeout, failed_trial_retries=retries)
            if stats.interrupted:
                _summary(study, quiet, f"interrupted; re-queued trial(s) {stats.requeued or 'none'}")
                raise click.exceptions.Exit(130)
            _summary(study, quiet, f"this worker ran {stats.trials} trial(s)")
            return
        from lora_tune.study import runner

        result = runner.optimize(study, spec, n_trials=n_trials, timeout=timeout)
        _summary(study, quiet, f"this worker ran {result.trials_run} trial(s), stopped by {result.stop_reason}")
        if result.stop_reason == "interrupted":
            raise click.exceptions.Exit(130)
    finally:
        st.dispose_storage(storage)


def _load(name: str, url: str, *, plain: bool) -> tuple[Any, Any]:
    """The study and its stored study file (``None`` for a plain Optuna study)."""
    import optuna

    from lora_tune.study import storage as st

    if not plain:
        from lora_tune.study import runner

        # its own sampler seed per process, so concurrent workers do not propose the same points
        return runner.load_study(name, url, seed_offset=os.getpid())
    storage = st.open_storage(url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        sampler = _plain_sampler(study.user_attrs.get("sampler"))
        if sampler is not None:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        return study, study.user_attrs.get("spec")
    except KeyError:
        available = [s.study_name for s in storage.get_all_studies()]
        st.dispose_storage(storage)
        raise StudyNotFoundError(name, st.mask_url(url), available) from None


def _plain_sampler(options: Any) -> Any:
    """The sampler a plain study names in its ``sampler`` user attribute (TPE when absent).

    ``{"type": "grid", "search_space": {...}}``, ``{"type": "random", "seed": 0}`` or
    ``{"type": "tpe", "seed": 0}``.
    """
    import optuna

    if options is None:
        return None
    kind = options.get("type") if isinstance(options, dict) else None
    seed = options.get("seed") if isinstance(options, dict) else None
    if kind == "grid" and isinstance(options.get("search_space"), dict):
        return optuna.samplers.GridSampler(options["search_space"], seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise ConfigError("study user attribute sampler", options,
                      "{type: grid, search_space: {...}} | {type: random} | {type: tpe}")


def _spec_settings(spec: Any) -> dict[str, Any]:
    """Heartbeat settings of the study file (a StudySpec, or its stored dict form)."""
    section = spec.get("study") if isinstance(spec, dict) else getattr(spec, "study", None)
    keys = ("heartbeat_interval", "grace_period", "failed_trial_retries")
    if isinstance(section, dict):
        return {key: section.get(key) for key in keys}
    return {key: getattr(section, key, None) for key in keys}


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
