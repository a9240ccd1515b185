"""A sweep directory's report: ``table.md`` and ``table.csv`` (seed 001's layout) with the figures, from files."""

from __future__ import annotations

import csv
from pathlib import Path

from fl_sim.sweep.figures import sweep_figures
from fl_sim.sweep.table import (BELOW_CHANCE, SWEEP_ROWS, _cell_text, _sweep_settings, load_sweep_cells,
                                sweep_table)


def is_sweep_dir(path: str | Path) -> bool:
    """True when ``path`` looks like an ``fl-sim sweep`` directory (``sweep.json`` or a ``cells/`` folder)."""
    path = Path(path)
    return (path / "sweep.json").is_file() or (path / "cells").is_dir()


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """(Re)write a sweep directory's ``table.md``, ``table.csv`` and figures from its cells' run directories.

    Files: ``table.md`` (per panel, seed 001's layout with a chance row under PSNR and SSIM, entries at or below
    chance marked, with the figures linked), ``table.csv`` (the same numbers: rows PSNR, PSNR chance, SSIM,
    SSIM chance, ACC, ART as means, then their sample std, the count n of cells, and the attacks that succeeded and
    ran; ACC and ART in %), and
    ``accuracy[-GROUP].png``, ``privacy-utility.png``, ``montage[-GROUP].png`` (GROUP: the labels of every column
    axis but the last, e.g. the dataset). Unfinished cells are left out (their number is stated).

    Returns:
        The path of ``table.md``.
    """
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
            chance = panel["rows"].get(f"{row} chance", [None] * len(baseline_col))
            lines.append(f"| {row} | " + " | ".join(
                _cell_text(row, s, b, c) for s, b, c in zip(panel["rows"][row], baseline_col, chance)) + " |")
        if any(ok < run for ok, run in panel["attacks"]):
            lines.append("| attacks succeeded | " + " | ".join(f"{ok} of {run}" for ok, run in panel["attacks"])
                         + " |")
        lines.append("")
    lines += ["Rows: " + "; ".join(f"**{r}** {what}" for r, what in SWEEP_ROWS) + f". {BELOW_CHANCE} marks a PSNR "
              "or SSIM at or below its chance level: nothing recovered. Means are over the attacks that succeeded; "
              "table.csv counts them (rows attacks succeeded, attacks), and a row here shows them when some failed."]
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
            w.writerow([*panel["key"], "attacks succeeded", *[ok for ok, _ in panel["attacks"]]])
            w.writerow([*panel["key"], "attacks", *[run for _, run in panel["attacks"]]])
    return path
