"""``fl-sim attack``: the one-shot audit — attack the update one client would send for given images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fl_sim.cli.common import fail
from fl_sim.config import ConfigError, key_table, parse_overrides, resolve


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
) -> None:
    """One-shot audit: attack the update one client would send for the given images, without a federation.

    The update goes through the same client pipeline and server side as in `fl-sim run` (the attack sees the raw
    update; the defense's server step comes after it). Writes attack.json (psnr, ssim, mse, label_accuracy,
    time_s, iterations, ...) and reconstruction.png (truth above reconstruction) to --out.
    """
    from fl_sim.task.datasets import DATASETS

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
        name = dataset or ("cifar10" if image else str(values.get("dataset", key_table()["dataset"].default)))
        if name not in DATASETS:
            raise ConfigError(f"--dataset={name!r} is not allowed; --dataset must be one of "
                              f"{', '.join(sorted(DATASETS))}")
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

    from fl_sim.audit import audit_dataset, run_audit
    from fl_sim.results import default_run_name
    from strategies.metrics import chance_note

    torch.set_num_threads(1)
    if out is None:
        out = Path(str(cfg["out-dir"])) / ("audit-" + default_run_name(cfg))
    from fl_sim.task.datasets import load_dataset

    # the chance level: the mean image of the training split the samples come from (files: the channel means)
    reference = load_dataset(name, str(cfg["data-dir"])) if index is not None else None
    try:
        record = run_audit(cfg, audit_dataset(name, images, labels), out, reference)
    except ConfigError as exc:
        fail(str(exc))
    lab = "–" if record["label_accuracy"] is None else f"{record['label_accuracy']:.2f}"
    note = chance_note(record)
    below = f"; {note}" if note else ""
    typer.echo(f"{record['attack']} on {record['model']} ({record['defense']}, {record['num_images']} image(s)): "
               f"PSNR {record['psnr']:.2f} dB, SSIM {record['ssim']:.3f} (chance {record['psnr_chance']:.2f} dB, "
               f"{record['ssim_chance']:.3f}{below}), MSE {record['mse']:.2e}, label accuracy "
               f"{lab}, {record['iterations']} iterations in {record['time_s']:.2f} s")
    typer.echo(str(out))


def _audit_images(cfg: dict[str, Any], image: list[Path] | None, index: int | None, n: int,
                  label: list[int] | None) -> tuple[Any, Any]:
    """The audit's images ``uint8 (N, H, W, C)`` and labels, from files or from the dataset (ConfigError)."""
    import numpy as np

    from fl_sim.audit import load_images
    from fl_sim.task.datasets import DATASETS, DataError, load_dataset

    name = str(cfg["dataset"])
    shape, classes = DATASETS[name].input_shape, DATASETS[name].num_classes
    if image:
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


