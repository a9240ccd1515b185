"""``fl-sim sweep``: one simulation per cell of a grid of run keys, then the seed-001 table and figures."""

from __future__ import annotations

from pathlib import Path

import typer

from fl_sim.cli.common import fail
from fl_sim.config import ConfigError


def sweep(
    file: Path = typer.Argument(..., help="sweep file (TOML: [sweep], [base], [axes]; see docs/sweeps.md)"),
    out: Path = typer.Option(None, "--out", help="sweep directory (default: sweeps-out/<file stem>)"),
    jobs: int = typer.Option(1, "--jobs", help="cells run at once; the cores are split between them"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and what would run, then stop"),
    retries: int = typer.Option(1, "--retries", help="times a failed cell is run again before the sweep ends"),
    fresh: bool = typer.Option(False, "--fresh-processes",
                               help="start every cell in a new interpreter instead of forking it from the cell "
                                    "host that has imported torch, Flower and fl-sim once (same results; 6-11 s more "
                                    "per seed-001 cell here)"),
) -> None:
    """Run one simulation per cell of a grid of run keys (resumable), then write the seed-001 table and figures."""
    from fl_sim.sweep.runner import default_out, run_sweep
    from fl_sim.sweep.spec import load_sweep

    if jobs < 1:
        fail(f"--jobs={jobs} is not allowed; --jobs must be an integer >= 1")
    if retries < 0:
        fail(f"--retries={retries} is not allowed; --retries must be an integer >= 0")
    try:
        spec = load_sweep(file)
        result = run_sweep(spec, out if out is not None else default_out(file), jobs=jobs, dry_run=dry_run,
                           retries=retries, fork=not fresh)
    except ConfigError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("fl-sim: sweep interrupted; finished cells are kept, re-run the command to go on", err=True)
        raise typer.Exit(130)
    if dry_run:
        return
    typer.echo(f"{len(result.ran)} cells ran, {len(result.skipped)} were already done, {len(result.failed)} did "
               f"not finish ({result.wall_time_s:.0f} s); table: {result.report}")
    for cid, reason in result.failed:
        typer.echo(f"  not finished: {cid}: {reason}", err=True)
    if result.interrupted:
        typer.echo("fl-sim: sweep interrupted; finished cells are kept, re-run the command to go on", err=True)
        raise typer.Exit(130)
    if result.failed:
        raise typer.Exit(1)


