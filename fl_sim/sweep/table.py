"""Seed 001's table (``table.md``, ``table.csv``) over a sweep directory's finished cells, rebuilt from files."""

from __future__ import annotations

import itertools
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from clients.defenses import DEFENSES
from fl_sim.results import attack_target, read_metrics
from strategies.metrics import at_chance

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

#: The attack targets (``attack-target``) in the order the tables list them: the intercepted update, the probe.
TARGETS = ("update", "probe")
_TARGET_HELP = {"update": "the victim's intercepted update", "probe": "the probe (the victim's defended one-image "
                "gradient, B = 1: an audit of the worst case)"}


def _target_rank(target: str) -> tuple[int, str]:
    return (TARGETS.index(target) if target in TARGETS else len(TARGETS), target)


def cell_targets(cells: list[dict[str, Any]]) -> list[str]:
    """The attack targets found in the cells' attack records, in :data:`TARGETS` order (a record without ``target``
    attacked the update)."""
    found = {attack_target(a) for c in cells for a in c["summary"].get("attacks") or []}
    return sorted(found, key=_target_rank)


def sweep_rows(cells: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The table's rows for these cells: seed 001's :data:`SWEEP_ROWS` when every attack targeted the update (as
    before targets existed), else PSNR and SSIM once per target, each with its chance row (``PSNR update``,
    ``PSNR update chance``, ``PSNR probe``, ``PSNR probe chance``, then the same for SSIM), then ACC and ART."""
    targets = cell_targets(cells)
    if targets in ([], ["update"]):
        return list(SWEEP_ROWS)
    rows = []
    for metric in ("PSNR", "SSIM"):
        what = dict(SWEEP_ROWS)[metric]
        for t in targets:
            rows.append((f"{metric} {t}", what.replace("attacks", "attacks on " + _TARGET_HELP.get(t, t))))
            rows.append((f"{metric} {t} chance", f"the same for the training split's mean image ({t})"))
    return rows + [r for r in SWEEP_ROWS if r[0] in ("ACC", "ART")]


def target_means(summary: dict[str, Any], target: str) -> dict[str, float | None]:
    """The mean ``psnr``, ``ssim``, ``mse``, ``label_accuracy`` and the chance levels ``psnr_chance``,
    ``ssim_chance``, ``mse_chance`` of a cell's attacks on ``target`` (from ``summary.json``'s attack records;
    unscored attacks and errors left out), ``None`` where there are none."""
    mine = [a for a in summary.get("attacks") or [] if attack_target(a) == target]
    out: dict[str, float | None] = {}
    for k in ("psnr", "ssim", "mse", "label_accuracy", "psnr_chance", "ssim_chance", "mse_chance"):
        xs = [a[k] for a in mine if isinstance(a.get(k), (int, float))]
        out[k] = float(np.mean(xs)) if xs else None
    return out


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


def chance_counts(cells: list[dict[str, Any]], target: str | None = None) -> tuple[int, int]:
    """``(at_chance, scored)``: of the scored attacks of ``cells`` (on ``target``; all when ``None``) that carry both
    chance levels, how many scored at or below them in both PSNR and SSIM (:func:`strategies.metrics.at_chance`:
    nothing recovered),
    summed over the cells. Attacks recorded before chance levels existed are left out of both counts."""
    at = scored = 0
    for c in cells:
        for a in c["summary"].get("attacks") or []:
            if target is not None and attack_target(a) != target:
                continue
            verdict = at_chance(a) if isinstance(a.get("psnr"), (int, float)) else None
            if verdict is not None:
                scored += 1
                at += verdict
    return at, scored


def sweep_table(cells: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Seed 001's table over a sweep's finished cells.

    Columns are the label tuples of ``settings["columns"]``; a *panel* (one table) per label tuple of the axes
    that are neither columns nor averaged (e.g. the attack: seed 001's [A] DGA and [B] GIA); each entry is the
    mean ± sample std, over the cells that differ only in the ``average`` axes (seeds), of:

    * PSNR, SSIM: the cell's ``summary.json`` ``attack_means`` (mean over its attacks); with attacks on more than
      the update (``attack-target``), one row per target (:func:`sweep_rows`, :func:`target_means`);
    * ACC: ``final_accuracy`` × 100;
    * ART: ``(t / t_base − 1) × 100`` with ``t`` = :func:`art_round_time` and ``t_base`` the same for the cell
      whose baseline axis holds the baseline label and whose other axis labels are all equal (same seed too).

    * PSNR chance, SSIM chance: the same over the cells' ``attack_means`` ``psnr_chance`` / ``ssim_chance``.

    Returns:
        ``{"columns": [names], "column_keys": [label tuples], "panel_axes": [names], "panels": [{"key": label
        tuple, "rows": {row: [(mean, std, n) per column]}, "attacks": [(succeeded, run) per column],
        "at_chance": {target: [(at chance, scored) per column]} (:func:`chance_counts`; one entry per target when
        the cells attacked more than the update, else ``{"all": ...}``)}],
        "baseline": (axis, label) | None, "rows": [(row, what)] in order (:func:`sweep_rows`)}``.
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

    row_list = sweep_rows(cells)

    def metrics(cell: dict[str, Any]) -> dict[str, float | None]:
        means = cell["summary"].get("attack_means") or {}
        acc = cell["summary"].get("final_accuracy")
        out = {"ACC": None if acc is None else acc * 100.0, "ART": art(cell)}
        for row, _ in row_list:
            words = row.split()
            if words[0] not in ("PSNR", "SSIM"):
                continue
            key = words[0].lower() + ("_chance" if words[-1] == "chance" else "")
            target = words[1] if len(words) > 1 and words[1] != "chance" else None
            # "PSNR probe (chance)": the mean over the cell's attacks on that target; "PSNR (chance)": attack_means
            out[row] = target_means(cell["summary"], target)[key] if target else means.get(key)
        return out

    column_keys = order(cells, columns, settings, complete=True)
    count_targets = [t for t in cell_targets(cells) if t != "update" or len(cell_targets(cells)) > 1] or ["all"]
    panels = []
    for pkey in order(cells, panel_axes, settings, complete=True):
        in_panel = [c for c in cells if tuple(label_of(c, a) for a in panel_axes) == pkey]
        rows: dict[str, list[tuple[float | None, float | None, int]]] = {r: [] for r, _ in row_list}
        attacks: list[tuple[int, int]] = []
        at_chance: dict[str, list[tuple[int, int]]] = {t: [] for t in count_targets}
        for ckey in column_keys:
            cols = [c for c in in_panel if tuple(label_of(c, n) for n in columns) == ckey]
            group = [metrics(c) for c in cols]
            for r, _ in row_list:
                rows[r].append(_stats([m[r] for m in group]))
            attacks.append(attack_counts(cols))
            for t in count_targets:
                at_chance[t].append(chance_counts(cols, None if t == "all" else t))
        panels.append({"key": pkey, "rows": rows, "attacks": attacks, "at_chance": at_chance})
    return {"columns": columns, "column_keys": column_keys, "panel_axes": panel_axes, "panels": panels,
            "average": average, "baseline": baseline, "rows": row_list}


#: Appended to a PSNR or SSIM entry whose mean is at or below its chance level's mean (by that metric, nothing
#: recovered; a reconstruction recovered nothing only when both are).
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
    kind = row.split()[0]  # "PSNR probe", "PSNR chance" are formatted as PSNR
    fmt = {"PSNR": lambda x: f"{x:.2f}", "SSIM": lambda x: f"{x:.1e}", "ACC": lambda x: f"{x:.2f}%",
           "ART": lambda x: f"{x:+.2f}%"}[kind]
    text = fmt(mean)
    if std is not None:
        text += " ± " + ({"ACC": f"{std:.2f}", "ART": f"{std:.2f}"}.get(kind) or fmt(std))
    if chance is not None and chance[0] is not None and mean <= chance[0]:
        text += f" {BELOW_CHANCE}"
    return text


# --- the privacy–utility frontier: each defense's strength swept ---------------------------------------------------
def _strength_keys(defense: str) -> list[str]:
    """The run keys that set ``defense``'s strength: the keys its module declares (none for an unknown name)."""
    return list(DEFENSES[defense].keys) if defense in DEFENSES else []


