"""A run directory's ``report.md`` and ``accuracy.png``, rebuilt from its files alone (a sweep's table and figures
are :mod:`fl_sim.sweep.table`)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from fl_sim.results import attack_means_by_target, attack_target, read_metrics


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
        for target, colour, marker in (("update", "tab:red", "o"), ("probe", "tab:orange", "^")):
            mine = [a for a in attacks if attack_target(a) == target]
            if mine:
                ax2.scatter([a["round"] for a in mine], [a["psnr"] for a in mine], color=colour, s=14, marker=marker,
                            label=f"attack PSNR ({target})")
        ax2.set_ylabel("attack PSNR (dB)", color="tab:red")
        if any(attack_target(a) != "update" for a in attacks):
            ax2.legend(fontsize=7, loc="lower right")
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
              "num-server-rounds", "defense", "attack", "attack-every", "victim", "attack-target", "seed"):
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
        ]
        by_target = attack_means_by_target(attacks)
        if set(by_target) - {"update"}:
            lines += ["Per target (`update`: the intercepted update; `probe`: the victim's defended gradient of one "
                      "of its images, B = 1 — an audit of the worst case a client sending one image would face, "
                      "never used for training):", ""]
            lines += [f"* `{t}`: {sum(attack_target(a) == t for a in attacks)} attacks, PSNR **{_fmt(m['psnr'])} "
                      f"dB**, SSIM {_fmt(m['ssim'], '.3f')}, label accuracy {_fmt(m['label_accuracy'], '.2f')}"
                      for t, m in by_target.items()]
            lines.append("")
        lines += [
            "| round | client | attack | target | PSNR (dB) | SSIM | MSE | label acc. | time (s) | iterations | image |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for a in attacks:
            img = f"[png]({a['image']})" if a.get("image") else (a.get("error") or "").replace("|", "/")
            lines.append(
                f"| {a.get('round')} | {a.get('client')} | {a.get('attack')} | {attack_target(a)} | "
                f"{_fmt(a.get('psnr'))} | "
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
