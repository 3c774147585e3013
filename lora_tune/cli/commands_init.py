"""``lora-tune init``: write a study file with a sensible space for a model (see
:mod:`lora_tune.study.schema.templates`)."""
from __future__ import annotations

from pathlib import Path

import click

from lora_tune.study.schema.templates import N_TRIALS


@click.command("init")
@click.argument("model_or_task")
@click.option("-o", "--output", default="study.yaml", show_default=True, help="Study file to write.")
@click.option("--train-file", default=None, help="Training data (default: data/train.jsonl or .csv).")
@click.option("--eval-file", default=None, help="Evaluation data (default: data/eval.jsonl or .csv).")
@click.option("--name", default=None, help="Study name (default: from the model).")
@click.option("--n-trials", type=click.IntRange(min=1), default=N_TRIALS, show_default=True, help="The study's budget.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def init_command(model_or_task: str, output: str, train_file: str | None, eval_file: str | None,
                 name: str | None, n_trials: int, force: bool) -> None:
    """Write a study file for MODEL_OR_TASK (a Hugging Face model directory, 'minilm' or
    'digits'): its target presets, ranks that fit, a learning-rate range for its kind, Hyperband
    pruning, a warm start and confirmed winners."""
    from lora_tune.errors import ConfigError
    from lora_tune.study.schema.templates import render, study_template

    path = Path(output)
    if path.exists() and not force:
        raise ConfigError("--output", output, "a file that does not exist yet", "Pass --force to replace it.")
    template = study_template(model_or_task, train_file=train_file, eval_file=eval_file, name=name,
                              n_trials=n_trials)
    _relative_to_the_file(template["task"], path)
    path.write_text(render(template, output), encoding="utf-8")
    click.echo(f"wrote {output}: check the data paths (relative to its folder), then `lora-tune validate {output}`")


def _relative_to_the_file(task: dict, path: Path) -> None:
    """The study file's relative paths are read against its folder: a model directory or data
    file given here relative to the current directory is written relative to ``path``'s folder."""
    import os

    folder = path.absolute().parent
    for key in ("model", "train_file", "eval_file"):
        value = task.get(key)
        if isinstance(value, str) and not os.path.isabs(value) and not value.startswith("~") and Path(value).exists():
            task[key] = Path(os.path.relpath(Path(value).absolute(), folder)).as_posix()


def register(cli: click.Group, study: click.Group) -> None:
    """Add this module's commands to the root group."""
    cli.add_command(init_command)