def _mode(values: list[Any]) -> Any:
    """The most common value (ties: the first seen)."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def frontier_series(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The strength series of a sweep: per defense (``cfg["defense"]``, ``none`` aside) and per key of that defense
    that takes more than one value among its cells, the cells whose other varying keys of that defense sit at their
    most common value (so GradDefense's σ series holds M fixed and its M series σ fixed).

    Returns:
        ``[{"defense": name, "key": run key, "cells": [cell dicts]}]`` in order of first appearance; empty when no
        defense was run at more than one strength (e.g. seed 001's table).
    """
    by_defense: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        by_defense.setdefault(str(c["cfg"].get("defense", "none")), []).append(c)
    series = []
    for defense, mine in by_defense.items():
        if defense == "none":
            continue
        varying = [k for k in _strength_keys(defense) if len({repr(c["cfg"].get(k)) for c in mine}) > 1]
        for key in varying:
            fixed = {o: _mode([c["cfg"].get(o) for c in mine]) for o in varying if o != key}
            members = [c for c in mine if all(c["cfg"].get(o) == v for o, v in fixed.items())]
            if len({repr(c["cfg"].get(key)) for c in members}) > 1:
                series.append({"defense": defense, "key": key, "cells": members})
    return series


def _strength_axis(cells: list[dict[str, Any]], key: str) -> str | None:
    """The axis whose label determines ``key``'s value in ``cells`` (the axis that sets the strength)."""
    for axis in (cells[0]["axes"] if cells else []):
        seen: dict[str, Any] = {}
        if all(seen.setdefault(c["labels"].get(axis, ""), repr(c["cfg"].get(key))) == repr(c["cfg"].get(key))
               for c in cells) and len(seen) > 1:
            return axis
    return None


