"""CLI commands: study (being written)."""
from __future__ import annotations

import click


def register(cli: click.Group, study: click.Group) -> None:
    """Add this module's commands to the root group and the `study` group."""
