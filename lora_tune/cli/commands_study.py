"""CLI commands: ``validate``, ``run``, ``study create|optimize|list|show``."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import click
from rich.console import Console
from rich.table import Table

from lora_tune.cli.commands_worker import ALLOW_CODE_HELP, STUDY_FILE_HELP
from lora_tune.tasks.allow_code import Allowance, trusted_refs

STORAGE_HELP = ("Storage URL (sqlite:///file.db, postgresql+psycopg://user@host/db, journal:file.log). "
                "Default: $LORA_TUNE_STORAGE, then the study file's study.storage, then sqlite:///lora_tune.db.")
_READ_STORAGE = click.option("--storage", default=None,
                             help=STORAGE_HELP.replace(", then the study file's study.storage", ""))
_N_TRIALS = click.option("--n-trials", type=click.IntRange(min=1), default=None,
                         help="Run at most this many trials in this process (the study's budget still applies).")
_TIMEOUT = click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                        help="Stop starting trials after this many seconds.")


def register(cli: click.Group, study: click.Group) -> None:
    """Add this module's commands to the root group and the `study` group."""
    cli.add_command(validate_cmd)
    cli.add_command(run_cmd)
    study.add_command(create_cmd)
    study.add_command(optimize_cmd)
    study.add_command(list_cmd)
    study.add_command(show_cmd)


def _console() -> Console:
    # piped output (logs, CI) gets a wide fixed width instead of rich's 80 columns
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


# -- validate ---------------------------------------------------------------------------------

@click.command("validate")
@click.argument("study_file", type=click.Path(dir_okay=False, path_type=Path))
def validate_cmd(study_file: Path) -> None:
    """Check STUDY_FILE; exit 0 when valid, 2 with every error otherwise.

    Besides the schema, this builds the task (its data and pretrained model, cached) to check
    metric names, that the baseline fits the search space and that every targets / layers choice
    fits the model, and prints what share of the model's linear weights each choice adapts, with a
    warning where one matches only part of what it promises. Nothing is written to a storage.
    """
    from lora_tune.errors import StudySpecError
    from lora_tune.study.run.runner import prepare_spec
    from lora_tune.study.schema.space import SearchSpace
    from lora_tune.study.schema.spec import study_folder, validate_spec
    from lora_tune.study.schema.yaml_file import load_yaml, read_spec_text

    source = str(study_file)
    raw = load_yaml(read_spec_text(study_file), source=source)  # read once, as load_spec_file reads it
    storage_errors = _storage_errors(raw)  # what `study create` refuses too, with the rest
    try:
        spec = validate_spec(raw, source=source, study_dir=study_folder(study_file))
    except StudySpecError as exc:
        raise StudySpecError(storage_errors + exc.errors, source=exc.source) from None
    try:
        resolved, _task, baseline = prepare_spec(spec)
    except StudySpecError as exc:
        raise StudySpecError(storage_errors + exc.errors, source=exc.source) from None
    if storage_errors:
        raise StudySpecError(storage_errors, source=str(study_file))
    space = SearchSpace.from_spec(resolved.search_space)
    console = _console()
    objective = ", ".join(f"{d} {m}" for m, d in zip(resolved.metrics, resolved.directions))
    console.print(f"{study_file}: ok — study {resolved.study.name!r}, task {resolved.task.get('type')}, {objective}, "
                  f"{resolved.study.n_trials} trials, sampler {resolved.study.sampler.type}, "
                  f"pruner {resolved.study.pruner.type}")
    sampled = [p.name for p in space.sampled]
    fixed = [f"{p.key}={p.value}" for p in space.params if not p.sampled]
    console.print(f"  searches: {', '.join(sampled) or '(nothing)'}"
                  + (f"; fixed: {', '.join(fixed)}" if fixed else ""))
    if baseline is not None:
        console.print(f"  baseline: {baseline}")
    from lora_tune.study.run.lr_probe import describe_settings

    console.print(f"  {describe_settings(resolved)}", markup=False)
    console.print(f"  relative paths read against: {spec.study_dir}", markup=False)
    for where, message in spec.path_fallbacks():
        console.print(f"  [yellow]warning:[/] {where}: " + message.replace("[", "\\["))
    _print_serve(console, spec, "  ")
    from lora_tune.study.schema.space_coverage import space_coverage

    console.print("  coverage (share of the model's linear weights each target choice adapts):")
    for record in space_coverage(resolved, _task):  # the task prepare_spec built
        console.print(f"    {record.describe()}", markup=False)
        for warning in record.warnings:
            console.print("      [yellow]warning:[/] " + warning.replace("[", "\\["))


