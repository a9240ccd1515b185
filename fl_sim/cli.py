"""The ``fl-sim`` command line.

Every command turns bad input into one line on stderr naming the key, the value and what is allowed, and exits
with code 2 before any simulation starts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer

from fl_sim.config import KEYS, ConfigError, check_feasible, parse_overrides, pyproject_block, resolve

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fl-sim: gradient-leakage attacks and defenses in Flower federations.")


def fail(message: str, code: int = 2) -> None:
    """Print ``fl-sim: error: MESSAGE`` on stderr and exit with ``code``."""
    typer.echo(f"fl-sim: error: {message}", err=True)
    raise typer.Exit(code)


def _resolve_cli(overrides: list[str] | None, out: Path | None) -> dict[str, Any]:
    values = parse_overrides(overrides or [])
    if out is not None:
        values["out-dir"] = str(out.expanduser().resolve().parent)
        values["run-name"] = out.name
    return resolve(values)


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
def run(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="run-config overrides, the keys of 'fl-sim keys'"),
    out: Path = typer.Option(None, "--out", help="run directory to create (default: out-dir/run-name)"),
    verbose: bool = typer.Option(False, "--verbose", help="show Flower's per-round logs"),
) -> None:
    """Run a federated simulation whose honest-but-curious server attacks client updates."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fl_sim.results import default_run_name
    from strategies.server_app import prepare_run_dir

    try:
        cfg = _resolve_cli(overrides, out)
        if not cfg["run-name"]:
            cfg["run-name"] = default_run_name(cfg)
        check_feasible(cfg)
        prepare_run_dir(cfg)
    except ConfigError as exc:
        fail(str(exc))
    from fl_sim import simulation

    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), console=console, transient=False, disable=verbose)
    task = progress.add_task("", total=int(cfg["num-server-rounds"]))
    last = {"acc": None, "psnr": None}

    def on_round(record: dict[str, Any]) -> None:
        if record.get("accuracy") is not None:
            last["acc"] = record["accuracy"]
        for a in record.get("attacks", []):
            if a.get("psnr") is not None:
                last["psnr"] = a["psnr"]
        desc = " ".join(p for p in (
            f"acc {last['acc']:.3f}" if last["acc"] is not None else "",
            f"attack PSNR {last['psnr']:.1f} dB" if last["psnr"] is not None else "") if p)
        progress.update(task, completed=record["round"], description=desc)

    interrupts = {"n": 0}

    def on_sigint(signum: int, frame: Any) -> None:
        interrupts["n"] += 1
        if interrupts["n"] == 1:
            simulation.STOP.set()
            console.print("[yellow]Ctrl-C: stopping after this round (press again to stop now)[/yellow]")
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    start = time.time()
    try:
        with progress:
            run_dir = simulation.run(cfg, on_round=on_round, verbose=verbose)
    except KeyboardInterrupt:
        _finish_interrupted(cfg, start)
        typer.echo("fl-sim: interrupted; results so far are in the run directory", err=True)
        sys.stdout.flush()
        os._exit(130)  # the ServerApp thread may still wait on replies that will never come
    except (TimeoutError, RuntimeError) as exc:
        fail(f"{type(exc).__name__}: {exc}", code=1)
    finally:
        signal.signal(signal.SIGINT, previous)
    _print_summary(Path(run_dir))
    if simulation.STOP.is_set():
        raise typer.Exit(130)


def _finish_interrupted(cfg: dict[str, Any], start: float) -> None:
    from fl_sim.report import write_run_report
    from fl_sim.results import read_metrics, run_dir_for, summarize, write_summary

    run_dir = run_dir_for(cfg)
    if run_dir.is_dir():
        write_summary(run_dir, summarize(read_metrics(run_dir), cfg, time.time() - start, "interrupted"))
        write_run_report(run_dir)


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _print_summary(run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    s = json.loads((run_dir / "summary.json").read_text())
    m = s.get("attack_means") or {}
    table = Table(title=f"fl-sim run ({s['status']})", show_header=False)
    table.add_row("final test accuracy", _fmt(s.get("final_accuracy"), ".4f"))
    table.add_row("rounds", str(s.get("rounds")))
    table.add_row("wall time", f"{_fmt(s.get('wall_time_s'), '.1f')} s")
    table.add_row("mean round time", f"{_fmt(s.get('mean_round_time_s'), '.3f')} s")
    table.add_row("attacks", f"{len(s.get('attacks', []))} × {s['settings'].get('attack')}")
    table.add_row("mean attack PSNR / SSIM", f"{_fmt(m.get('psnr'), '.1f')} dB / {_fmt(m.get('ssim'), '.3f')}")
    table.add_row("mean label accuracy", _fmt(m.get("label_accuracy"), ".2f"))
    table.add_row("mean attack time", f"{_fmt(m.get('time_s'), '.1f')} s")
    table.add_row("run directory", str(run_dir))
    Console().print(table)


@cli.command()
def keys(toml: bool = typer.Option(False, "--toml", help="print the [tool.flwr.app.config] block")) -> None:
    """List every run-config key with its default and what it allows."""
    if toml:
        typer.echo(pyproject_block(), nl=False)
        return
    for name, key in KEYS.items():
        typer.echo(f"{name:<20} {key.default!r:<16} {key.describe()}: {key.help}")


@cli.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory or a sweep directory")) -> None:
    """Rebuild a run directory's figures and report.md, or a sweep directory's table and figures, from its files."""
    from fl_sim.report import is_sweep_dir, write_run_report, write_sweep_report

    if (run_dir / "config.toml").is_file():
        typer.echo(str(write_run_report(run_dir)))
    elif is_sweep_dir(run_dir):
        typer.echo(str(write_sweep_report(run_dir)))
    else:
        fail(f"{run_dir} is neither a run directory (no config.toml) nor a sweep directory (no sweep.json or cells/)")


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
def sweep(
    file: Path = typer.Argument(..., help="sweep file (TOML: [sweep], [base], [axes]; see docs/sweeps.md)"),
    out: Path = typer.Option(None, "--out", help="sweep directory (default: sweeps-out/<file stem>)"),
    jobs: int = typer.Option(1, "--jobs", help="cells run at once; the cores are split between them"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and what would run, then stop"),
    retries: int = typer.Option(1, "--retries", help="times a failed cell is run again before the sweep ends"),
) -> None:
    """Run one simulation per cell of a grid of run keys (resumable), then write the seed-001 table and figures."""
    from fl_sim.sweep import default_out, load_sweep, run_sweep

    if jobs < 1:
        fail(f"--jobs={jobs} is not allowed; --jobs must be an integer >= 1")
    if retries < 0:
        fail(f"--retries={retries} is not allowed; --retries must be an integer >= 0")
    try:
        spec = load_sweep(file)
        result = run_sweep(spec, out if out is not None else default_out(file), jobs=jobs, dry_run=dry_run,
                           retries=retries)
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


def main() -> None:
    """Console-script entry point."""
    try:
        cli()
    except ConfigError as exc:
        fail_msg = f"fl-sim: error: {exc}"
        print(fail_msg, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
