"""CLI commands: report, dashboard, export, and `study export-trials`."""
from __future__ import annotations

from pathlib import Path

import click

STORAGE_HELP = "Storage URL (default: $LORA_TUNE_STORAGE, then sqlite:///lora_tune.db)."


def _open(name: str, storage: str | None):
    from lora_tune.report.source import open_study
    from lora_tune.study.storage.opening import resolve_storage_url

    url = resolve_storage_url(storage, None)
    return open_study(name, url), url


def report_command(name: str, storage: str | None, output: str, definition: str | None, save_to_study: bool) -> None:
    """Write an HTML report of study NAME (one self-contained file that opens offline)."""
    from lora_tune.report import frame, load_definition, write_report
    from lora_tune.study.storage.opening import mask_url

    study, url = _open(name, storage)
    spec = load_definition(definition) if definition else None
    if not frame.complete_trials(study):
        n = len(study.get_trials(deepcopy=False))
        click.echo(f"warning: study {name!r} has no complete trial yet ({n} trial(s)); "
                   "the report shows what exists", err=True)
    path = write_report(study, output, spec, storage_display=mask_url(url))
    if save_to_study:
        from lora_tune.report.dashboard import save_figures

        save_figures(study)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def dashboard_command(storage: str | None, host: str, port: int, artifact_dir: str | None,
                      save: bool, quiet: bool) -> None:
    """Launch optuna-dashboard on the storage (bound to 127.0.0.1 unless --host says otherwise)."""
    from lora_tune.study.trial.artifacts import default_artifact_dir
    from lora_tune.report.dashboard import save_figures, serve_dashboard
    from lora_tune.report.source import open_storage_for_reading, open_study, study_names
    from lora_tune.study.storage.opening import mask_url, resolve_storage_url

    url = resolve_storage_url(storage, None)
    store = open_storage_for_reading(url)
    recorded = None
    for study_name in study_names(store):
        study = open_study(study_name, url, store)
        recorded = recorded or study.user_attrs.get("artifact_dir")
        if save and study.get_trials(deepcopy=False):
            save_figures(study)
    if artifact_dir is None:
        artifact_dir = recorded if recorded and Path(recorded).is_dir() else str(default_artifact_dir(url))
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding to {host}: anyone who can reach this address can read and "
                   "change the studies", err=True)
    click.echo(f"storage {mask_url(url)}; artifacts in {artifact_dir}", err=True)
    serve_dashboard(store, host=host, port=port, artifact_dir=artifact_dir, quiet=quiet)


def export_command(name: str, storage: str | None, trial: int | None, output: str, adapter: str | None,
                   artifact_dir: str | None, merged: str | None = None, gguf: str | None = None,
                   engine: str | None = None, allow_code: tuple[str, ...] = (), study_file: str | None = None) -> None:
    """Export study NAME's best trial (or --trial N) as YAML, its adapter with --adapter DIR, the
    base with the adapter merged with --merged DIR, a llama.cpp GGUF adapter with --gguf FILE;
    then how to serve it (--engine), with what the engine cannot load.

    An existing YAML or GGUF file is replaced, and so is an adapter or merged folder an earlier
    export wrote; the output says so."""
    from lora_tune.export import export_best
    from lora_tune.export_serving import ServingOptions

    study, url = _open(name, storage)
    replaced: list[str] = []
    serving = ServingOptions(merged_dir=merged, gguf_file=gguf, engine=engine, allow_code=allow_code,
                             study_file=study_file)
    content = export_best(study, output, trial_number=trial, storage_url=url, adapter_dir=adapter,
                          artifact_dir=artifact_dir, replaced=replaced, serving=serving)
    metric = content["metric"]
    verb = "overwrote" if "best.yaml" in replaced else "wrote"
    click.echo(f"{verb} {output}: trial #{content['trial']['number']}, {metric['name']} = {metric['value']}")
    if adapter:
        done = "overwrote the adapter in" if "adapter" in replaced else "wrote adapter to"
        click.echo(f"{done} {adapter} ({', '.join(content['adapter']['formats'])} formats)")
        if content["adapter"].get("peft"):
            click.echo(f"  peft/: {content['adapter']['peft']}")
    if merged:
        done = "overwrote the merged model in" if "merged" in replaced else "wrote the merged model to"
        info = content["merged"]
        click.echo(f"{done} {merged} ({info['dtype']}; load it with transformers.{info['auto_class']}"
                   f".from_pretrained)")
    if gguf:
        done = "overwrote" if "gguf" in replaced else "wrote"
        click.echo(f"{done} {gguf} (llama.cpp LoRA adapter, adapter.lora.alpha {content['gguf']['alpha']:g})")
    serve = content["serve"]
    for warning in serve["warnings"]:
        click.echo(f"warning: {serve['engine']}: {warning}", err=True)
    if serve.get("command"):
        click.echo(f"serve with {serve['engine']}: {serve['command']}")
    if serve.get("merged_command"):
        click.echo(f"serve the merged model: {serve['merged_command']}")