def _print_serve(console: Console, spec: Any, indent: str = "") -> None:
    """``study.serve``'s engine and every choice it removed from the file's search space, and why."""
    from lora_tune.serving import rules
    from lora_tune.study.schema.serve_space import restriction_of

    serve = spec.study.serve
    if serve.engine == "any" and serve.rank_limit is None:
        return
    removed = restriction_of(spec).removed
    limit = f"max_lora_rank {serve.rank_limit}" if serve.rank_limit is not None else "no rank limit"
    console.print(f"{indent}serve: {rules(serve.engine).title}, {limit}; "
                  + ("removed from the search space:" if removed else "the search space needs no change"),
                  markup=False)
    for line in removed:
        console.print(f"{indent}  {line}", markup=False)


def _storage_errors(raw: Any) -> list[tuple[str, str]]:
    """``[("study.storage", why)]`` when the parsed study file names a storage URL lora-tune cannot open."""
    from lora_tune.study.storage.opening import storage_problem

    section = raw.get("study") if isinstance(raw, dict) else None
    url = section.get("storage") if isinstance(section, dict) else None
    problem = storage_problem(url) if isinstance(url, str) and url.strip() else None
    return [("study.storage", problem)] if problem else []


# -- study create -------------------------------------------------------------------------------

@click.command("create")
@click.argument("study_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--storage", default=None, help=STORAGE_HELP)
@click.option("--name", default=None, help="Study name (default: the file's study.name).")
@click.option("--resume", is_flag=True, help="Reuse the study if it exists (its trials are kept).")
def create_cmd(study_file: Path, storage: str | None, name: str | None, resume: bool) -> None:
    """Create the study described by STUDY_FILE (nothing is written if the file is invalid)."""
    from lora_tune.study.run.runner import create_study
    from lora_tune.study.schema.spec import load_spec_file
    from lora_tune.study.storage.opening import mask_url, resolve_storage_url

    spec = load_spec_file(study_file)
    url = resolve_storage_url(storage, spec.study.storage)
    with _quiet_optuna():
        study = create_study(spec, url, name=name, resume=resume)
    n = len(study.trials)
    _console().print(f"study {study.study_name!r} ready in {mask_url(url)} ({n} trial(s) so far). "
                     f"Run it with: lora-tune study optimize {study.study_name} --storage '{mask_url(url)}'")
    _dispose(study)


# -- study optimize / run ------------------------------------------------------------------------

@click.command("optimize")
@click.argument("name")
@_READ_STORAGE
@_N_TRIALS
@_TIMEOUT
@click.option("--allow-code", "allow_code", multiple=True, metavar="PATTERN", help=ALLOW_CODE_HELP)
@click.option("--study-file", type=click.Path(dir_okay=False), default=None, metavar="FILE", help=STUDY_FILE_HELP)
def optimize_cmd(name: str, storage: str | None, n_trials: int | None, timeout: float | None,
                 allow_code: tuple[str, ...], study_file: str | None) -> None:
    """Run trials of study NAME in this process until its total budget is reached.

    Several processes (here or on other machines, with a shared storage) may optimize the same
    study at once; each seeds its sampler with the file's seed plus its process id so they do
    not propose the same parameters. (`lora-tune run` uses the file's seed as is.)
    """
    from lora_tune.study.run.runner import load_study
    from lora_tune.study.storage.opening import resolve_storage_url

    url = resolve_storage_url(storage, None)
    _require_storage(url, name)
    with _quiet_optuna():
        study, spec = load_study(name, url, seed_offset=os.getpid(), allow_code=allow_code, study_file=study_file)
    _optimize_and_report(study, spec, url, n_trials, timeout)


@click.command("run")
@click.argument("study_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--storage", default=None, help=STORAGE_HELP)
@click.option("--name", default=None, help="Study name (default: the file's study.name).")
@_N_TRIALS
@_TIMEOUT
@click.option("--warm-start", "warm_from", default=None, metavar="STUDY",
              help="Enqueue the best configs of an earlier study first (targets re-resolved on this model).")
