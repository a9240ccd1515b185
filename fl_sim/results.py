"""The run directory: what a run writes, round by round, so nothing is lost when it stops early.

Layout::

    RUN_DIR/
      config.toml        the resolved run config (every key)
      metrics.jsonl      one JSON object per round (appended and flushed as each round ends)
      attacks/round_NNNN.png   truth (top row) above reconstruction (bottom row), per attacked round
                         (``round_NNNN-probe.png`` for the probe target's attack)
      accuracy.png       test accuracy (and attack PSNR) against round
      report.md          a human-readable summary linking the figures
      summary.json       final_accuracy (0–1), rounds, wall_time_s, attacks [...], provenance {...}, and more
      checkpoint.pkl     the server state after the last completed round (``fl-sim run --resume``)
      events.out.tfevents.*    TensorBoard event files (scalars per round, attack images, attack objectives)
      reconstructions.npz      every attacked round's reconstruction, truth, labels and matching (one file per run)
      attacks/round_NNNN_update.pt   the server's view of the attacked update (``fl-sim export`` reads it)
      final_model.pt     the last global model, a state_dict for ``fl_sim.task.models.build_model(model, ...)``

A ``metrics.jsonl`` line holds ``round``, ``lr``, ``accuracy``, ``loss`` (central test set; ``null`` when not
evaluated that round), ``round_time_s`` (client phase + aggregation, attacks and evaluation excluded),
``clients`` (per client: ``partition_id``, ``num_examples``, ``train_loss``, ``train_time_s``, ``defense_time_s``),
``failures`` (replies dropped, per client: ``node``, ``partition_id``, ``reason`` — error replies, malformed
updates, no reply within ``round-timeout``, dropouts), ``skipped`` (only when fewer than ``min-replies`` replies were
usable: why the global model was kept) and ``attacks`` (per attack: ``round``, ``client``, ``attack``,
``target`` — ``update``, the intercepted update, or ``probe``, the one-image audit of ``attack-target`` —,
``num_images``, ``psnr``, ``ssim``, ``mse``, their chance levels ``psnr_chance``, ``ssim_chance``, ``mse_chance``,
``label_accuracy``, ``time_s``, ``iterations``, ``image``; a failed attack has ``error`` and ``error_type``
instead of scores).

TensorBoard (:class:`RunRecorder`; ``tensorboard --logdir runs``, or ``--logdir SWEEP_DIR/cells`` for a sweep, shows
runs side by side):
scalars ``test/accuracy``, ``test/loss`` (evaluated rounds), ``train/loss`` (mean over the round's clients), ``lr``,
``time/round_s``, ``time/attack_s``, ``privacy/epsilon`` (the largest ``dp_epsilon`` a client reported that round,
DP defenses only), and per attack ``attack/psnr``, ``attack/ssim``, ``attack/mse``, ``attack/label_accuracy``,
``attack/time_s`` and every chance level the record carries (``attack/psnr_chance``, ...), all at step = round;
the image ``attack/truth_above_reconstruction`` (step = round); and ``attack/objective/round_NNNN``, the attack's
objective against its iteration as ``Budget.progress`` reported it (counted on across restarts).

``reconstructions.npz`` (one file for the whole run, rewritten atomically after each attacked round) holds, for
each attacked round ``R`` with an audit record, ``round_RRRR_reconstruction`` ``float32 (B, C, H, W)`` in [0, 1]
(the attack's order), ``round_RRRR_truth`` ``float32 (N, C, H, W)`` in [0, 1] (the client's order of use),
``round_RRRR_labels`` ``int64 (B,)`` (recovered), ``round_RRRR_true_labels`` ``int64 (N,)``, ``round_RRRR_match``
``int64 (K, 2)`` (the (reconstruction, truth) index pairs that were scored: the Hungarian matching on MSE) and
``round_RRRR_sample_indices`` ``int64 (N,)`` (indices into the dataset's training split); ``rounds`` lists them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacker import AttackPayload, DefenseInfo
from fl_sim.task.config import device_label, resolve_device
from fl_sim.task.contract import TrainConfig


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


#: Files of a run directory written by :class:`RunRecorder` besides ``metrics.jsonl`` and the figures.
RECONSTRUCTIONS = "reconstructions.npz"
FINAL_MODEL = "final_model.pt"
#: Format tag of the intercepted-update files (``attacks/round_NNNN_update.pt``).
INTERCEPTED_FORMAT = "fl-sim-intercepted/1"


def intercepted_path(run_dir: Path, server_round: int, target: str = "update") -> Path:
    """``RUN_DIR/attacks/round_NNNN_update.pt``: the server's view of round ``server_round``'s attacked update
    (``round_NNNN_probe.pt`` for the probe reply of ``attack-target=probe|both``)."""
    return Path(run_dir) / "attacks" / f"round_{server_round:04d}_{target}.pt"


class RunRecorder:
    """Writes one run directory (see the module docstring): ``metrics.jsonl``, the figures, the TensorBoard event
    files, ``reconstructions.npz``, the intercepted updates and ``final_model.pt``.

    Args:
        run_dir: the directory; created if missing.
        cfg: the resolved config, written to ``config.toml`` at once.
        resume_after: a resumed run's last checkpointed round: TensorBoard drops what an earlier process wrote for
            later rounds (``purge_step``), and ``reconstructions.npz`` keeps only rounds up to it.
        tensorboard: write TensorBoard event files (the ``tensorboard`` package).
    """

    def __init__(self, run_dir: Path, cfg: Mapping[str, Any], resume_after: int = 0, tensorboard: bool = True):
        import tomli_w

        self.run_dir = Path(run_dir)
        (self.run_dir / "attacks").mkdir(parents=True, exist_ok=True)
        self.cfg = dict(cfg)
        atomic_write_text(self.run_dir / "config.toml", tomli_w.dumps(self.cfg))
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._arrays: dict[str, np.ndarray] = {}
        if resume_after and (self.run_dir / RECONSTRUCTIONS).is_file():
            with np.load(self.run_dir / RECONSTRUCTIONS) as old:
                self._arrays = {k: old[k] for k in old.files if k != "rounds" and int(k[6:10]) <= resume_after}
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir), purge_step=resume_after + 1 if resume_after else None,
                                     flush_secs=30)
            if not resume_after:
                self._tb.add_text("config", "```\n" + tomli_w.dumps(self.cfg) + "\n```", 0)

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's record to ``metrics.jsonl`` and flush it to disk; write its TensorBoard scalars."""
        self._metrics.write(json.dumps(finite(dict(record))) + "\n")
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        if self._tb is not None:
            for tag, value in round_scalars(record).items():
                self._tb.add_scalar(tag, value, int(record["round"]))
            self._tb.flush()

    def save_intercepted(self, server_round: int, client: str, payload: AttackPayload, target: str = "update") -> str:
        """Save the server's full view of the attacked update as ``attacks/round_NNNN_{target}.pt`` (see
        :func:`save_payload`); return the path relative to the run directory."""
        path = intercepted_path(self.run_dir, server_round, target)
        save_payload(path, payload, server_round, client)
        return str(path.relative_to(self.run_dir))

    def save_attack_arrays(self, server_round: int, attack: str, arrays: Mapping[str, np.ndarray],
                           target: str = "update") -> None:
        """Add round ``server_round``'s raw results to ``reconstructions.npz`` (rewritten atomically).

        Args:
            arrays: the evaluator's ``arrays`` (:func:`strategies.evaluator.score_reconstruction`).
            target: ``update`` (keys ``round_RRRR_<name>``) or ``probe`` (keys ``round_RRRR_probe_<name>``).
        """
        pre = f"round_{server_round:04d}_" + ("" if target == "update" else f"{target}_")
        for k, v in arrays.items():
            self._arrays[pre + k] = np.asarray(v)
        rounds = sorted({int(k[6:10]) for k in self._arrays})
        tmp = self.run_dir / f".{RECONSTRUCTIONS}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, rounds=np.asarray(rounds, np.int64), **self._arrays)
        os.replace(tmp, self.run_dir / RECONSTRUCTIONS)

    def log_attack_progress(self, server_round: int, attack: str, trace: list[tuple[int, float]],
                            target: str = "update") -> None:
        """Write an attack's objective against iteration as ``attack/objective/round_NNNN`` (``.../round_NNNN-probe``
        for the probe target).

        Args:
            trace: ``(iteration, objective)`` pairs in the order ``Budget.progress`` reported them; an iteration
                count that starts again (a new restart) is continued from the last one, so the curve runs forward.
        """
        if self._tb is None or not trace:
            return
        suffix = "" if target == "update" else f"-{target}"
        tag, offset, last = f"attack/objective/round_{server_round:04d}{suffix}", 0, -1
        for it, value in trace:
            if it + offset <= last:
                offset = last + 1 - it
            last = it + offset
            if math.isfinite(value):
                self._tb.add_scalar(tag, value, last)

    def save_final_model(self, state_dict: Mapping[str, torch.Tensor]) -> Path:
        """Save the global model as ``final_model.pt`` (a plain state_dict of CPU tensors, written atomically)."""
        path = self.run_dir / FINAL_MODEL
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()}, tmp)
        os.replace(tmp, path)
        return path

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
        if self._tb is not None:
            self._tb.add_image(f"attack/truth_above_reconstruction{suffix}", pair_grid(truth, reconstruction),
                               server_round, dataformats="CHW")
        return rel

    def close(self) -> None:
        """Close ``metrics.jsonl`` and the TensorBoard writer."""
        if not self._metrics.closed:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one round's record (tags in the module docstring); missing values are left out."""
    out: dict[str, float] = {}

    def put(tag: str, value: Any) -> None:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
                and math.isfinite(float(value)):
            out[tag] = float(value)

    put("test/accuracy", record.get("accuracy"))
    put("test/loss", record.get("loss"))
    put("lr", record.get("lr"))
    put("time/round_s", record.get("round_time_s"))
    put("time/attack_s", record.get("attack_time_s"))
    clients = record.get("clients") or []
    losses = [c["train_loss"] for c in clients if isinstance(c.get("train_loss"), (int, float))]
    if losses:
        put("train/loss", float(np.mean(losses)))
    eps = [c["dp_epsilon"] for c in clients if isinstance(c.get("dp_epsilon"), (int, float))]
    if eps:
        put("privacy/epsilon", max(eps))
    for a in record.get("attacks") or []:
        pre = "attack" if attack_target(a) == "update" else f"attack-{attack_target(a)}"  # attack-probe/...
        for k in ("psnr", "ssim", "mse", "label_accuracy", "time_s"):
            put(f"{pre}/{k}", a.get(k))
        for k, v in a.items():
            if k.endswith("_chance"):
                put(f"{pre}/{k}", v)
    return out


