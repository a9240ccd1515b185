"""Seed 001's table (``table.md``, ``table.csv``) over a sweep directory's finished cells, rebuilt from files."""

from __future__ import annotations

import itertools
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from fl_sim.results import read_metrics

# --- sweeps: seed 001's table and the figures over cells ----------------------------------------------------------
#: The rows of seed 001's table, in its order, with the chance level under each score: (name, what it is).
SWEEP_ROWS = (
    ("PSNR", "mean attack PSNR over the cell's attacks that succeeded (dB)"),
    ("PSNR chance", "the same for the training split's mean image in place of each reconstruction: a "
                    "reconstruction that knows nothing about the client (dB)"),
    ("SSIM", "mean attack SSIM (Wang et al. 2004, Gaussian window σ = 1.5) over the cell's attacks that succeeded"),
    ("SSIM chance", "the same for the training split's mean image"),
    ("ACC", "final test accuracy (%)"),
    ("ART", "average round time over the baseline's with the other axes equal, minus 1 (%)"),
)


def art_round_time(records: list[dict[str, Any]]) -> float | None:
    """A run's mean round time for ART (s): the mean ``round_time_s`` over rounds 2..R.

    Round 1 is left out when there are later rounds: it includes Flower/Ray starting the client workers (~10–15 s
    on a 2-core machine, against ~0.1 s for a later round), which would swamp any defense's cost.
    """
    times = [(r["round"], r.get("round_time_s")) for r in records if r.get("round_time_s") is not None]
    later = [t for rnd, t in times if rnd > 1]
    use = later or [t for _, t in times]
    return sum(use) / len(use) if use else None


