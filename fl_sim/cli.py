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
    resume: Path = typer.Option(None, "--resume", help="continue a killed or interrupted run from its last "
                                                       "checkpoint (a run directory; takes no KEY=VALUE)"),
) -> None:
    """Run a federated simulation whose honest-but-curious server attacks client updates."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fl_sim.results import default_run_name
    from strategies.server_app import prepare_run_dir

    done = 0
    try:
        if resume is not None:
            cfg, done = _resume_config(resume, overrides, out)
        else:
            cfg = _resolve_cli(overrides, out)
            if not cfg["run-name"]:
                cfg["run-name"] = default_run_name(cfg)
        check_feasible(cfg)
        if resume is None:
            prepare_run_dir(cfg)
    except ConfigError as exc:
        fail(str(exc))
    from fl_sim import simulation

    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), console=console, transient=False, disable=verbose)
    task = progress.add_task("", total=int(cfg["num-server-rounds"]), completed=done)
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
            run_dir = simulation.run(cfg, on_round=on_round, verbose=verbose, resume=resume is not None)
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


def _resume_config(run_dir: Path, overrides: list[str] | None, out: Path | None) -> tuple[dict[str, Any], int]:
    """The resolved config of the run in ``run_dir`` and its last checkpointed round.

    Raises:
        ConfigError: KEY=VALUE or --out given, not a run directory, no checkpoint, or the run already completed.
    """
    import tomllib

    from strategies.checkpoint import ResumeError, load_checkpoint

    if overrides or out is not None:
        raise ConfigError("--resume takes no KEY=VALUE and no --out: a resumed run keeps its own config.toml")
    run_dir = run_dir.expanduser().resolve()
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.toml)")
    cfg = resolve(tomllib.loads((run_dir / "config.toml").read_text()))
    cfg["out-dir"], cfg["run-name"] = str(run_dir.parent), run_dir.name  # the directory may have moved
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
        raise ConfigError(f"--resume {run_dir}: the run already completed (summary.json status 'completed')")
    try:
        done = int(load_checkpoint(run_dir)["round"])
    except ResumeError as exc:
        raise ConfigError(f"--resume {run_dir}: {exc}") from exc
    return cfg, done


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
def report(run_dir: Path = typer.Argument(..., help="a run directory")) -> None:
    """Rebuild a run directory's figures and report.md from its files."""
    from fl_sim.report import write_run_report

    if not (run_dir / "config.toml").is_file():
        fail(f"{run_dir} is not a run directory (no config.toml)")
    typer.echo(str(write_run_report(run_dir)))


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
def deploy(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="run-config overrides; num-supernodes SuperNodes are started"),
    out: Path = typer.Option(None, "--out", help="run directory to create (default: out-dir/run-name)"),
    workdir: Path = typer.Option(None, "--workdir", help="certificates, Flower state and logs (default: a temporary "
                                                        "folder, deleted afterwards)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS"),
    node_auth: bool = typer.Option(False, "--node-auth", help="SuperNode authentication (needs ssh-keygen)"),
) -> None:
    """Run on Flower's deployment engine on this machine: a TLS SuperLink and num-supernodes SuperNodes on
    127.0.0.1, then `flwr run`; every process is stopped afterwards. See docs/deployment.md for real machines."""
    import tempfile

    from fl_sim.deployment import LocalFederation
    from fl_sim.results import default_run_name
    from strategies.server_app import prepare_run_dir

    try:
        cfg = _resolve_cli(overrides, out)
        if not cfg["run-name"]:
            cfg["run-name"] = default_run_name(cfg)
        cfg["out-dir"] = str(Path(str(cfg["out-dir"])).expanduser().resolve())
        check_feasible(cfg)
        prepare_run_dir(cfg)
    except ConfigError as exc:
        fail(str(exc))
    with tempfile.TemporaryDirectory(prefix="fl-sim-deploy-") as tmp:
        fed = LocalFederation(workdir or Path(tmp), int(cfg["num-supernodes"]), tls=not insecure,
                              node_auth=node_auth)
        try:
            with fed:
                proc = fed.run(cfg, timeout_s=None)
        except KeyboardInterrupt:
            fail("interrupted; every SuperLink/SuperNode process was stopped", code=130)
        if proc.returncode != 0:
            typer.echo(proc.stdout[-3000:] + proc.stderr[-3000:] + fed.logs(), err=True)
            fail(f"flwr run exited with code {proc.returncode}", code=1)
    from fl_sim.results import run_dir_for

    _print_summary(run_dir_for(cfg))


def main() -> None:
    """Console-script entry point."""
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With 2 threads on 2 busy cores a
    # spinning barrier made one 10-iteration attack take 27-50 s instead of 1-2 s (benchmarks: docs/deployment.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        cli()
    except ConfigError as exc:
        fail_msg = f"fl-sim: error: {exc}"
        print(fail_msg, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
