"""Figures and reports rebuilt from files alone: ``report.md`` for a run directory; seed 001's table
(``table.md``, ``table.csv``) and figures for a sweep directory (``fl-sim sweep``, :mod:`fl_sim.sweep`)."""

from __future__ import annotations

import itertools
import json
import tomllib
from pathlib import Path
from typing import Any

from fl_sim.results import read_metrics


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def accuracy_figure(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Test accuracy against round, with attack PSNR on a second axis when attacks ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [(r["round"], r["accuracy"]) for r in records if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if ev:
        ax.plot([e[0] for e in ev], [e[1] for e in ev], color="tab:blue", label="test accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy", color="tab:blue")
    ax.set_ylim(0, 1)
    attacks = [a for r in records for a in r.get("attacks", []) if a.get("psnr") is not None]
    if attacks:
        ax2 = ax.twinx()
        ax2.scatter([a["round"] for a in attacks], [a["psnr"] for a in attacks], color="tab:red", s=14,
                    label="attack PSNR")
        ax2.set_ylabel("attack PSNR (dB)", color="tab:red")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_run_report(run_dir: str | Path) -> Path:
    """(Re)write ``accuracy.png`` and ``report.md`` in ``run_dir`` from its config, metrics and summary.

    Returns:
        The path of ``report.md``.
    """
    run_dir = Path(run_dir)
    cfg = tomllib.loads((run_dir / "config.toml").read_text()) if (run_dir / "config.toml").is_file() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    records = read_metrics(run_dir)
    title = f"{cfg.get('dataset', '')} · {cfg.get('model', '')} · defense={cfg.get('defense', '')}"
    accuracy_figure(records, run_dir / "accuracy.png", title)

    means = summary.get("attack_means") or {}
    lines = [
        f"# fl-sim run `{run_dir.name}`",
        "",
        f"Status: **{summary.get('status', 'running')}** · rounds: {summary.get('rounds', len(records))} · "
        f"wall time: {_fmt(summary.get('wall_time_s'), '.1f')} s",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for k in ("dataset", "data-dir", "model", "mode", "batch-size", "lr", "lr-schedule", "num-supernodes",
              "num-server-rounds", "defense", "attack", "attack-every", "victim", "seed"):
        if k in cfg:
            lines.append(f"| {k} | `{cfg[k]}` |")
    lines += [
        "",
        "## Utility",
        "",
        f"Final test accuracy **{_fmt(summary.get('final_accuracy'), '.4f')}** "
        f"(best {_fmt(summary.get('best_accuracy'), '.4f')}), final loss {_fmt(summary.get('final_loss'), '.4f')}; "
        f"mean round time {_fmt(summary.get('mean_round_time_s'), '.3f')} s, mean client train time "
        f"{_fmt(summary.get('mean_train_time_s'), '.4f')} s of which defense "
        f"{_fmt(summary.get('mean_defense_time_s'), '.4f')} s.",
        "",
        "![accuracy](accuracy.png)",
        "",
        "## Privacy (attacks on intercepted updates)",
        "",
    ]
    attacks = summary.get("attacks") or [a for r in records for a in r.get("attacks", [])]
    if attacks:
        lines += [
            f"Mean over {len(attacks)} attacks: PSNR **{_fmt(means.get('psnr'))} dB**, SSIM "
            f"{_fmt(means.get('ssim'), '.3f')}, MSE {_fmt(means.get('mse'), '.2e')}, label accuracy "
            f"{_fmt(means.get('label_accuracy'), '.2f')}, {_fmt(means.get('time_s'), '.1f')} s per attack.",
            "",
            "| round | client | attack | PSNR (dB) | SSIM | MSE | label acc. | time (s) | iterations | image |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for a in attacks:
            img = f"[png]({a['image']})" if a.get("image") else ""
            lines.append(
                f"| {a.get('round')} | {a.get('client')} | {a.get('attack')} | {_fmt(a.get('psnr'))} | "
                f"{_fmt(a.get('ssim'), '.3f')} | {_fmt(a.get('mse'), '.2e')} | {_fmt(a.get('label_accuracy'))} | "
                f"{_fmt(a.get('time_s'), '.1f')} | {a.get('iterations', '')} | {img} |"
            )
        first = next((a for a in attacks if a.get("image")), None)
        if first:
            lines += ["", f"![round {first['round']}]({first['image']})"]
    else:
        lines.append("No attack ran.")
    lines += [
        "",
        "PSNR and SSIM are computed with scikit-image on de-normalised [0, 1] images after Hungarian matching; "
        "SSIM is standard SSIM (not breaching's CW-SSIM).",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# --- sweeps: seed 001's table and the figures over cells ----------------------------------------------------------
#: The rows of seed 001's table, in its order: (name, what it is).
SWEEP_ROWS = (
    ("PSNR", "mean attack PSNR over the cell's attacks (dB)"),
    ("SSIM", "mean attack SSIM over the cell's attacks"),
    ("ACC", "final test accuracy (%)"),
    ("ART", "average round time over the baseline's with the other axes equal, minus 1 (%)"),
)


def is_sweep_dir(path: str | Path) -> bool:
    """True when ``path`` looks like an ``fl-sim sweep`` directory (``sweep.json`` or a ``cells/`` folder)."""
    path = Path(path)
    return (path / "sweep.json").is_file() or (path / "cells").is_dir()


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


def _label_of(cell: dict[str, Any], name: str) -> str:
    if name in cell["labels"]:
        return str(cell["labels"][name])
    value = cell["cfg"].get(name, "")
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _order(cells: list[dict[str, Any]], names: list[str], settings: dict[str, Any],
           complete: bool = False) -> list[tuple[str, ...]]:
    """The distinct label tuples of ``names`` over ``cells``, in axis order (then first appearance).

    With ``complete``, every label of every axis among ``names`` is included, finished cells or not (so a table
    keeps its shape while cells are missing); names that are not axes take the values the cells have.
    """
    axis_labels = {a["name"]: a["labels"] for a in settings["axes"]}
    seen: list[tuple[str, ...]] = []
    for c in cells:
        key = tuple(_label_of(c, n) for n in names)
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
    import numpy as np

    xs = [v for v in values if v is not None]
    if not xs:
        return None, None, 0
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else None), len(xs)


def sweep_table(cells: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Seed 001's table over a sweep's finished cells.

    Columns are the label tuples of ``settings["columns"]``; a *panel* (one table) per label tuple of the axes
    that are neither columns nor averaged (e.g. the attack: seed 001's [A] DGA and [B] GIA); each entry is the
    mean ± sample std, over the cells that differ only in the ``average`` axes (seeds), of:

    * PSNR, SSIM: the cell's ``summary.json`` ``attack_means`` (mean over its attacks);
    * ACC: ``final_accuracy`` × 100;
    * ART: ``(t / t_base − 1) × 100`` with ``t`` = :func:`art_round_time` and ``t_base`` the same for the cell
      whose baseline axis holds the baseline label and whose other axis labels are all equal (same seed too).

    Returns:
        ``{"columns": [names], "column_keys": [label tuples], "panel_axes": [names], "panels": [{"key": label
        tuple, "rows": {row: [(mean, std, n) per column]}}], "baseline": (axis, label) | None}``.
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
        return {"PSNR": means.get("psnr"), "SSIM": means.get("ssim"),
                "ACC": None if acc is None else acc * 100.0, "ART": art(cell)}

    column_keys = _order(cells, columns, settings, complete=True)
    panels = []
    for pkey in _order(cells, panel_axes, settings, complete=True):
        in_panel = [c for c in cells if tuple(_label_of(c, a) for a in panel_axes) == pkey]
        rows: dict[str, list[tuple[float | None, float | None, int]]] = {r: [] for r, _ in SWEEP_ROWS}
        for ckey in column_keys:
            group = [metrics(c) for c in in_panel if tuple(_label_of(c, n) for n in columns) == ckey]
            for r, _ in SWEEP_ROWS:
                rows[r].append(_stats([m[r] for m in group]))
        panels.append({"key": pkey, "rows": rows})
    return {"columns": columns, "column_keys": column_keys, "panel_axes": panel_axes, "panels": panels,
            "average": average, "baseline": baseline}


def _cell_text(row: str, stat: tuple[float | None, float | None, int], is_baseline: bool) -> str:
    mean, std, _n = stat
    if row == "ART" and is_baseline and mean is not None:
        return "ref"
    if mean is None:
        return "–"
    fmt = {"PSNR": lambda x: f"{x:.2f}", "SSIM": lambda x: f"{x:.1e}", "ACC": lambda x: f"{x:.2f}%",
           "ART": lambda x: f"{x:+.2f}%"}[row]
    text = fmt(mean)
    if std is not None:
        text += " ± " + ({"ACC": f"{std:.2f}", "ART": f"{std:.2f}"}.get(row) or fmt(std))
    return text


def _crop_white(img: Any, pad: int = 4) -> Any:
    """An RGB(A) float image without its near-white margins (keeps ``pad`` pixels)."""
    import numpy as np

    ink = (img[..., :3] < 0.97).any(axis=-1)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not len(rows):
        return img
    return img[max(0, rows[0] - pad):rows[-1] + pad + 1, max(0, cols[0] - pad):cols[-1] + pad + 1]


def _safe(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._+=-]", "-", text) or "all"


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """(Re)write a sweep directory's ``table.md``, ``table.csv`` and figures from its cells' run directories.

    Files: ``table.md`` (per panel, seed 001's layout, with the figures linked), ``table.csv`` (the same numbers:
    rows PSNR, SSIM, ACC, ART as means, then their sample std and the count n; ACC and ART in %), and
    ``accuracy[-GROUP].png``, ``privacy-utility.png``, ``montage[-GROUP].png`` (GROUP: the labels of every column
    axis but the last, e.g. the dataset). Unfinished cells are left out (their number is stated).

    Returns:
        The path of ``table.md``.
    """
    import csv

    sweep_dir = Path(sweep_dir)
    cells = load_sweep_cells(sweep_dir)
    settings = _sweep_settings(sweep_dir, cells)
    table = sweep_table(cells, settings)
    figures = sweep_figures(cells, settings, sweep_dir)
    expected = 1
    for a in settings["axes"]:
        expected *= len(a["labels"])
    base = table["baseline"]
    baseline_col = [base is not None and dict(zip(table["columns"], k)).get(base[0]) == base[1]
                    for k in table["column_keys"]]
    headers = [" · ".join(k) for k in table["column_keys"]]

    lines = [f"# Sweep `{sweep_dir.name}`", ""]
    if settings.get("description"):
        lines += [settings["description"], ""]
    lines += [
        f"{len(cells)} of {expected} cells finished. Columns: {' × '.join(table['columns'])}; each entry is the "
        f"mean ± sample std over {', '.join(table['average']) or 'the cells of the column'}"
        f"{' (n per entry in table.csv)' if table['average'] else ''}.",
        "",
    ]
    for panel in table["panels"]:
        title = ", ".join(f"{a} = {k}" for a, k in zip(table["panel_axes"], panel["key"])) or "all cells"
        lines += [f"## {title}", "", "| | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
        for row, _ in SWEEP_ROWS:
            lines.append(f"| {row} | " + " | ".join(
                _cell_text(row, s, b) for s, b in zip(panel["rows"][row], baseline_col)) + " |")
        lines.append("")
    lines += ["Rows: " + "; ".join(f"**{r}** {what}" for r, what in SWEEP_ROWS) + "."]
    if base:
        lines.append(f"ART's baseline: the cells with {base[0]} = {base[1]} (\"ref\"); round 1 (worker start-up) "
                     "is left out of the round times. Round times measured while other work shares the machine "
                     "are indicative only.")
    else:
        lines.append("ART: no baseline (sweep.baseline, default defense = none) in this sweep.")
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    path = sweep_dir / "table.md"
    path.write_text("\n".join(lines))

    with open(sweep_dir / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*table["panel_axes"], "metric", *["/".join(k) for k in table["column_keys"]]])
        for panel in table["panels"]:
            for which, pos in (("", 0), (" std", 1)):
                for row, _ in SWEEP_ROWS:
                    w.writerow([*panel["key"], row + which, *[
                        "" if s[pos] is None else f"{s[pos]:.6g}" for s in panel["rows"][row]]])
            w.writerow([*panel["key"], "n", *[s[2] for s in panel["rows"]["PSNR"]]])
    return path


def sweep_figures(cells: list[dict[str, Any]], settings: dict[str, Any], sweep_dir: Path) -> list[Path]:
    """Draw the sweep figures (see :func:`write_sweep_report`); return their paths.

    * ``accuracy[-GROUP].png``: test accuracy against round, one line per label of the last column axis (the
      defense): the mean over its cells (seeds, attacks), shaded between their min and max.
    * ``privacy-utility.png``: one point per cell, final accuracy (%) against mean attack PSNR (dB); colour = last
      column axis, marker = first panel axis (the attack); one subplot per GROUP.
    * ``montage[-GROUP].png``: rows = labels of the last column axis, columns = labels of the first panel axis;
      each panel is the first attacked round's figure (truth above reconstruction) of the cell with the smallest
      averaged-axis labels (the first seed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import textwrap

    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    import numpy as np

    columns = list(settings["columns"])
    names = [a["name"] for a in settings["axes"]]
    average = [a for a in settings["average"] if a in names]
    panel_axes = [a for a in names if a not in columns and a not in average]
    group_names, line_name = columns[:-1], columns[-1]
    groups = _order(cells, group_names, settings) if cells else [()]
    lines_order = _order(cells, [line_name], settings)
    marker_name = panel_axes[0] if panel_axes else None
    markers_order = _order(cells, [marker_name], settings) if marker_name else [("",)]
    colours = {k[0]: plt.cm.tab10(i % 10) for i, k in enumerate(lines_order)}
    shapes = {k[0]: "osD^vP*X"[i % 8] for i, k in enumerate(markers_order)}
    paths: list[Path] = []

    def in_group(c: dict[str, Any], g: tuple[str, ...]) -> bool:
        return tuple(_label_of(c, n) for n in group_names) == g

    def suffix(g: tuple[str, ...]) -> str:
        return ("-" + _safe("-".join(g))) if g else ""

    for g in groups:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for (label,) in lines_order:
            series: dict[int, list[float]] = {}
            for c in cells:
                if in_group(c, g) and _label_of(c, line_name) == label:
                    for r in c["records"]:
                        if r.get("accuracy") is not None:
                            series.setdefault(r["round"], []).append(r["accuracy"] * 100)
            if not series:
                continue
            rounds = sorted(series)
            vals = [series[r] for r in rounds]
            ax.plot(rounds, [np.mean(v) for v in vals], color=colours[label], label=label, marker="." if
                    len(rounds) < 30 else None)
            ax.fill_between(rounds, [min(v) for v in vals], [max(v) for v in vals], color=colours[label],
                            alpha=0.15, linewidth=0)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"accuracy per {line_name}" + (f" — {' · '.join(g)}" if g else ""), fontsize=9)
        if cells:
            ax.legend(fontsize=7, title=line_name, title_fontsize=7)
        fig.tight_layout()
        path = sweep_dir / f"accuracy{suffix(g)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for c in cells:
            psnr = (c["summary"].get("attack_means") or {}).get("psnr")
            acc = c["summary"].get("final_accuracy")
            if not in_group(c, g) or psnr is None or acc is None:
                continue
            ax.scatter(acc * 100, psnr, color=colours[_label_of(c, line_name)], edgecolor="black", linewidth=0.4,
                       marker=shapes[_label_of(c, marker_name)] if marker_name else "o", s=36)
        ax.set_xlabel("final test accuracy (%)  → more useful")
        ax.set_ylabel("mean attack PSNR (dB)  → less private")
        ax.set_title(" · ".join(g) or "privacy–utility", fontsize=9)
    handles = [plt.Line2D([], [], color=colours[k], marker="o", linestyle="", label=k) for (k,) in lines_order]
    if marker_name:
        handles += [plt.Line2D([], [], color="grey", marker=shapes[k], linestyle="", label=f"{marker_name}={k}")
                    for (k,) in markers_order]
    if handles:
        axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle("privacy–utility: one point per cell", fontsize=10)
    fig.tight_layout()
    path = sweep_dir / "privacy-utility.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    for g in groups:
        nrow, ncol = max(1, len(lines_order)), max(1, len(markers_order))
        width = max(5.0, 2.8 * ncol + 0.6)
        fig, axes = plt.subplots(nrow, ncol, figsize=(width, 2.9 * nrow + 0.8), squeeze=False)
        for i, (label,) in enumerate(lines_order or [("",)]):
            for j, (mlabel,) in enumerate(markers_order):
                ax = axes[i][j]
                ax.axis("off")
                pick = [c for c in cells if in_group(c, g) and _label_of(c, line_name) == label and
                        (marker_name is None or _label_of(c, marker_name) == mlabel) and
                        all(c["index"].get(a, 0) == 0 for a in panel_axes[1:])]
                pick.sort(key=lambda c: [c["index"].get(a, 0) for a in average])
                attack = next((a for c in pick for a in c["summary"].get("attacks", []) if a.get("image") and
                               (c["dir"] / a["image"]).is_file()), None)
                cell = next((c for c in pick if attack in c["summary"].get("attacks", [])), None)
                if attack is None or cell is None:
                    ax.text(0.5, 0.5, "–", ha="center", va="center")
                else:
                    ax.imshow(_crop_white(mpimg.imread(cell["dir"] / attack["image"])))
                    ax.text(0.5, -0.02, f"PSNR {attack.get('psnr', float('nan')):.1f} dB, round {attack['round']}",
                            transform=ax.transAxes, ha="center", va="top", fontsize=7)
                if j == 0:
                    ax.text(-0.04, 0.5, label, transform=ax.transAxes, ha="right", va="center", fontsize=9,
                            rotation=90)
                if i == 0 and marker_name:
                    ax.set_title(f"{marker_name} = {mlabel}", fontsize=9)
        title = (f"reconstructions (rows: {line_name}" + (f", columns: {marker_name}" if marker_name else "") + ")"
                 + (f" — {' · '.join(g)}" if g else ""))
        lines = textwrap.wrap(title, width=int(width * 11))
        fig.suptitle("\n".join(lines), fontsize=10)
        # keep the suptitle clear of the column titles: reserve its lines at the top (inches / figure height)
        fig.tight_layout(rect=(0, 0, 1, 1 - (0.2 * len(lines) + 0.15) / fig.get_figheight()))
        path = sweep_dir / f"montage{suffix(g)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