@click.option("--warm-storage", default=None, help="The storage of --warm-start's study (default: --storage).")
def run_cmd(study_file: Path, storage: str | None, name: str | None, n_trials: int | None, timeout: float | None,
            warm_from: str | None, warm_storage: str | None) -> None:
    """Create (or resume) the study in STUDY_FILE, optimize it, and print the best trial
    and its gain over the baseline."""
    from lora_tune.study.trial.objective import resolve_isolation
    from lora_tune.study.run.runner import create_study
    from lora_tune.study.schema.spec import load_spec_file, spec_from_stored
    from lora_tune.study.storage.opening import resolve_storage_url

    from lora_tune.tasks import build_task

    spec = load_spec_file(study_file)
    url = resolve_storage_url(storage, spec.study.storage)
    task = build_task(spec.resolved_task())  # built once, for checking and for the trials
    warm = _warm_configs(warm_from, warm_storage or url) if warm_from else None  # checked before writing
    with _quiet_optuna():
        study = create_study(spec, url, name=name, resume=True, task=task)
    stored = spec_from_stored(study.user_attrs["spec"]).trust_code_dir(spec.study_dir)  # this file's code
    _print_serve(_console(), spec)
    # read back from the storage: only this file's own names may be imported
    Allowance.from_operator(trusted=trusted_refs(spec.task)).check(
        stored.task, f"the stored study {study.study_name!r}")
    if warm:
        from lora_tune.study.schema.space import SearchSpace
        from lora_tune.study.run.warm_start import warm_start

        added = warm_start(study, SearchSpace.from_spec(stored.search_space), warm, task, origin=f"study {warm_from}")
        _console().print(f"warm start: {added} config(s) of study {warm_from!r} enqueued")
    if resolve_isolation(stored) == "process":
        task = None  # trials build their own in child processes: don't hold a copy of the model here
    _optimize_and_report(study, stored, url, n_trials, timeout, task)


def _warm_configs(name: str, url: str) -> list[dict]:
    """The best configs of study ``name`` in ``url`` (exit 2 when it is missing or has none)."""
    import optuna

    from lora_tune.errors import StudyNotFoundError
    from lora_tune.study.storage.opening import mask_url, open_storage
    from lora_tune.study.run.warm_start import configs_from_study

    _require_storage(url, name)
    with _quiet_optuna():
        store = open_storage(url)
        names = optuna.get_all_study_names(store)
        if name not in names:
            raise StudyNotFoundError(name, mask_url(url), names)
        source = optuna.load_study(study_name=name, storage=store)
        return configs_from_study(source)


def _optimize_and_report(study: Any, spec: Any, url: str, n_trials: int | None, timeout: float | None,
                         task: Any = None) -> None:
    from lora_tune.study.run.lr_probe import describe as describe_probe
    from lora_tune.study.run.progress import StudyProgress, render_outcome, study_outcome
    from lora_tune.study.run.runner import optimize, pruning_warning
    from lora_tune.study.storage.opening import mask_url

    console = _console()
    warning = pruning_warning(spec)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"study {study.study_name!r} in {mask_url(url)}: budget {spec.study.n_trials} trials, "
                  f"task {spec.task.get('type')}, sampler {spec.study.sampler.type}, pruner {spec.study.pruner.type}")
    try:
        with _quiet_optuna(), StudyProgress(study, spec, console) as progress:
            result = optimize(study, spec, n_trials=n_trials, timeout=timeout, callbacks=[progress], task=task,
                              on_probe=lambda probe: console.print(describe_probe(probe), markup=False))
        from lora_tune.study.run.lr_probe import placed_spec
        from lora_tune.study.trial.record import LR_PROBE

        spec = placed_spec(spec, study.user_attrs.get(LR_PROBE))  # the range the study's probe placed
        confirm = spec.study.confirm
        if confirm is not None and result.stop_reason == "budget":
            from lora_tune.study.trial.confirm import confirm_top
            from lora_tune.study.trial.objective import Objective

            with _quiet_optuna():
                runs = confirm_top(study, Objective(spec, task), confirm.top, confirm.seeds)
            console.print(f"confirmation: {len(runs)} run(s) of the top {confirm.top} config(s) "
                          f"with {confirm.seeds} more seed(s) each")
        outcome = study_outcome(study, spec)
        console.print(f"this process ran {result.trials_run} trial(s) in {result.seconds:.1f} s "
                      f"(stopped: {_REASONS.get(result.stop_reason, result.stop_reason)})")
        render_outcome(outcome, console)
        from lora_tune.study.trial.confirm import describe

        for line in describe(study, outcome.baseline):
            console.print(line)
    finally:
        _dispose(study)
    if result.stop_reason in ("failures", "interrupted"):
        raise click.exceptions.Exit(1)
    if outcome.counts.get("COMPLETE", 0) == 0 and outcome.finished >= outcome.budget:
        console.print("[red]no trial completed[/]; see the failed trials' fail_reason with `lora-tune study show`")
        raise click.exceptions.Exit(1)


_REASONS = {
    "budget": "the study's trial budget is used",
    "n_trials": "--n-trials reached",
    "timeout": "timeout reached",
    "failures": "too many failed trials in a row (study.max_consecutive_failures)",
    "interrupted": "interrupted; run the same command again to resume",
    "exhausted": "every grid point was evaluated",
}