def pair_grid(truth: np.ndarray, reconstruction: np.ndarray, max_cols: int = 8, gap: int = 2) -> np.ndarray:
    """One ``float32 (C, 2H + gap, n(W + gap) - gap)`` image in [0, 1]: the true images in the top row, their
    matched reconstructions below (at most ``max_cols`` pairs), separated by ``gap`` white pixels."""
    n = max(1, min(len(truth), len(reconstruction), max_cols))
    c, h, w = truth.shape[1:]
    grid = np.ones((c, 2 * h + gap, n * (w + gap) - gap), np.float32)
    for j in range(min(n, len(truth), len(reconstruction))):
        x0 = j * (w + gap)
        grid[:, :h, x0:x0 + w] = np.clip(truth[j], 0, 1)
        grid[:, h + gap:, x0:x0 + w] = np.clip(reconstruction[j], 0, 1)
    return grid


def save_payload(path: Path, payload: AttackPayload, server_round: int, client: str) -> None:
    """Save a server's view of one update (an :class:`~attacker.payload.AttackPayload`, uncut) as plain tensors
    and values that ``torch.load(path, weights_only=True)`` reads; :func:`load_payload` turns it back.

    The file holds ``format``, ``round``, ``client``, ``model_name``, ``input_shape``, ``num_classes``, ``mean``,
    ``std``, ``global_state`` (what the server sent), ``update`` (``client − global`` of the trainable
    parameters, ``float32``), ``buffers`` (the returned buffers), ``num_examples``, ``train_config`` (a dict, as
    :meth:`TrainConfig.to_record` names its fields) and ``defense`` (the defense's name; never its secrets).
    """
    tc = payload.train_config
    data = {
        "format": INTERCEPTED_FORMAT, "round": int(server_round), "client": str(client),
        "model_name": payload.model_name, "input_shape": [int(v) for v in payload.input_shape],
        "num_classes": int(payload.num_classes), "mean": [float(v) for v in payload.mean],
        "std": [float(v) for v in payload.std],
        "global_state": {k: v.detach().cpu().clone() for k, v in payload.global_state.items()},
        "update": {k: v.detach().cpu().clone() for k, v in payload.update.items()},
        "buffers": {k: v.detach().cpu().clone() for k, v in (payload.buffers or {}).items()},
        "num_examples": None if payload.num_examples is None else int(payload.num_examples),
        "train_config": None if tc is None else dict(tc.to_record()),
        "defense": None if payload.defense is None else payload.defense.name,
    }
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def load_payload(path: Path) -> tuple[AttackPayload, dict[str, Any]]:
    """Read a file :func:`save_payload` wrote.

    Returns:
        ``(payload, raw)``: the :class:`~attacker.payload.AttackPayload` (the defense as its name only) and the
        file's dict.

    Raises:
        ValueError: not an intercepted-update file of this format.
    """
    raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(raw, dict) or raw.get("format") != INTERCEPTED_FORMAT:
        raise ValueError(f"{path} is not an fl-sim intercepted-update file ({INTERCEPTED_FORMAT})")
    tc = raw["train_config"]
    payload = AttackPayload(
        model_name=raw["model_name"], input_shape=tuple(raw["input_shape"]), num_classes=int(raw["num_classes"]),
        mean=tuple(raw["mean"]), std=tuple(raw["std"]), global_state=dict(raw["global_state"]),
        update=dict(raw["update"]), num_examples=raw["num_examples"],
        train_config=None if tc is None else TrainConfig.from_record(tc), buffers=dict(raw["buffers"]) or None,
        defense=None if raw["defense"] is None else DefenseInfo(raw["defense"]))
    return payload, raw


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