def load_sweep_cells(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The finished cells of a sweep directory, read from their run directories alone.

    Returns:
        One dict per cell whose ``summary.json`` says ``completed``, sorted by grid position: ``id``, ``dir``,
        ``labels`` and ``index`` (from ``cell.json``), ``cfg`` (``config.toml``), ``summary``, ``records``
        (``metrics.jsonl``), ``round_time_s`` (:func:`art_round_time`).
    """
    cells = []
    for d in sorted(Path(sweep_dir, "cells").glob("*/")):
        try:
            meta = json.loads((d / "cell.json").read_text())
            summary = json.loads((d / "summary.json").read_text())
            cfg = tomllib.loads((d / "config.toml").read_text())
        except (OSError, ValueError):
            continue
        if summary.get("status") != "completed":
            continue
        records = read_metrics(d)
        cells.append({"id": d.name, "dir": d, "labels": meta.get("labels", {}), "index": meta.get("index", {}),
                      "axes": meta.get("axes", list(meta.get("labels", {}))), "cfg": cfg, "summary": summary,
                      "records": records, "round_time_s": art_round_time(records)})
    cells.sort(key=lambda c: [c["index"].get(a, 0) for a in c["axes"]])
    return cells


def _sweep_settings(sweep_dir: Path, cells: list[dict[str, Any]]) -> dict[str, Any]:
    """``sweep.json``, or settings inferred from the cells (the defaults of :func:`fl_sim.sweep.load_sweep`)."""
    settings = json.loads((sweep_dir / "sweep.json").read_text()) if (sweep_dir / "sweep.json").is_file() else {}
    if "axes" not in settings:
        names: list[str] = []
        labels: dict[str, dict[str, int]] = {}
        for c in cells:
            for a in c["axes"]:
                if a not in names:
                    names.append(a)
                labels.setdefault(a, {})[c["labels"][a]] = c["index"].get(a, 0)
        settings["axes"] = [{"name": a, "labels": sorted(labels[a], key=labels[a].get)} for a in names]
    names = [a["name"] for a in settings["axes"]]
    settings.setdefault("columns", ["dataset", "defense"])
    settings.setdefault("average", ["seed"] if "seed" in names else [])
    if "baseline" not in settings:
        defense = next((a for a in settings["axes"] if a["name"] == "defense"), None)
        settings["baseline"] = {"defense": "none"} if defense and "none" in defense["labels"] else {}
    return settings


def label_of(cell: dict[str, Any], name: str) -> str:
    if name in cell["labels"]:
        return str(cell["labels"][name])
    value = cell["cfg"].get(name, "")
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def order(cells: list[dict[str, Any]], names: list[str], settings: dict[str, Any],
           complete: bool = False) -> list[tuple[str, ...]]:
    """The distinct label tuples of ``names`` over ``cells``, in axis order (then first appearance).

    With ``complete``, every label of every axis among ``names`` is included, finished cells or not (so a table
    keeps its shape while cells are missing); names that are not axes take the values the cells have.
    """
    axis_labels = {a["name"]: a["labels"] for a in settings["axes"]}
    seen: list[tuple[str, ...]] = []
    for c in cells:
        key = tuple(label_of(c, n) for n in names)
        if key not in seen:
            seen.append(key)
    if complete:
        values = [list(axis_labels[n]) if n in axis_labels else list(dict.fromkeys(k[i] for k in seen))
                  for i, n in enumerate(names)]
        seen = list(itertools.product(*values))

    def rank(key: tuple[str, ...]) -> list[int]:
        return [axis_labels[n].index(k) if n in axis_labels and k in axis_labels[n] else 10**6
                for n, k in zip(names, key)]

    return sorted(seen, key=lambda k: (rank(k), seen.index(k)))


def _stats(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None when n < 2, n) over the values that are not None."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None, 0
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else None), len(xs)


def attack_counts(cells: list[dict[str, Any]]) -> tuple[int, int]:
    """``(succeeded, run)``: the attacks that succeeded and all attacks run, summed over ``cells``."""
    ok = run = 0
    for c in cells:
        attacks = c["summary"].get("attacks") or []
        run += len(attacks)
        ok += sum(1 for a in attacks if "error" not in a)
    return ok, run


def sweep_table(cells: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Seed 001's table over a sweep's finished cells.

    Columns are the label tuples of ``settings["columns"]``; a *panel* (one table) per label tuple of the axes
    that are neither columns nor averaged (e.g. the attack: seed 001's [A] DGA and [B] GIA); each entry is the
    mean ± sample std, over the cells that differ only in the ``average`` axes (seeds), of:

    * PSNR, SSIM: the cell's ``summary.json`` ``attack_means`` (mean over its attacks);
    * ACC: ``final_accuracy`` × 100;
    * ART: ``(t / t_base − 1) × 100`` with ``t`` = :func:`art_round_time` and ``t_base`` the same for the cell
      whose baseline axis holds the baseline label and whose other axis labels are all equal (same seed too).

    * PSNR chance, SSIM chance: the same over the cells' ``attack_means`` ``psnr_chance`` / ``ssim_chance``.

    Returns:
        ``{"columns": [names], "column_keys": [label tuples], "panel_axes": [names], "panels": [{"key": label
        tuple, "rows": {row: [(mean, std, n) per column]}, "attacks": [(succeeded, run) per column]}],
        "baseline": (axis, label) | None}``.
    """
    names = [a["name"] for a in settings["axes"]]
    columns = list(settings["columns"])
    average = [a for a in settings["average"] if a in names]
    panel_axes = [a for a in names if a not in columns and a not in average]
    baseline = next(iter(settings["baseline"].items()), None) if settings.get("baseline") else None
    by_labels = {tuple(sorted(c["labels"].items())): c for c in cells}

    def art(cell: dict[str, Any]) -> float | None:
        if baseline is None or baseline[0] not in cell["labels"]:
            return None
        ref = by_labels.get(tuple(sorted({**cell["labels"], baseline[0]: baseline[1]}.items())))
        if ref is None or not cell["round_time_s"] or not ref["round_time_s"]:
            return None
        return (cell["round_time_s"] / ref["round_time_s"] - 1.0) * 100.0

    def metrics(cell: dict[str, Any]) -> dict[str, float | None]:
        means = cell["summary"].get("attack_means") or {}
        acc = cell["summary"].get("final_accuracy")
        return {"PSNR": means.get("psnr"), "PSNR chance": means.get("psnr_chance"), "SSIM": means.get("ssim"),
                "SSIM chance": means.get("ssim_chance"), "ACC": None if acc is None else acc * 100.0,
                "ART": art(cell)}

    column_keys = order(cells, columns, settings, complete=True)
    panels = []
    for pkey in order(cells, panel_axes, settings, complete=True):
        in_panel = [c for c in cells if tuple(label_of(c, a) for a in panel_axes) == pkey]
        rows: dict[str, list[tuple[float | None, float | None, int]]] = {r: [] for r, _ in SWEEP_ROWS}
        attacks: list[tuple[int, int]] = []
        for ckey in column_keys:
            cols = [c for c in in_panel if tuple(label_of(c, n) for n in columns) == ckey]
            group = [metrics(c) for c in cols]
            for r, _ in SWEEP_ROWS:
                rows[r].append(_stats([m[r] for m in group]))
            attacks.append(attack_counts(cols))
        panels.append({"key": pkey, "rows": rows, "attacks": attacks})
    return {"columns": columns, "column_keys": column_keys, "panel_axes": panel_axes, "panels": panels,
            "average": average, "baseline": baseline}


#: Appended to a PSNR or SSIM entry whose mean is at or below its chance level's mean: nothing recovered.
BELOW_CHANCE = "▼"


def _cell_text(row: str, stat: tuple[float | None, float | None, int], is_baseline: bool,
               chance: tuple[float | None, float | None, int] | None = None) -> str:
    """One table entry: ``mean ± std`` in the row's format (``ref`` for ART's baseline, ``–`` when empty), with
    :data:`BELOW_CHANCE` when ``chance`` (the entry's chance-level stat) is given and the mean is not above it."""
    mean, std, _n = stat
    if row == "ART" and is_baseline and mean is not None:
        return "ref"
    if mean is None:
        return "–"
    kind = row.split()[0]
    fmt = {"PSNR": lambda x: f"{x:.2f}", "SSIM": lambda x: f"{x:.1e}", "ACC": lambda x: f"{x:.2f}%",
           "ART": lambda x: f"{x:+.2f}%"}[kind]
    text = fmt(mean)
    if std is not None:
        text += " ± " + ({"ACC": f"{std:.2f}", "ART": f"{std:.2f}"}.get(kind) or fmt(std))
    if chance is not None and chance[0] is not None and mean <= chance[0]:
        text += f" {BELOW_CHANCE}"
    return text
