"""A run directory's ``report.md`` and ``accuracy.png``, rebuilt from its files alone (a sweep's table and figures
are :mod:`fl_sim.sweep.table`)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from fl_sim.results import attack_means, attack_means_by_target, attack_target, read_metrics
from strategies.metrics import chance_note


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


#: Appended to a PSNR or SSIM at or below its chance level.
BELOW_MARK = "▼"


def below_mark(value: float | None, chance: float | None) -> str:
    """``" ▼"`` when ``value`` is at or below its chance level (by this metric, nothing recovered), else ``""``."""
    return f" {BELOW_MARK}" if value is not None and chance is not None and value <= chance else ""


def privacy_sentence(means: dict[str, Any], failures: dict[str, int]) -> str:
    """One Markdown sentence with the attack means, their chance levels and how many attacks they are over."""
    n, m, scored = means.get("succeeded"), means.get("attacks"), means.get("scored")
    failed = f" ({', '.join(f'{v} × {k}' for k, v in sorted(failures.items()))})" if failures else ""
    if scored is not None and n is not None and scored < n:
        failed += f"; {scored} of them scored (see the table)"
    text = (f"Mean over the **{n} of {m} attacks that succeeded**{failed}: PSNR **{_fmt(means.get('psnr'))} dB**"
            f"{below_mark(means.get('psnr'), means.get('psnr_chance'))} (chance {_fmt(means.get('psnr_chance'))} dB), "
            f"SSIM {_fmt(means.get('ssim'), '.3f')}{below_mark(means.get('ssim'), means.get('ssim_chance'))} "
            f"(chance {_fmt(means.get('ssim_chance'), '.3f')}), MSE {_fmt(means.get('mse'), '.2e')} (chance "
            f"{_fmt(means.get('mse_chance'), '.2e')}), label accuracy {_fmt(means.get('label_accuracy'), '.2f')}, "
            f"{_fmt(means.get('time_s'), '.1f')} s per attack.")
    note = chance_note(means)
    if note:
        text += f" **Means: {note}.**"
    return text


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
        if "succeeded" not in means:  # a run still going (no summary yet), or a summary of an older fl-sim
            means = attack_means([a for a in attacks if attack_target(a) == "update"] or attacks)
        lines += [privacy_sentence(means, summary.get("attack_failures") or {}), ""]
        by_target = attack_means_by_target(attacks)
        if set(by_target) - {"update"}:
            lines += ["The mean above is over the `update` target's attacks. Per target (`update`: the intercepted "
                      "update; `probe`: the victim's defended gradient of one of its images, B = 1 — an audit of the "
                      "worst case a client sending one image would face, never used for training):", ""]
            lines += [f"* `{t}`: {privacy_sentence(m, {})}" for t, m in by_target.items()]
            lines.append("")
        lines += [
            "| round | client | attack | target | images | PSNR (dB) | PSNR chance | SSIM | SSIM chance | MSE | "
            "label acc. | time (s) | iterations | image |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for a in attacks:
            img = f"[png]({a['image']})" if a.get("image") else ""
            head = f"| {a.get('round')} | {a.get('client')} | {a.get('attack')} | {attack_target(a)} | "
            if "error" in a or a.get("unscored"):
                what = f"failed: {a['error']}" if "error" in a else f"not scored: {a['unscored']}"
                lines.append(f"{head}{a.get('num_images', '')} | {what.replace('|', '/')} | | | | | | "
                             f"{_fmt(a.get('time_s'), '.1f')} | {a.get('iterations', '')} | |")
                continue
            lines.append(
                f"{head}{a.get('num_images', '')} | "
                f"{_fmt(a.get('psnr'))}{below_mark(a.get('psnr'), a.get('psnr_chance'))} | "
                f"{_fmt(a.get('psnr_chance'))} | "
                f"{_fmt(a.get('ssim'), '.3f')}{below_mark(a.get('ssim'), a.get('ssim_chance'))} | "
                f"{_fmt(a.get('ssim_chance'), '.3f')} | {_fmt(a.get('mse'), '.2e')} | {_fmt(a.get('label_accuracy'))} | "
                f"{_fmt(a.get('time_s'), '.1f')} | {a.get('iterations', '')} | {img} |"
            )
        first = next((a for a in attacks if a.get("image")), None)
        if first:
            lines += ["", f"![round {first['round']}]({first['image']})"]
    else:
        lines.append("No attack ran.")
    lines += [
        "",
        "PSNR, SSIM and MSE are computed on de-normalised [0, 1] images after a Hungarian matching between the "
        "reconstruction and the images the update holds (always as many as the attack reconstructs). SSIM is "
        "Wang et al. (2004): 11×11 Gaussian window, σ = 1.5, population covariance (scikit-image with "
        "gaussian_weights=True, sigma=1.5, use_sample_covariance=False; torchmetrics' definition), not breaching's "
        "CW-SSIM. *Chance* is the same metric for the training split's mean image in place of the reconstruction: "
        f"a reconstruction that knows nothing about the client. {BELOW_MARK} marks a score at or below its chance "
        "level; a reconstruction recovered nothing only when both its PSNR and its SSIM are.",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
