"""Entry point of the `lora-tune` command: library errors become messages and exit codes here
(2 for bad input: any lora-tune ``ValueError``; 1 for other failures)."""
from __future__ import annotations

import sys

import click

from lora_tune.errors import LoraTuneError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class _Group(click.Group):
    """A click group that turns lora-tune errors into messages and exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except LoraTuneError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_BAD_INPUT if isinstance(exc, ValueError) else EXIT_FAILURE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-tune")
def cli() -> None:
    """lora-tune: hyperparameter search for LoRA fine-tuning."""


@cli.group(cls=_Group)
def study() -> None:
    """Create, optimize, list and inspect studies."""


def _register() -> None:
    from lora_tune.cli import commands_init, commands_proxy, commands_report, commands_study, commands_worker

    for module in (commands_init, commands_study, commands_worker, commands_proxy, commands_report):
        module.register(cli, study)


_register()


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="lora-tune", standalone_mode=True)
    except SystemExit as exc:  # click exits through SystemExit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if argv is not None:
            return code
        sys.exit(code)
    return EXIT_OK


if __name__ == "__main__":
    main()