#: The per-attack fields :func:`attack_means` averages (scores, their chance levels, label accuracy, time).
MEAN_FIELDS = ("psnr", "ssim", "mse", "psnr_chance", "ssim_chance", "mse_chance", "label_accuracy", "time_s")


def attack_means(attacks: list[dict[str, Any]]) -> dict[str, Any]:
    """The means of :data:`MEAN_FIELDS` over the attacks that succeeded, with how many did.

    A failed attack (a record with ``error``: a failure the attack declares, see :class:`attacker.AttackError`)
    has no scores; it is not hidden but counted: ``succeeded`` of ``attacks`` says how many records each mean is
    taken over (a mean over 3 of 12 attacks is not a mean over 12), and ``scored`` how many of those have scores
    (not those without an audit record, nor those marked ``unscored``: an update whose secret batch, drawn by the
    defense, differs in size from the reconstruction). Empty when no attack ran.
    """
    if not attacks:
        return {}
    ok = [a for a in attacks if "error" not in a]
    out: dict[str, Any] = {}
    for k in MEAN_FIELDS:
        xs = [a[k] for a in ok if a.get(k) is not None]
        out[k] = float(np.mean(xs)) if xs else None
    out["succeeded"], out["attacks"] = len(ok), len(attacks)
    out["scored"] = sum(1 for a in ok if a.get("psnr") is not None)
    return out


