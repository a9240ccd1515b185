"""``fl-sim report``: rebuild a run's or a sweep's tables and figures from its files."""

from __future__ import annotations

from pathlib import Path

import typer

from fl_sim.cli.common import fail


def report(run_dir: Path = typer.Argument(..., help="a run directory or a sweep directory")) -> None:
    """Rebuild a run directory's figures and report.md, or a sweep directory's table and figures, from its files."""
    from fl_sim.report import write_run_report
    from fl_sim.sweep.report import is_sweep_dir, write_sweep_report

    if (run_dir / "config.toml").is_file():
        typer.echo(str(write_run_report(run_dir)))
    elif is_sweep_dir(run_dir):
        typer.echo(str(write_sweep_report(run_dir)))
    else:
        fail(f"{run_dir} is neither a run directory (no config.toml) nor a sweep directory (no sweep.json or cells/)")


