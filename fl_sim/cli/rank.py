"""``fl-sim rank``: R-GAP's rank analysis of a model (Zhu & Blaschko, ICLR'21, §4)."""

from __future__ import annotations

import json

import typer

from fl_sim.cli.common import fail


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
    from fl_sim.task.datasets import DATASETS
    from fl_sim.task.models import MODELS

    if model not in MODELS:
        fail(f"--model={model!r} is not allowed; --model must be one of {', '.join(sorted(MODELS))}")
    if dataset not in DATASETS:
        fail(f"--dataset={dataset!r} is not allowed; --dataset must be one of {', '.join(sorted(DATASETS))}")
    if batch < 1:
        fail(f"--batch={batch} is not allowed; --batch must be an integer >= 1")
    import dataclasses

    import torch

    from attacker.rgap import rank_analysis
    from fl_sim.task.models import build_model

    torch.set_num_threads(1)
    shape, classes = DATASETS[dataset].input_shape, DATASETS[dataset].num_classes
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


