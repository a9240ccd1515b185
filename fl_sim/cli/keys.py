"""``fl-sim keys``: every run-config key with its default and what it allows."""

from __future__ import annotations

import typer

from fl_sim.config import key_table, pyproject_block


def keys(toml: bool = typer.Option(False, "--toml", help="print the [tool.flwr.app.config] block")) -> None:
    """List every run-config key with its default and what it allows."""
    if toml:
        typer.echo(pyproject_block(), nl=False)
        return
    for name, key in key_table().items():
        typer.echo(f"{name:<20} {key.default!r:<16} {key.describe()}: {key.help}")