def attack_failures(attacks: list[dict[str, Any]]) -> dict[str, int]:
    """Failed attacks per error type (``error_type``, else the text before the first colon of ``error``)."""
    out: dict[str, int] = {}
    for a in attacks:
        if "error" in a:
            kind = a.get("error_type") or str(a["error"]).split(":", 1)[0]
            out[kind] = out.get(kind, 0) + 1
    return out


def summarize(records: list[dict[str, Any]], cfg: Mapping[str, Any], wall_time_s: float | None,
              status: str) -> dict[str, Any]:
    """Build ``summary.json``'s content from the per-round records.

    Fields: ``status`` (``completed``/``interrupted``/``failed``), ``rounds`` (rounds recorded), ``final_accuracy``
    and ``final_loss`` (last evaluated round), ``best_accuracy``, ``wall_time_s``, ``mean_round_time_s`` (ART's
    numerator), ``mean_train_time_s``, ``mean_defense_time_s``, ``attacks`` (every attack record, failed ones
    included), ``attack_means`` (:func:`attack_means`: the means over the attacks that succeeded, their chance
    levels, and ``succeeded`` of ``attacks``; over the ``update`` target's attacks when the run has them, so that
    a probe's one-image scores never mix into the update's), ``attack_failures`` (error type → count), the key
    settings, for a DP defense ``privacy`` (:func:`privacy_block`) and, when some attack has another target than
    ``update``, ``attack_means_by_target`` (:func:`attack_means_by_target`).
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
        "attack_means": attack_means([a for a in attacks if attack_target(a) == "update"] or attacks),
        "attack_failures": attack_failures(attacks),
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


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git work tree fl-sim is imported from, or ``(None, None)`` (not a checkout, no
    git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (commit or None), bool(status.strip())


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def provenance(cfg: Mapping[str, Any] | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    """What produced a run, for ``summary.json``'s ``provenance``.

    Fields: ``fl_sim_version``, ``git_commit`` and ``git_dirty`` (tracked files changed; ``null`` outside a git
    checkout), ``python``, ``torch``, ``flwr``, ``numpy``, ``tensorboard`` (versions), ``cuda`` (torch's CUDA
    version or ``null``), ``device`` and ``attack_device`` (the ``device`` / ``attack-device`` keys resolved on
    this machine, e.g. ``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``), ``torch_threads`` (``torch.get_num_threads()`` in
    the server process), ``cpu_affinity`` (cores this process may use), ``platform``, and ``command`` (the command
    line, ``shlex``-quoted, of the process that wrote the summary: ``fl-sim run ...``, or Flower's ServerApp
    process under ``flwr run``).
    """
    commit, dirty = _git_state()
    argv = sys.argv if argv is None else argv
    out: dict[str, Any] = {
        "fl_sim_version": _version("fl-sim"), "git_commit": commit, "git_dirty": dirty,
        "python": platform.python_version(), "torch": torch.__version__, "flwr": _version("flwr"),
        "numpy": np.__version__, "tensorboard": _version("tensorboard"), "cuda": torch.version.cuda,
        "device": None, "attack_device": None, "torch_threads": torch.get_num_threads(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(), "command": shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else None,
    }
    if cfg is not None:
        try:
            device = resolve_device(str(cfg.get("device", "auto")), "device")
            attack = str(cfg.get("attack-device", "") or "")
            out["device"] = device_label(device)
            out["attack_device"] = device_label(resolve_device(attack, "attack-device")) if attack else out["device"]
        except ValueError:  # a config for another machine (provenance never fails a run)
            out["device"], out["attack_device"] = str(cfg.get("device")), str(cfg.get("attack-device"))
    return out


def attack_target(attack: Mapping[str, Any]) -> str:
    """An attack record's ``target`` (records written before targets existed attacked the update)."""
    return str(attack.get("target") or "update")


def attack_means_by_target(attacks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target (``update``, ``probe``, in that order), :func:`attack_means` over that target's attacks —
    ``summary.json``'s ``attack_means_by_target``."""
    targets = sorted({attack_target(a) for a in attacks}, key=lambda t: (t != "update", t))
    return {t: attack_means([a for a in attacks if attack_target(a) == t]) for t in targets}
    return out


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """Write ``summary.json`` atomically."""
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(finite(dict(summary)), indent=2))
