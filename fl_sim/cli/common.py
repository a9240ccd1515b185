"""What every ``fl-sim`` command shares: the one-line error exit and the config from ``KEY=VALUE`` arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fl_sim.config import parse_overrides, resolve


def fail(message: str, code: int = 2) -> None:
    """Print ``fl-sim: error: MESSAGE`` on stderr and exit with ``code``."""
    typer.echo(f"fl-sim: error: {message}", err=True)
    raise typer.Exit(code)


def resolve_cli(overrides: list[str] | None, out: Path | None) -> dict[str, Any]:
    """The resolved config of ``KEY=VALUE`` arguments and an optional ``--out`` run directory.

    Raises:
        ConfigError: a bad key or value.
    """
    values = parse_overrides(overrides or [])
    if out is not None:
        values["out-dir"] = str(out.expanduser().resolve().parent)
        values["run-name"] = out.name
    return resolve(values)


def fmt(x: Any, spec: str) -> str:
    """``x`` formatted with ``spec``, or an en dash for ``None``."""
    return "–" if x is None else format(x, spec)