# -- study list / show ---------------------------------------------------------------------------

@click.command("list")
@_READ_STORAGE
def list_cmd(storage: str | None) -> None:
    """List the studies in the storage."""
    import optuna

    from lora_tune.study.trial.record import study_account
    from lora_tune.study.storage.opening import (dispose_storage, mask_url, open_storage, reading_problem,
                                                 resolve_storage_url)
    from lora_tune.study.storage.budget import study_budget

    url = resolve_storage_url(storage, None)
    console = _console()
    from lora_tune.errors import ConfigError

    problem = reading_problem(url)
    if problem and problem.endswith("does not exist"):
        console.print(f"no studies in {mask_url(url)} (it does not exist yet)")
        return
    if problem:
        raise ConfigError("--storage", mask_url(url), "a lora-tune (Optuna) storage", problem)
    store = open_storage(url)
    try:
        with _quiet_optuna():
            summaries = optuna.get_all_study_summaries(store, include_best_trial=True)
        table = Table(title=f"studies in {mask_url(url)}")
        for col in ("name", "objective", "trials", "complete", "pruned", "failed", "compute", "best", "started"):
            table.add_column(col)
        for s in sorted(summaries, key=lambda s: s.study_name):
            budget = study_budget(s.user_attrs)
            metrics = s.user_attrs.get("metrics") or [f"value{i}" for i in range(len(s.directions))]
            objective = ", ".join(f"{d.name.lower()} {m}" for m, d in zip(metrics, s.directions))
            # counted as `study show`, `run` and the report count them
            a = study_account(optuna.load_study(study_name=s.study_name, storage=store))
            best = ""
            if s.best_trial is not None and len(s.directions) == 1:
                best = f"{s.best_trial.value:.4g} (#{s.best_trial.number})"
            table.add_row(s.study_name, objective, f"{a.done}" + (f"/{budget}" if budget else ""),
                          *(str(a.states.get(st, 0)) for st in ("COMPLETE", "PRUNED", "FAIL")), f"{a.used:.1f}", best,
                          s.datetime_start.strftime("%Y-%m-%d %H:%M") if s.datetime_start else "")
        console.print(table if summaries else f"no studies in {mask_url(url)}")
    finally:
        dispose_storage(store)


@click.command("show")
@click.argument("name")
@_READ_STORAGE
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Trials to list.")
def show_cmd(name: str, storage: str | None, top: int) -> None:
    """Show study NAME: its settings, outcome, and top trials."""
    from lora_tune.study.run.progress import render_outcome, study_outcome, top_trials, trials_table
    from lora_tune.study.trial.record import FAIL_REASON, short_reason
    from lora_tune.study.run.runner import load_study
    from lora_tune.study.storage.opening import mask_url, resolve_storage_url

    url = resolve_storage_url(storage, None)
    _require_storage(url, name)
    with _quiet_optuna():
        study, spec = load_study(name, url, check_code=False)  # shows the spec; builds no task
    try:
        console = _console()
        console.print(f"study {name!r} in {mask_url(url)}: task {spec.task.get('type')}, sampler "
                      f"{spec.study.sampler.type}, pruner {spec.study.pruner.type}, budget {spec.study.n_trials}")
        render_outcome(study_outcome(study, spec), console)
        console.print(trials_table(top_trials(study, spec, top), spec.metrics, title=f"top {top} trials"))
        failed = [t for t in study.get_trials(deepcopy=False) if t.state.name == "FAIL"]
        for t in failed[-5:]:
            console.print(f"trial {t.number} failed: {short_reason(t.user_attrs.get(FAIL_REASON, '?'))}", markup=False)
    finally:
        _dispose(study)


# -- helpers ---------------------------------------------------------------------------------------

def _require_storage(url: str, name: str) -> None:
    """Read commands never create a storage (or Optuna's tables in someone else's SQLite file)."""
    from lora_tune.errors import StudyNotFoundError
    from lora_tune.study.storage.opening import mask_url, reading_problem

    problem = reading_problem(url)
    if problem:
        raise StudyNotFoundError(name, f"{mask_url(url)} ({problem})", [])


def _dispose(study: Any) -> None:
    from lora_tune.study.storage.opening import close_study

    with contextlib.suppress(Exception):
        close_study(study)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's per-trial INFO/WARNING lines duplicate ours; keep its errors. Passwords masked."""
    import optuna

    from lora_tune.study.storage.opening import install_log_masking

    if not logging.getLogger("lora_tune").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logging.getLogger("lora_tune").addHandler(handler)
        logging.getLogger("lora_tune").setLevel(logging.WARNING)
    install_log_masking()
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(previous)
