"""The run directory: what a run writes, round by round, so nothing is lost when it stops early.

Layout::

    RUN_DIR/
      config.toml        the resolved run config (every key)
      metrics.jsonl      one JSON object per round (appended and flushed as each round ends)
      attacks/round_NNNN.png   truth (top row) above reconstruction (bottom row), per attacked round
                         (``round_NNNN-probe.png`` for the probe target's attack)
      accuracy.png       test accuracy (and attack PSNR) against round
      report.md          a human-readable summary linking the figures
      summary.json       final_accuracy (0–1), rounds, wall_time_s, attacks [...], and more
      checkpoint.pkl     the server state after the last completed round (``fl-sim run --resume``)

A ``metrics.jsonl`` line holds ``round``, ``lr``, ``accuracy``, ``loss`` (central test set; ``null`` when not
evaluated that round), ``round_time_s`` (client phase + aggregation, attacks and evaluation excluded),
``clients`` (per client: ``partition_id``, ``num_examples``, ``train_loss``, ``train_time_s``, ``defense_time_s``),
``failures`` (replies dropped, per client: ``node``, ``partition_id``, ``reason`` — error replies, malformed
updates, no reply within ``round-timeout``, dropouts), ``skipped`` (only when fewer than ``min-replies`` replies were
usable: why the global model was kept) and ``attacks`` (per attack: ``round``, ``client``, ``attack``, ``target`` — ``update``, the intercepted update, or
``probe``, the one-image audit of ``attack-target`` —, ``psnr``, ``ssim``, ``mse``, ``label_accuracy``, ``time_s``,
``iterations``, ``image``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_run_name(cfg: Mapping[str, Any]) -> str:
    """``YYYYmmdd-HHMMSS-<dataset>-<model>-<defense>-<attack>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{cfg['dataset']}-{cfg['model']}-{cfg['defense']}-{cfg['attack']}"


