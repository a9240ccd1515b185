"""A sweep directory's report: ``table.md`` and ``table.csv`` (seed 001's layout) with the figures, from files."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from fl_sim.sweep.figures import frontier_figure, sweep_figures
from fl_sim.sweep.table import (
    BELOW_CHANCE,
    _cell_text,
    _sweep_settings,
    frontier,
    load_sweep_cells,
    sweep_table,
    unscored_images,
)


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
    axis but the last, e.g. the dataset). Unfinished cells are left out (their number is stated). With attacks on
    both targets (``attack-target``) the PSNR and SSIM rows come once per target. When some defense ran at several
    strengths (a frontier sweep), also ``frontier.md``, ``frontier.csv`` and ``frontier.png``
    (:func:`write_frontier`).

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
        for row, _ in table["rows"]:
            chance = panel["rows"].get(f"{row} chance", [None] * len(baseline_col))
            lines.append(f"| {row} | " + " | ".join(
                _cell_text(row, s, b, c) for s, b, c in zip(panel["rows"][row], baseline_col, chance)) + " |")
        if any(ok < run for ok, run in panel["attacks"]):
            lines.append("| attacks succeeded | " + " | ".join(f"{ok} of {run}" for ok, run in panel["attacks"])
                         + " |")
        for t, counts in panel["at_chance"].items():
            if any(n for _, n in counts):
                lines.append(f"| {'at chance' if t == 'all' else 'at chance ' + t} | "
                             + " | ".join(f"{k} of {n}" if n else "–" for k, n in counts) + " |")
        lines.append("")
    lines += ["Rows: " + "; ".join(f"**{r}** {what}" for r, what in table["rows"]) + f". {BELOW_CHANCE} marks a "
              "PSNR or SSIM at or below its chance level (nothing recovered only where both are). **at chance**: "
              "how many of the entry's scored attacks (all seeds and attacked rounds) scored at or below their own "
              "chance level in both PSNR and SSIM — a mean at chance can hide an attack that recovered the image. "
              "Means are over the attacks that succeeded; table.csv counts them (rows attacks succeeded, attacks, "
              "attacks at chance, attacks scored), and a row here shows them when some failed."]
    backends = sorted({str(c["cfg"].get("sim-backend", "ray")) for c in cells})
    if base:
        lines.append(f"ART's baseline: the cells with {base[0]} = {base[1]} (\"ref\"); round 1 (worker start-up) "
                     "is left out of the round times. Round times measured while other work shares the machine "
                     f"are indicative only; they come from sim-backend = {' and '.join(backends)}"
                     + (" (mixed: the cells' ART are not comparable)" if len(backends) > 1 else "")
                     + " — a shorter round (inprocess) makes a defense's fixed cost a larger share.")
    else:
        lines.append("ART: no baseline (sweep.baseline, default defense = none) in this sweep.")
    front = write_frontier(sweep_dir, cells, settings)
    if front is not None:
        lines += ["", f"Each defense's strength was swept: the frontier (figure and the strength at which the attack "
                      f"falls to the chance level) is in [{front.name}]({front.name})."]
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    path = sweep_dir / "table.md"
    path.write_text("\n".join(lines))

    with open(sweep_dir / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*table["panel_axes"], "metric", *["/".join(k) for k in table["column_keys"]]])
        for panel in table["panels"]:
            for which, pos in (("", 0), (" std", 1)):
                for row, _ in table["rows"]:
                    w.writerow([*panel["key"], row + which, *[
                        "" if s[pos] is None else f"{s[pos]:.6g}" for s in panel["rows"][row]]])
            w.writerow([*panel["key"], "n", *[s[2] for s in panel["rows"][table["rows"][0][0]]]])
            w.writerow([*panel["key"], "attacks succeeded", *[ok for ok, _ in panel["attacks"]]])
            w.writerow([*panel["key"], "attacks", *[run for _, run in panel["attacks"]]])
            for t, counts in panel["at_chance"].items():
                suffix = "" if t == "all" else f" {t}"
                w.writerow([*panel["key"], f"attacks at chance{suffix}", *[k for k, _ in counts]])
                w.writerow([*panel["key"], f"attacks scored{suffix}", *[n for _, n in counts]])
    return path


def _num(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def _stat_text(stat: tuple[float | None, float | None, int], spec: str = ".2f") -> str:
    mean, std, _ = stat
    return "–" if mean is None else _num(mean, spec) + ("" if std is None else f" ± {std:{spec}}")


def write_frontier(sweep_dir: Path, cells: list[dict[str, Any]], settings: dict[str, Any]) -> Path | None:
    """Write ``frontier.md``, ``frontier.csv`` and ``frontier.png`` (:func:`fl_sim.sweep.table.frontier`) when some
    defense ran at more than one strength; return ``frontier.md``'s path, or ``None`` (nothing written).

    ``frontier.md``: the figure, then per panel (e.g. the attack) one row per series — the defense, the swept key,
    its values, and for each target that was attacked the first (weakest) value at which every attack is at or below
    its chance level in PSNR and SSIM (``reached``), the PSNR / SSIM and their chance levels there, the accuracy there
    and its cost against ``none`` (points), and the first value by the lenient mean-PSNR criterion
    (``reached_mean``) — then every point with its count of attacks above chance. A target none of whose attacks was
    scored (a converged update holds more images than an attack reconstructs) gets one line saying so instead.
    ``frontier.csv``: one row per point with the same numbers.
    """
    front = frontier(cells, settings)
    if not any(p["series"] for p in front["panels"]):
        return None
    figure = frontier_figure(front, sweep_dir / "frontier.png")
    targets = front["targets"]
    points = [p for panel in front["panels"] for s in panel["series"] for p in s["points"]]
    scored = [t for t in targets if any(p["attacks"][t] for p in points)]
    lines = [f"# Frontier of sweep `{sweep_dir.name}`", "",
             "Each defense's strength swept, listed from the weakest setting to the strongest. PSNR and SSIM are the "
             "mean over a cell's attacks on a target, then mean ± sample std over the averaged axes; *chance* is the "
             "mean score of the training mean image against the same true images (`psnr_chance`, `ssim_chance` in "
             "the attack records). **At chance from**: the weakest strength at which *every* attack on the target "
             "(all seeds, all attacked rounds) scores at or below its own chance level in both PSNR and SSIM — the "
             "attack recovered nothing a constant image would not. *Mean PSNR at chance from* is the lenient "
             "criterion (the mean PSNR at or below the mean chance PSNR); a round that leaks can hide in that mean. "
             "The `probe` target is an audit of the worst case a client sending one image's gradient would face.",
             ""]
    if figure is not None:
        lines += [f"![frontier]({figure.name})", ""]
    for t in targets:
        if t not in scored:
            lines += [(f"**{t}**: {not_attacked(points, t) or 'no attack on it was scored'}; an attack is scored "
                       "only against as many images as it reconstructs."), ""]
    rows = []
    for panel in front["panels"]:
        if not panel["series"]:
            continue
        where = ", ".join(f"{a} = {k}" for a, k in zip(front["panel_axes"], panel["key"])) or "all cells"
        none = panel["none"]
        ref = f"none: ACC {_stat_text(none['acc'])}%" + "".join(
            f", PSNR {t} {_stat_text(none['psnr'][t])} dB (chance {_num(none['chance'][t])}), SSIM {t} "
            f"{_stat_text(none['ssim'][t], '.3f')} (chance {_num(none['ssim_chance'][t], '.3f')})"
            for t in scored) if none else "no `none` cell"
        lines += [f"## {where}", "", ref + ".", ""]
        head = ["defense", "key", "values"]
        for t in scored:
            head += [f"{t}: at chance from", f"{t}: PSNR / chance (dB)", f"{t}: SSIM / chance", f"{t}: ACC there (%)",
                     f"{t}: cost (points)", f"{t}: mean PSNR at chance from"]
        lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for s in panel["series"]:
            cells_row = [s["defense"], f"`{s['key']}`", ", ".join(_value(p["value"]) for p in s["points"])]
            for t in scored:
                hit, last = s["reached"][t], s["points"][-1]
                if hit is None:
                    why = ("no chance level recorded" if last["above"][t] is None else
                           f"not reached (strongest: {last['above'][t]} of {last['attacks'][t]} attacks above)")
                    cells_row += [why, "–", "–", "–", "–"]
                else:
                    cells_row += [_value(hit["value"]), f"{_num(hit['psnr'])} / {_num(hit['chance'])}",
                                  f"{_num(hit['ssim'], '.3f')} / {_num(hit['ssim_chance'], '.3f')}",
                                  _num(hit["acc"]), _num(hit["cost"])]
                lenient = s["reached_mean"][t]
                cells_row.append("not reached" if lenient is None else
                                 f"{_value(lenient['value'])} (cost {_num(lenient['cost'])})")
            lines.append("| " + " | ".join(cells_row) + " |")
        lines += ["", "| defense | key | value | ACC (%) | " + " | ".join(
            f"PSNR {t} (dB) | chance | SSIM {t} | chance | {t} attacks above chance" for t in scored) + " |",
            "|---" * (4 + 5 * len(scored)) + "|"]
        for s in panel["series"]:
            for p in s["points"]:
                lines.append(f"| {s['defense']} | `{s['key']}` | {_value(p['value'])} | {_stat_text(p['acc'])} | "
                             + " | ".join(f"{_stat_text(p['psnr'][t])} | {_num(p['chance'][t])} | "
                                          f"{_stat_text(p['ssim'][t], '.3f')} | {_num(p['ssim_chance'][t], '.3f')} | "
                                          + ("–" if p["above"][t] is None else f"{p['above'][t]} of {p['attacks'][t]}")
                                          for t in scored) + " |")
                rows.append([*panel["key"], s["defense"], s["key"], _value(p["value"]), *p["acc"],
                             *[x for t in targets for x in (*p["psnr"][t], p["chance"][t], p["ssim"][t][0],
                                                             p["ssim_chance"][t], p["attacks"][t], p["above"][t])]])
        lines.append("")
    path = sweep_dir / "frontier.md"
    path.write_text("\n".join(lines))
    with open(sweep_dir / "frontier.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*front["panel_axes"], "defense", "key", "value", "acc", "acc std", "n",
                    *[c for t in targets for c in (f"psnr {t}", f"psnr {t} std", f"n {t}", f"chance {t}",
                                                   f"ssim {t}", f"ssim chance {t}", f"attacks {t}",
                                                   f"above chance {t}")]])
        for r in rows:
            w.writerow(["" if x is None else (f"{x:.6g}" if isinstance(x, float) else x) for x in r])
    return path


def not_attacked(points: list[dict[str, Any]], target: str) -> str | None:
    """``"not attacked (the update holds N images)"`` when every attack on ``target`` at these frontier points
    was recorded unscored (:func:`fl_sim.sweep.table.frontier`'s ``unscored``) and none was scored, else ``None``."""
    if any(p["psnr"][target][0] is not None for p in points) or not any(
            p.get("unscored", {}).get(target, {}).get("attacks") for p in points):
        return None
    held = unscored_images(points, target)
    return f"not attacked (the {target} holds {held:,} images)" if held is not None else "not attacked"


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
