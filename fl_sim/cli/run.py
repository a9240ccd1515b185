"""``fl-sim run``: a federated simulation whose honest-but-curious server attacks client updates."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer

from fl_sim.cli.common import fail, fmt, resolve_cli
from fl_sim.config import ConfigError, check_feasible, resolve


def run(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="run-config overrides, the keys of 'fl-sim keys'"),
    out: Path = typer.Option(None, "--out", help="run directory to create (default: out-dir/run-name)"),
    verbose: bool = typer.Option(False, "--verbose", help="show Flower's per-round logs"),
    resume: Path = typer.Option(None, "--resume", help="continue a killed or interrupted run from its last "
                                                       "checkpoint (a run directory; takes no KEY=VALUE)"),
    client_secret: str = typer.Option(None, "--client-secret", metavar="N",
                                      help="the run-level client secret (an integer in [0, 2^63)) from which each "
                                           "client derives its secret seed; default: $FL_SIM_CLIENT_SECRET, else OS "
                                           "entropy. Kept in RUN_DIR/clients/secret, never sent to the server"),
) -> None:
    """Run a federated simulation whose honest-but-curious server attacks client updates."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fl_sim.results import default_run_name
    from fl_sim.server_app import prepare_run_dir

    done = 0
    secret: int | None = None
    try:
        secret = _client_secret(client_secret, resume)
        if resume is not None:
            cfg, done = _resume_config(resume, overrides, out)
        else:
            cfg = resolve_cli(overrides, out)
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
            run_dir = simulation.run(cfg, on_round=on_round, verbose=verbose, resume=resume is not None,
                                     client_secret=secret)
    except KeyboardInterrupt:
        _finish_interrupted(cfg, start)
        typer.echo("fl-sim: interrupted; results so far are in the run directory", err=True)
        sys.stdout.flush()
        os._exit(130)  # the ServerApp thread may still wait on replies that will never come
    except ConfigError as exc:
        fail(str(exc))
    except (TimeoutError, RuntimeError) as exc:
        fail(f"{type(exc).__name__}: {exc}", code=1)
    finally:
        signal.signal(signal.SIGINT, previous)
    print_summary(Path(run_dir))
    if simulation.STOP.is_set():
        raise typer.Exit(130)


def _client_secret(value: str | None, resume: Path | None) -> int | None:
    """``--client-secret`` as an integer (``None`` when not given); ``$FL_SIM_CLIENT_SECRET`` is checked too.

    Raises:
        ConfigError: not an integer in [0, 2^63), or given with ``--resume`` (a resumed run keeps its own).
    """
    from clients.secrets import env_secret, parse_secret

    try:
        if resume is None:
            env_secret()  # a bad environment variable is a one-line error here, not a failing client later
        if value is None:
            return None
        if resume is not None:
            raise ConfigError("--resume takes no --client-secret: a resumed run keeps its own (RUN_DIR/clients/secret)")
        return parse_secret(value, "--client-secret")
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _resume_config(run_dir: Path, overrides: list[str] | None, out: Path | None) -> tuple[dict[str, Any], int]:
    """The resolved config of the run in ``run_dir`` and its last checkpointed round.

    Raises:
        ConfigError: KEY=VALUE or --out given, not a run directory, no checkpoint, or the run already completed.
    """
    import tomllib

    from clients.secrets import RUN_SECRET_FILE
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
    if not (run_dir / RUN_SECRET_FILE).is_file():  # without it the clients' draws cannot be those of the killed run
        raise ConfigError(f"--resume {run_dir}: no {RUN_SECRET_FILE} (the run was started without a client "
                          "secret); start it again instead")
    return cfg, done


def _finish_interrupted(cfg: dict[str, Any], start: float) -> None:
    from fl_sim.report import write_run_report
    from fl_sim.results import provenance, read_metrics, run_dir_for, summarize, write_summary

    run_dir = run_dir_for(cfg)
    if run_dir.is_dir():
        summary = summarize(read_metrics(run_dir), cfg, time.time() - start, "interrupted")
        summary["provenance"] = provenance(cfg)
        write_summary(run_dir, summary)
        write_run_report(run_dir)


def print_summary(run_dir: Path) -> None:
    """Print the table of a finished run's ``summary.json`` (what ``make run`` ends with)."""
    from rich.console import Console
    from rich.table import Table

    from strategies.metrics import chance_note

    s = json.loads((run_dir / "summary.json").read_text())
    m = s.get("attack_means") or {}
    table = Table(title=f"fl-sim run ({s['status']})", show_header=False)
    table.add_row("final test accuracy", fmt(s.get("final_accuracy"), ".4f"))
    table.add_row("rounds", str(s.get("rounds")))
    table.add_row("wall time", f"{fmt(s.get('wall_time_s'), '.1f')} s")
    table.add_row("mean round time", f"{fmt(s.get('mean_round_time_s'), '.3f')} s")
    attacks = s.get("attacks", [])
    ok = m.get("succeeded", len([a for a in attacks if "error" not in a]))
    failed = s.get("attack_failures") or {}
    scored = m.get("scored", ok)
    table.add_row("attacks", f"{len(attacks)} × {s['settings'].get('attack')}, {ok} of {len(attacks)} succeeded"
                  + (f" ({', '.join(f'{v} × {k}' for k, v in sorted(failed.items()))})" if failed else "")
                  + (f", {scored} scored" if scored < ok else ""))
    psnr, ssim = m.get("psnr"), m.get("ssim")
    note = chance_note(m)
    table.add_row("mean attack PSNR / SSIM", f"{fmt(psnr, '.1f')} dB / {fmt(ssim, '.3f')}"
                  + (f" ▼ ({note})" if note else ""))
    table.add_row("chance PSNR / SSIM", f"{fmt(m.get('psnr_chance'), '.1f')} dB / {fmt(m.get('ssim_chance'), '.3f')}"
                  " (the training mean image)")
    table.add_row("mean label accuracy", fmt(m.get("label_accuracy"), ".2f"))
    table.add_row("mean attack time", f"{fmt(m.get('time_s'), '.1f')} s")
    table.add_row("run directory", str(run_dir))
    Console().print(table)