def export_trials_command(name: str, storage: str | None, output: str) -> None:
    """Write study NAME's trials as a table (.csv or .parquet), without Optuna's system attributes."""
    from lora_tune.export import export_trials

    study, _ = _open(name, storage)
    replaced: list[str] = []
    path = export_trials(study, output, replaced=replaced)
    verb = "overwrote" if replaced else "wrote"
    click.echo(f"{verb} {path} ({len(study.get_trials(deepcopy=False))} trials)")


def _serving_options(command):
    from lora_tune.cli.commands_worker import ALLOW_CODE_HELP, STUDY_FILE_HELP

    options = (
        click.option("--merged", default=None, metavar="DIR",
                     help="Also write the base with the adapter merged (save_pretrained, with the tokenizer)."),
        click.option("--gguf", default=None, metavar="FILE", help="Also write the adapter as a llama.cpp GGUF file."),
        click.option("--engine", type=click.Choice(["vllm", "sglang", "llama.cpp"]), default=None,
                     help="The engine the printed serve command and warnings are for (default: the study's "
                          "study.serve.engine, else vllm)."),
        click.option("--allow-code", "allow_code", multiple=True, metavar="PATTERN", help=ALLOW_CODE_HELP),
        click.option("--study-file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help=STUDY_FILE_HELP),
    )
    for option in reversed(options):
        command = option(command)
    return command


def register(cli: click.Group, study: click.Group) -> None:
    """Add this module's commands to the root group and the `study` group."""
    storage_opt = click.option("--storage", default=None, help=STORAGE_HELP)

    cli.command("report")(
        click.argument("name")(storage_opt(
            click.option("-o", "--output", default="report.html", show_default=True,
                         help="HTML file to write.")(
                click.option("--definition", default=None,
                             help="A report definition YAML (default: dashboards/<kind>.yaml).")(
                    click.option("--save-to-study", is_flag=True,
                                 help="Also save the LoRA figures into the study for optuna-dashboard.")(
                        report_command))))))
    cli.command("dashboard")(
        storage_opt(
            click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")(
                click.option("--port", default=8080, show_default=True, type=int, help="Port (0: any free one).")(
                    click.option("--artifact-dir", default=None,
                                 help="Artifact store directory (default: next to the storage).")(
                        click.option("--save-figures/--no-save-figures", "save", default=True,
                                     help="Save the LoRA figures into each study first.")(
                            click.option("--quiet/--verbose", default=True, help="Hide request logs.")(
                                dashboard_command)))))))
    cli.command("export")(
        click.argument("name")(storage_opt(
            click.option("--trial", type=int, default=None, help="Trial number (default: the best).")(
                click.option("-o", "--output", default="best.yaml", show_default=True, help="YAML file to write.")(
                    click.option("--adapter", default=None, help="Also write the adapter (PEFT + lora-tune) here.")(
                        click.option("--artifact-dir", default=None,
                                     help="Artifact store directory (default: recorded in the study).")(
                            _serving_options(export_command))))))))
    study.command("export-trials")(
        click.argument("name")(storage_opt(
            click.option("-o", "--output", required=True, help="trials.csv or trials.parquet")(
                export_trials_command))))