#: Strength keys whose larger values protect *less* (a frontier lists them from the largest value down).
WEAKER_WHEN_LARGER = frozenset({"defense-dp-epsilon", "defense-dp-delta", "defense-dp-clip"})


def strength_order(key: str, values: list[Any]) -> list[Any]:
    """The distinct ``values`` of ``key`` from the weakest defense to the strongest: numbers ascending (descending for
    :data:`WEAKER_WHEN_LARGER`: privacy budgets, clipping bounds), other values (e.g. a quantisation format) in the
    order given (the sweep file's)."""
    distinct = list(dict.fromkeys(values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct, reverse=key in WEAKER_WHEN_LARGER)
    return distinct


def unscored_images(points: list[dict[str, Any]], target: str) -> int | None:
    """The largest image count held by an unscored attack on ``target`` at these frontier points (:func:`frontier`'s
    ``unscored``), when no attack on it was scored there; ``None`` otherwise (or when no count was recorded)."""
    if any(p["psnr"][target][0] is not None for p in points):
        return None
    held = [p.get("unscored", {}).get(target, {}).get("num_images") for p in points]
    return max((n for n in held if n is not None), default=None)


def frontier(cells: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Each defense's privacy–utility frontier over a sweep's finished cells (``sweeps/frontier-fmnist.toml``).

    A *series* is one defense with one of its keys swept (:func:`frontier_series`); its *points* are the key's values
    from the weakest defense to the strongest (:func:`strength_order`). A *panel* is one label tuple of the axes that
    neither set a strength nor are averaged (e.g. the attack). Per point and target (``update``, ``probe``): the
    mean ± sample std over the averaged axes (seeds) of the cell's mean attack PSNR and SSIM on that target
    (:func:`target_means`); the mean chance PSNR and SSIM of those attacks (``psnr_chance``, ``ssim_chance`` in the
    attack records: the training mean image's scores; ``None`` when not recorded); ``attacks`` and ``above``: how
    many attacks on the target were scored and how many of them scored above chance (PSNR above its
    ``psnr_chance`` *or* SSIM above its ``ssim_chance``, each attack against its own true image); ``unscored``: how
    many were recorded unscored (not attacked, e.g. a multi-step update holding more images than the attack
    reconstructs) and the largest image count they held; and the final accuracy (%). ``none`` cells give the
    panel's reference accuracy and PSNR.

    Where the attack falls to chance, per series and target — the first point (weakest strength first) such that:

    * ``reached``: **every** scored attack on the target, over all its cells (seeds) and attacked rounds, is at or
      below its chance level in both PSNR and SSIM (``above == 0``). This is the criterion the docs quote: a mean
      over rounds can hide a round that leaks (an untrained model's round 1 often does), and a reconstruction can
      sit below the mean image's PSNR while its SSIM shows the image's structure;
    * ``reached_mean``: the mean PSNR is at or below the mean chance PSNR — more lenient, kept to show how much the
      criterion matters.

    Each with the accuracy there and its cost (``none``'s accuracy minus the point's, in points); ``None`` if no
    point gets there (or a chance level is missing).

    Returns:
        ``{"targets": [...], "panel_axes": [...], "panels": [{"key": labels, "none": {"acc": stat, "psnr":
        {target: stat}, ...}, "series": [{"defense", "key", "axis", "points": [{"value", "acc": stat, "psnr":
        {target: stat}, "ssim": {target: stat}, "chance": {target: float | None}, "ssim_chance": {target: float |
        None}, "attacks": {target: int}, "above": {target: int | None}, "unscored": {target: {"attacks",
        "num_images"}}}], "reached": {target: {"value", "psnr", "chance", "ssim", "ssim_chance", "acc", "cost"} |
        None}, "reached_mean": {target: same | None}}]}]}``, a stat being ``(mean, std, n)``.
    """
    names = [a["name"] for a in settings["axes"]]
    average = [a for a in settings.get("average", []) if a in names]
    targets = cell_targets(cells) or ["update"]
    series = frontier_series(cells)
    strength_axes = {_strength_axis(s["cells"], s["key"]) for s in series} - {None}
    panel_axes = [a for a in names if a not in average and a not in strength_axes]

    def panel_of(c: dict[str, Any]) -> tuple[str, ...]:
        return tuple(label_of(c, a) for a in panel_axes)

    def mean_of(xs: list[Any]) -> float | None:
        xs = [x for x in xs if isinstance(x, (int, float))]
        return float(np.mean(xs)) if xs else None

    def point(group: list[dict[str, Any]]) -> dict[str, Any]:
        accs = [None if c["summary"].get("final_accuracy") is None else c["summary"]["final_accuracy"] * 100
                for c in group]
        out: dict[str, Any] = {"acc": _stats(accs), "psnr": {}, "ssim": {}, "chance": {}, "ssim_chance": {},
                               "attacks": {}, "above": {}, "unscored": {}}
        for t in targets:
            mine = [a for c in group for a in c["summary"].get("attacks") or [] if attack_target(a) == t]
            scored = [a for a in mine if isinstance(a.get("psnr"), (int, float))]
            out["psnr"][t] = _stats([target_means(c["summary"], t)["psnr"] for c in group])
            out["ssim"][t] = _stats([target_means(c["summary"], t)["ssim"] for c in group])
            out["chance"][t] = mean_of([a.get("psnr_chance") for a in scored])
            out["ssim_chance"][t] = mean_of([a.get("ssim_chance") for a in scored])
            verdicts = [at_chance(a) for a in scored]
            out["attacks"][t] = len(scored)
            out["above"][t] = None if None in verdicts else sum(not v for v in verdicts)
            held = [a.get("num_images") for a in mine if a.get("unscored")]
            out["unscored"][t] = {"attacks": len(held),
                                  "num_images": max((n for n in held if isinstance(n, int)), default=None)}
        return out

    def hit_of(p: dict[str, Any] | None, t: str, ref: float | None) -> dict[str, Any] | None:
        if p is None:
            return None
        acc = p["acc"][0]
        return {"value": p["value"], "psnr": p["psnr"][t][0], "chance": p["chance"][t], "ssim": p["ssim"][t][0],
                "ssim_chance": p["ssim_chance"][t], "acc": acc,
                "cost": None if ref is None or acc is None else ref - acc}

    panels = []
    for pkey in order(cells, panel_axes, settings):
        in_panel = [c for c in cells if panel_of(c) == pkey]
        base = [c for c in in_panel if str(c["cfg"].get("defense")) == "none"]
        none = point(base) if base else None
        ref = none["acc"][0] if none else None
        out_series = []
        for s in series:
            mine = [c for c in s["cells"] if panel_of(c) == pkey]
            if not mine:
                continue
            axis = _strength_axis(s["cells"], s["key"])
            values = strength_order(s["key"], [c["cfg"].get(s["key"]) for c in
                                               sorted(mine, key=lambda c: c["index"].get(axis, 0) if axis else 0)])
            points = [{"value": v, **point([c for c in mine if c["cfg"].get(s["key"]) == v])} for v in values]
            reached = {t: hit_of(next((p for p in points if p["attacks"][t] and p["above"][t] == 0), None), t, ref)
                       for t in targets}
            reached_mean = {t: hit_of(next((p for p in points if p["psnr"][t][0] is not None
                                            and p["chance"][t] is not None and p["psnr"][t][0] <= p["chance"][t]),
                                           None), t, ref) for t in targets}
            out_series.append({"defense": s["defense"], "key": s["key"], "axis": axis, "points": points,
                               "reached": reached, "reached_mean": reached_mean})
        panels.append({"key": pkey, "none": none, "series": out_series})
    return {"targets": targets, "panel_axes": panel_axes, "panels": panels}