def run_dir_for(cfg: Mapping[str, Any]) -> Path:
    """The run directory a config names: ``out-dir / run-name`` (absolute)."""
    name = str(cfg["run-name"]) or default_run_name(cfg)
    return (Path(str(cfg["out-dir"])).expanduser() / name).resolve()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rounds recorded in ``run_dir/metrics.jsonl`` (a torn last line, from a crash, is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def finite(x: Any) -> Any:
    """JSON-safe value: NaN/inf floats become ``None``; numpy scalars become Python scalars."""
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


class RunRecorder:
    """Writes one run directory (see the module docstring).

    Args:
        run_dir: the directory; created if missing.
        cfg: the resolved config, written to ``config.toml`` at once.
    """

    def __init__(self, run_dir: Path, cfg: Mapping[str, Any]):
        import tomli_w

        self.run_dir = Path(run_dir)
        (self.run_dir / "attacks").mkdir(parents=True, exist_ok=True)
        self.cfg = dict(cfg)
        atomic_write_text(self.run_dir / "config.toml", tomli_w.dumps(self.cfg))
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's record to ``metrics.jsonl`` and flush it to disk."""
        self._metrics.write(json.dumps(finite(dict(record))) + "\n")
        self._metrics.flush()
        os.fsync(self._metrics.fileno())

    def save_attack_figure(self, server_round: int, truth: np.ndarray, reconstruction: np.ndarray,
                           title: str, labels: list[int] | None = None, true_labels: list[int] | None = None,
                           suffix: str = "") -> str:
        """Save truth (top) above reconstruction (bottom) as ``attacks/round_NNNN{suffix}.png``; return the relative
        path (``suffix="-probe"`` for the ``probe`` target's attack).

        Args:
            truth, reconstruction: ``float (B, C, H, W)`` in [0, 1], already matched pairwise.
        """
        rel = f"attacks/round_{server_round:04d}{suffix}.png"
        save_pair_figure(self.run_dir / rel, truth, reconstruction, title, labels, true_labels)
        return rel

    def close(self) -> None:
        """Close ``metrics.jsonl``."""
        if not self._metrics.closed:
            self._metrics.close()


def save_pair_figure(path: Path, truth: np.ndarray, reconstruction: np.ndarray, title: str,
                     labels: list[int] | None = None, true_labels: list[int] | None = None, max_cols: int = 8) -> None:
    """A two-row PNG: true images on top, their matched reconstructions below (at most ``max_cols`` pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(truth), len(reconstruction), max_cols)
    import textwrap

    fig, axes = plt.subplots(2, n, figsize=(max(3.4, 1.6 * n + 0.4), 3.9), squeeze=False)
    for j in range(n):
        for row, (imgs, lab, name) in enumerate(((truth, true_labels, "truth"), (reconstruction, labels, "recon."))):
            img = np.clip(imgs[j], 0, 1)
            ax = axes[row][j]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.transpose(1, 2, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            if lab is not None:
                ax.set_title(f"{name} y={lab[j]}", fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(title, width=max(40, 22 * n))), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def privacy_block(records: list[dict[str, Any]], cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """``summary.json``'s ``privacy`` block: per client, the DP figures of its last reply, or ``None`` when no
    reply carried any.

    A DP defense's ``dp-*`` metrics reach the round records as ``dp_*`` client fields; per client (partition id)
    the block keeps the last round's values without the prefix — ``epsilon`` (spent, at ``delta``), and as the
    defense reports them ``delta``, ``sigma`` (noise multiplier), ``q`` (sampling rate), ``steps`` / ``releases``,
    ``epsilon_claimed`` — plus that ``round``. Block level: the ``defense``, its ``accountant`` and ``delta`` keys
    and ``max_epsilon`` over the clients (-1, in it or in a client's ``epsilon``, means unbounded).
    """
    clients: dict[str, dict[str, Any]] = {}
    for r in records:
        for c in r.get("clients", []):
            dp = {k[3:]: v for k, v in c.items() if k.startswith("dp_")}
            if dp:
                clients[str(c.get("partition_id"))] = {**dp, "round": r.get("round")}
    if not clients:
        return None
    eps = [c["epsilon"] for c in clients.values() if isinstance(c.get("epsilon"), (int, float))]
    return {"defense": cfg.get("defense"), "accountant": cfg.get("defense-dp-accountant"),
            "delta": cfg.get("defense-dp-delta"),
            "max_epsilon": (-1.0 if any(e < 0 for e in eps) else max(eps)) if eps else None,
            "clients": dict(sorted(clients.items(), key=lambda kv: (len(kv[0]), kv[0])))}


def summarize(records: list[dict[str, Any]], cfg: Mapping[str, Any], wall_time_s: float | None,
              status: str) -> dict[str, Any]:
    """Build ``summary.json``'s content from the per-round records.

    Fields: ``status`` (``completed``/``interrupted``/``failed``), ``rounds`` (rounds recorded), ``final_accuracy``
    and ``final_loss`` (last evaluated round), ``best_accuracy``, ``wall_time_s``, ``mean_round_time_s`` (ART's
    numerator), ``mean_train_time_s``, ``mean_defense_time_s``, ``attacks`` (every attack record),
    ``attack_means`` (mean psnr/ssim/mse/label_accuracy/time_s over attacks), the key settings, for a DP
    defense ``privacy`` (:func:`privacy_block`) and, when some attack has another target than ``update``,
    ``attack_means_by_target`` (:func:`attack_means_by_target`).
    """
    evaluated = [r for r in records if r.get("accuracy") is not None]
    attacks = [a for r in records for a in r.get("attacks", [])]
    clients = [c for r in records for c in r.get("clients", [])]

    def mean(xs: list[float]) -> float | None:
        xs = [x for x in xs if x is not None]
        return float(np.mean(xs)) if xs else None

    summary = {
        "status": status,
        "rounds": len(records),
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "final_loss": evaluated[-1]["loss"] if evaluated else None,
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "wall_time_s": wall_time_s,
        "mean_round_time_s": mean([r.get("round_time_s") for r in records]),
        "mean_train_time_s": mean([c.get("train_time_s") for c in clients]),
        "mean_defense_time_s": mean([c.get("defense_time_s") for c in clients]),
        "attacks": attacks,
        "attack_means": {k: mean([a.get(k) for a in attacks]) for k in
                         ("psnr", "ssim", "mse", "label_accuracy", "time_s")} if attacks else {},
        "settings": {k: cfg[k] for k in ("dataset", "model", "mode", "batch-size", "lr", "num-supernodes",
                                         "num-server-rounds", "defense", "attack", "seed") if k in cfg},
    }
    privacy = privacy_block(records, cfg)
    if privacy is not None:
        summary["privacy"] = privacy
    by_target = attack_means_by_target(attacks)
    if set(by_target) - {"update"}:
        summary["attack_means_by_target"] = by_target
    return finite(summary)


def attack_target(attack: Mapping[str, Any]) -> str:
    """An attack record's ``target`` (records written before targets existed attacked the update)."""
    return str(attack.get("target") or "update")


def attack_means_by_target(attacks: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per target (``update``, ``probe``, in that order), the mean psnr/ssim/mse/label_accuracy/time_s over its
    attacks (errors and unscored attacks left out of each mean) — ``summary.json``'s ``attack_means_by_target``."""
    out: dict[str, dict[str, float | None]] = {}
    for target in sorted({attack_target(a) for a in attacks}, key=lambda t: (t != "update", t)):
        mine = [a for a in attacks if attack_target(a) == target]
        out[target] = {}
        for k in ("psnr", "ssim", "mse", "label_accuracy", "time_s"):
            xs = [a[k] for a in mine if isinstance(a.get(k), (int, float))]
            out[target][k] = float(np.mean(xs)) if xs else None
    return out


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """Write ``summary.json`` atomically."""
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(finite(dict(summary)), indent=2))
