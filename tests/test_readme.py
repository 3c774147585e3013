"""The README is part of the interface: its set-up commands match CI and every CLI command is documented."""
from __future__ import annotations

from pathlib import Path

import click

from lora_tune.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _commands(group: click.Group, prefix: str = "lora-tune"):
    for name, command in group.commands.items():
        full = f"{prefix} {name}"
        if isinstance(command, click.Group):
            yield from _commands(command, full)
        else:
            yield full


def test_every_cli_command_is_documented_in_the_readme():
    missing = [c for c in _commands(cli) if f"`{c}" not in README]
    assert not missing, f"commands missing from README.md: {missing}"


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_test_one():
    block = README.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2
    run, test = block
    assert "lora-tune run studies/quickstart.yaml" in run and (ROOT / "studies/quickstart.yaml").exists()
    assert "pytest" in test
    assert test in (ROOT / ".ci/run").read_text(encoding="utf-8")
