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


@cli.command("attacks")
def attacks_cmd() -> None:
    """List the registered attacks with what each needs beyond the update (threat model)."""
    from attacker import ATTACKS

    for name, a in ATTACKS.items():
        needs = [k.replace("_", "-") for k, v in vars(a.threat).items() if v]
        typer.echo(f"{name:<10} {a.summary}" + (f" [needs: {', '.join(needs)}]" if needs else ""))


@cli.command()
def rank(
    model: str = typer.Option(..., "--model", help="model registry name (an R-GAP-attackable net: cnn6, cnn6-d, "
                                                   "fcn3, lenet, lenet-tanh)"),
    dataset: str = typer.Option("cifar10", "--dataset", help="dataset whose input shape and classes to use "
                                                             "(not loaded; default: cifar10, the paper's setting)"),
    batch: int = typer.Option(1, "--batch", help="inputs per gradient (B > 1: fully-connected nets only)"),
    seed: int = typer.Option(0, "--seed", help="seed of the model initialisation and the random input"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """R-GAP's rank analysis: per layer, the rank of the constraint system against the number of unknowns."""
    from fl_sim.data import DATASET_SHAPES
    from fl_sim.models import MODELS

    if model not in MODELS:
        fail(f"--model={model!r} is not allowed; --model must be one of {', '.join(sorted(MODELS))}")
    if dataset not in DATASET_SHAPES:
        fail(f"--dataset={dataset!r} is not allowed; --dataset must be one of {', '.join(sorted(DATASET_SHAPES))}")
    if batch < 1:
        fail(f"--batch={batch} is not allowed; --batch must be an integer >= 1")
    import dataclasses

    import torch

    from attacker.rgap import rank_analysis
    from fl_sim.models import build_model

    torch.set_num_threads(1)
    shape, classes = DATASET_SHAPES[dataset]
    torch.manual_seed(seed)
    try:
        rows = rank_analysis(build_model(model, shape, classes), shape, batch, seed)
    except ValueError as exc:
        fail(f"--model={model!r} cannot be analysed: {exc}")
    recoverable = all(r.recoverable for r in rows)
    if as_json:
        typer.echo(json.dumps({"model": model, "dataset": dataset, "input_shape": list(shape), "batch": batch,
                               "recoverable": recoverable, "layers": [dataclasses.asdict(r) for r in rows]},
                              indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"R-GAP rank analysis: {model}, input {shape}, B={batch} (top layer first)")
    for col in ("layer", "kind", "unknowns", "gradient rank", "forward rank", "rank", "recoverable"):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for r in rows:
        table.add_row(r.layer, r.kind, str(r.unknowns), str(r.gradient_rank), str(r.forward_rank), str(r.rank),
                      "yes" if r.recoverable else f"no (deficit {r.unknowns - r.rank})")
    console = Console(width=max(Console().width, 110))
    console.print(table)
    console.print(f"input uniquely recoverable from the gradient: {'yes' if recoverable else 'no'}")


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
def attack(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="run-config overrides (attack-*, defense-*, mode, lr, ...)"),
    attack_name: str = typer.Option("idlg", "--attack", help="attack registry name"),
    model: str = typer.Option(None, "--model", help="model registry name (default: the run default)"),
    image: list[Path] = typer.Option(None, "--image", help="PNG/JPEG file(s), resized to the model's input"),
    dataset: str = typer.Option(None, "--dataset", help="dataset: the images' source with --index, else only "
                                                        "the input shape, classes and normalisation "
                                                        "(default with --image: cifar10)"),
    index: int = typer.Option(None, "--index", help="first training-split index of the batch (with --dataset)"),
    batch: int = typer.Option(None, "--batch", help="number of images (default 1, or the number of --image files)"),
    label: list[int] = typer.Option(None, "--label", help="label of each --image (default 0)"),
    defense: str = typer.Option(None, "--defense", help="client defense registry name (default: none)"),
    out: Path = typer.Option(None, "--out", help="output folder (default: out-dir/audit-<time>-<model>-<attack>)"),
    no_server_step: bool = typer.Option(False, "--no-server-step", help="skip the defense's server-side step"),
) -> None:
    """One-shot audit: attack the update one client would send for the given images, without a federation.

    Writes attack.json (psnr, ssim, mse, label_accuracy, time_s, iterations, ...) and reconstruction.png (truth
    above reconstruction) to --out.
    """
    from fl_sim.data import DATASET_SHAPES

    try:
        values = parse_overrides(overrides or [])
        values["attack"] = attack_name
        if model is not None:
            values["model"] = model
        if defense is not None:
            values["defense"] = defense
        if (image is None) == (index is None):
            raise ConfigError("give either --image PATH... or --dataset NAME --index I")
        if index is not None and dataset is None:
            raise ConfigError("--index needs --dataset NAME")
        name = dataset or ("cifar10" if image else str(values.get("dataset", KEYS["dataset"].default)))
        if name not in DATASET_SHAPES:
            raise ConfigError(f"--dataset={name!r} is not allowed; --dataset must be one of "
                              f"{', '.join(sorted(DATASET_SHAPES))}")
        values["dataset"] = name
        n = batch if batch is not None else (len(image) if image else 1)
        if n < 1:
            raise ConfigError(f"--batch={n} is not allowed; --batch must be an integer >= 1")
        if image and n != len(image):
            raise ConfigError(f"--batch={n} is not allowed with {len(image)} --image file(s); give one file per image")
        values.setdefault("batch-size", n)
        cfg = resolve(values)
        images, labels = _audit_images(cfg, image, index, n, label)
    except ConfigError as exc:
        fail(str(exc))
    import torch

    from fl_sim.audit import run_audit

    torch.set_num_threads(1)
    if out is None:
        from fl_sim.results import default_run_name

        out = Path(str(cfg["out-dir"])) / ("audit-" + default_run_name(cfg))
    try:
        from fl_sim.audit import audit_dataset

        record = run_audit(cfg, audit_dataset(name, images, labels), out, server_step=not no_server_step)
    except ConfigError as exc:
        fail(str(exc))
    lab = "–" if record["label_accuracy"] is None else f"{record['label_accuracy']:.2f}"
    typer.echo(f"{record['attack']} on {record['model']} ({record['defense']}, {record['num_images']} image(s)): "
               f"PSNR {record['psnr']:.2f} dB, SSIM {record['ssim']:.3f}, MSE {record['mse']:.2e}, label accuracy "
               f"{lab}, {record['iterations']} iterations in {record['time_s']:.2f} s")
    typer.echo(str(out))


def _audit_images(cfg: dict[str, Any], image: list[Path] | None, index: int | None, n: int,
                  label: list[int] | None) -> tuple[Any, Any]:
    """The audit's images ``uint8 (N, H, W, C)`` and labels, from files or from the dataset (ConfigError)."""
    import numpy as np

    from fl_sim.data import DATASET_SHAPES, DataError, load_dataset

    name = str(cfg["dataset"])
    shape, classes = DATASET_SHAPES[name]
    if image:
        from fl_sim.audit import load_images

        labels = list(label or [0] * n)
        if len(labels) != n:
            raise ConfigError(f"--label given {len(labels)} time(s) for {n} image(s); give one per --image")
        bad = [y for y in labels if not 0 <= y < classes]
        if bad:
            raise ConfigError(f"--label={bad[0]} is not allowed; {name} labels are 0..{classes - 1}")
        return load_images(image, shape), np.asarray(labels, np.int64)
    if label:
        raise ConfigError("--label applies to --image only (dataset samples have their own labels)")
    try:
        ds = load_dataset(name, str(cfg["data-dir"]))
    except DataError as exc:
        raise ConfigError(f"dataset={name!r}: {exc}") from exc
    if not 0 <= index <= len(ds.y_train) - n:
        raise ConfigError(f"--index={index} is not allowed; with --batch {n}, --index must be in "
                          f"0..{len(ds.y_train) - n} ({name} has {len(ds.y_train)} training samples)")
    return ds.x_train[index:index + n], ds.y_train[index:index + n]


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
