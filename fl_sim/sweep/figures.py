"""A sweep's figures: accuracy curves, the privacy–utility scatter and the reconstruction montage."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from fl_sim.sweep.table import (
    cell_targets,
    label_of,
    order,
    target_means,
    unscored_images,
)


def _crop_white(img: Any, pad: int = 4) -> Any:
    """An RGB(A) float image without its near-white margins (keeps ``pad`` pixels)."""
    ink = (img[..., :3] < 0.97).any(axis=-1)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not len(rows):
        return img
    return img[max(0, rows[0] - pad):rows[-1] + pad + 1, max(0, cols[0] - pad):cols[-1] + pad + 1]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]", "-", text) or "all"


def sweep_figures(cells: list[dict[str, Any]], settings: dict[str, Any], sweep_dir: Path) -> list[Path]:
    """Draw the sweep figures (see :func:`write_sweep_report`); return their paths.

    * ``accuracy[-GROUP].png``: test accuracy against round, one line per label of the last column axis (the
      defense): the mean over its cells (seeds, attacks), shaded between their min and max.
    * ``privacy-utility.png``: one point per cell, final accuracy (%) against mean attack PSNR (dB); colour = last
      column axis, marker = first panel axis (the attack); one subplot per GROUP; a dashed line at the cells' mean
      chance PSNR (the training mean image: below it nothing was recovered). With attacks on both targets
      (``attack-target``), one point per cell and target: filled = the update, hollow = the probe.
    * ``montage[-GROUP].png``: rows = labels of the last column axis, columns = labels of the first panel axis;
      each panel is the first attacked round's figure (truth above reconstruction) of the cell with the smallest
      averaged-axis labels (the first seed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    columns = list(settings["columns"])
    names = [a["name"] for a in settings["axes"]]
    average = [a for a in settings["average"] if a in names]
    panel_axes = [a for a in names if a not in columns and a not in average]
    group_names, line_name = columns[:-1], columns[-1]
    groups = order(cells, group_names, settings) if cells else [()]
    lines_order = order(cells, [line_name], settings)
    marker_name = panel_axes[0] if panel_axes else None
    markers_order = order(cells, [marker_name], settings) if marker_name else [("",)]
    colours = {k[0]: plt.cm.tab10(i % 10) for i, k in enumerate(lines_order)}
    shapes = {k[0]: "osD^vP*X"[i % 8] for i, k in enumerate(markers_order)}
    paths: list[Path] = []

    def in_group(c: dict[str, Any], g: tuple[str, ...]) -> bool:
        return tuple(label_of(c, n) for n in group_names) == g

    def suffix(g: tuple[str, ...]) -> str:
        return ("-" + _safe("-".join(g))) if g else ""

    for g in groups:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for (label,) in lines_order:
            series: dict[int, list[float]] = {}
            for c in cells:
                if in_group(c, g) and label_of(c, line_name) == label:
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

    targets = cell_targets(cells)
    by_target = len(targets) > 1 or targets == ["probe"]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        chance = []
        for c in cells:
            acc = c["summary"].get("final_accuracy")
            if not in_group(c, g) or acc is None:
                continue
            summary = c["summary"]
            points = ([(t, target_means(summary, t)) for t in targets] if by_target else
                      [("update", summary.get("attack_means") or {})])
            for target, means in points:
                psnr = means.get("psnr")
                if psnr is None:
                    continue
                if means.get("psnr_chance") is not None:
                    chance.append(means["psnr_chance"])
                colour = colours[label_of(c, line_name)]
                ax.scatter(acc * 100, psnr, color=colour if target == "update" else "none", edgecolor=(
                    "black" if target == "update" else colour), linewidth=0.4 if target == "update" else 1.2,
                    marker=shapes[label_of(c, marker_name)] if marker_name else "o", s=36)
        if chance:  # below this line an attack recovered nothing (the training mean image scores as well)
            ax.axhline(float(np.mean(chance)), color="grey", linestyle="--", linewidth=0.8)
            ax.text(0.01, float(np.mean(chance)), " chance (mean image)", transform=ax.get_yaxis_transform(),
                    va="bottom", ha="left", fontsize=7, color="grey")
        ax.set_xlabel("final test accuracy (%)  → more useful")
        ax.set_ylabel("mean attack PSNR (dB)  → less private")
        ax.set_title(" · ".join(g) or "privacy–utility", fontsize=9)
    handles = [plt.Line2D([], [], color=colours[k], marker="o", linestyle="", label=k) for (k,) in lines_order]
    if marker_name:
        handles += [plt.Line2D([], [], color="grey", marker=shapes[k], linestyle="", label=f"{marker_name}={k}")
                    for (k,) in markers_order]
    if by_target:
        handles += [plt.Line2D([], [], color="grey", marker="o", linestyle="", label="target: update"),
                    plt.Line2D([], [], markerfacecolor="none", markeredgecolor="grey", marker="o", linestyle="",
                               label="target: probe (one image)")]
    if handles:
        axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle("privacy–utility: one point per cell" + (" and target" if by_target else ""), fontsize=10)
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
                pick = [c for c in cells if in_group(c, g) and label_of(c, line_name) == label and
                        (marker_name is None or label_of(c, marker_name) == mlabel) and
                        all(c["index"].get(a, 0) == 0 for a in panel_axes[1:])]
                pick.sort(key=lambda c: [c["index"].get(a, 0) for a in average])
                attack = next((a for c in pick for a in c["summary"].get("attacks", []) if a.get("image") and
                               (c["dir"] / a["image"]).is_file()), None)
                cell = next((c for c in pick if attack in c["summary"].get("attacks", [])), None)
                if attack is None or cell is None:
                    ax.text(0.5, 0.5, "–", ha="center", va="center")
                else:
                    ax.imshow(_crop_white(mpimg.imread(cell["dir"] / attack["image"])))
                    chance = attack.get("psnr_chance")
                    ax.text(0.5, -0.02, f"PSNR {attack.get('psnr', float('nan')):.1f} dB"
                            + (f" (chance {chance:.1f})" if chance is not None else "") + f", round {attack['round']}",
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


def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def frontier_figure(front: dict[str, Any], path: Path) -> Path | None:
    """Draw each defense's privacy–utility frontier (:func:`fl_sim.sweep.table.frontier`) to ``path``.

    One row of panels per panel key (e.g. the attack), one column per target (``update``, ``probe``): final test
    accuracy (%) against the mean attack PSNR (dB), one line per series (a defense with one key swept, its points in
    strength order, each labelled with the key's value; filled where every attack there is at or below its chance
    level in PSNR and SSIM, hollow otherwise), ``none`` as a black star, and the mean chance PSNR of the
    panel's attacks (``psnr_chance``: the training mean image's score; at or below it nothing was recovered) as a
    dashed line. Returns ``None`` (and draws nothing) when there is no series.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in front["panels"] if p["series"]]
    if not panels:
        return None
    targets = front["targets"]
    fig, axes = plt.subplots(len(panels), len(targets), figsize=(6.0 * len(targets), 4.6 * len(panels)),
                             squeeze=False)
    names = sorted({f"{s['defense']}: {s['key']}" for p in panels for s in p["series"]})
    colours = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    for row, panel in zip(axes, panels):
        for ax, t in zip(row, targets):
            chance = [pt["chance"][t] for s in panel["series"] for pt in s["points"] if pt["chance"][t] is not None]
            for s in panel["series"]:
                pts = [pt for pt in s["points"] if pt["acc"][0] is not None and pt["psnr"][t][0] is not None]
                if not pts:
                    continue
                name = f"{s['defense']}: {s['key']}"
                xs, ys = [pt["acc"][0] for pt in pts], [pt["psnr"][t][0] for pt in pts]
                ax.plot(xs, ys, marker="o", markersize=4, color=colours[name], label=name, linewidth=1.2,
                        markerfacecolor="white")
                done = [(x, y) for x, y, pt in zip(xs, ys, pts) if pt.get("above", {}).get(t) == 0]
                if done:  # filled: every attack at this point at or below its chance level (PSNR and SSIM)
                    ax.scatter(*zip(*done), s=16, color=colours[name], zorder=4)
                for x, y, pt in zip(xs, ys, pts):
                    ax.annotate(_value_text(pt["value"]), (x, y), textcoords="offset points", xytext=(3, 3),
                                fontsize=6, color=colours[name])
            none = panel["none"]
            if none and none["acc"][0] is not None and none["psnr"][t][0] is not None:
                ax.scatter([none["acc"][0]], [none["psnr"][t][0]], marker="*", s=110, color="black", zorder=5,
                           label="none")
            every = [pt for s in panel["series"] for pt in s["points"]]
            if not any(pt["psnr"][t][0] is not None for pt in every):
                held = unscored_images(every, t)
                ax.text(0.5, 0.5, f"not attacked: the {t} holds {held:,} images,\nmore than an attack "
                        "reconstructs (scored one-to-one only)" if held else f"no attack on the {t} was scored",
                        transform=ax.transAxes, ha="center", va="center", fontsize=9, color="grey")
            if chance:
                level = float(np.mean(chance))
                ax.axhline(level, color="grey", linestyle="--", linewidth=0.9)
                ax.text(0.01, level, " chance (training mean image)", transform=ax.get_yaxis_transform(),
                        va="bottom", ha="left", fontsize=7, color="grey")
            ax.set_xlabel("final test accuracy (%)  → more useful")
            ax.set_ylabel(f"mean attack PSNR on the {t} (dB)  → less private")
            where = ", ".join(f"{a} = {k}" for a, k in zip(front["panel_axes"], panel["key"]))
            ax.set_title(f"target: {t}" + (" (one image, B = 1: worst-case audit)" if t == "probe" else "")
                         + (f" — {where}" if where else ""), fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("privacy–utility frontier: each defense's strength swept (filled: every attack at or below "
                 "chance in PSNR and SSIM)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
