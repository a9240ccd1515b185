"""The leakage map: how much the best applicable attack recovers where federated learning really runs.

For every model × batch size B × local steps K × model state (round 1, or trained for the default run's rounds)
one client's update is built by fl-sim's own client pipeline and server side (the path of ``fl-sim attack``:
:func:`clients.pipeline.client_update`, then :class:`strategies.strategy.CuriousFedAvg` attacks the raw update and
the evaluator scores it one-to-one against the client's images), and every registered attack that applies is run
on it under a fixed time budget per cell (split equally among the attacks). A cell reports the best PSNR, that
attack's SSIM and label accuracy, and the chance level: the score of the training split's mean image against the
client's images (the record's ``psnr_chance`` when the evaluator provides one). PSNR near the chance level means
nothing was recovered.

The client of a cell holds ``K·B`` Fashion-MNIST training images (the same seeded draw for every model and state)
and runs ``K`` plain SGD steps of ``B`` images (``mode=fedsgd`` for K = 1, ``mode=fedavg local-steps=K`` otherwise),
lr 0.15 (the default run's round-1 rate, for both states, so that only the model state differs). The trained state
is the default federation (10 clients, FedSGD B = 1, cosine lr, ``--rounds`` rounds) run in one plain PyTorch loop
with the same partitions, batches and seeds as ``fl-sim run`` (``benchmarks/bench_main.py`` checks that the two end at
the same accuracy). Attacks that apply: K = 1: ``idlg``, ``ig``, ``rgap``, ``gradinversion``, ``grnn``; K > 1:
``ig-fedavg``, ``dimitrov``, ``grnn`` — those registered, and whose own check accepts the model and setting.

Writes ``--out`` (default ``docs/leakage.md``: the table, the heat map ``--png``, a paragraph on what the map says,
the command and budget) and ends with one JSON line of headline figures.

Usage::

    python benchmarks/leakage_map.py                                    # the full map (see docs/leakage.md)
    python benchmarks/leakage_map.py --models lenet-tanh --batch-sizes 1,4 --steps 1 --rounds 20 --budget 10 \\
        --out /tmp/leak.md --png /tmp/leak.png                          # a tiny one
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import ArrayRecord, Message, Metadata, RecordDict  # noqa: E402

from attacker import ATTACKS  # noqa: E402
from clients import secrets  # noqa: E402
from clients.pipeline import client_update  # noqa: E402
from clients.training import batch_schedule  # noqa: E402
from fl_sim.audit import AuditRecorder, audit_dataset  # noqa: E402
from fl_sim.config import ConfigError, check_attack_with_model, resolve, specs  # noqa: E402
from fl_sim.task import contract  # noqa: E402
from fl_sim.task.datasets import Dataset, load_dataset, to_tensor  # noqa: E402
from fl_sim.task.models import MODELS, build_model, evaluate  # noqa: E402
from fl_sim.task.partition import partitions  # noqa: E402
from strategies.metrics import psnr, ssim  # noqa: E402
from strategies.strategy import CuriousFedAvg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL_SET = ("lenet-tanh", "convnet", "resnet20")
BATCH_SIZES = (1, 4, 16, 64)
LOCAL_STEPS = (1, 4)
STATES = ("round1", "trained")
#: Candidate attacks by kind of update (those not registered are skipped).
FEDSGD_ATTACKS = ("idlg", "ig", "rgap", "gradinversion", "grnn")
MULTISTEP_ATTACKS = ("ig-fedavg", "dimitrov", "grnn")
DATASET = "fashion-mnist"
LR = 0.15


#: The run-level client secret these scripts draw with: ``fl-sim run --client-secret 0`` (the Makefile's default)
#: makes the same batch and defense draws.
CLIENT_SECRET = 0


# -- model states ----------------------------------------------------------------------------------------------------
def initial_state(model: str, data: Dataset, seed: int) -> dict[str, torch.Tensor]:
    """The round-1 global model of ``fl-sim run`` (built after ``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)
    net = build_model(model, data.input_shape, data.num_classes)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def trained_state(model: str, data: Dataset, rounds: int, seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """The global model after ``rounds`` rounds of the default federation with ``model`` (plain loop, one thread).

    Same partitions, client batches (:func:`clients.training.batch_schedule` with the clients' round seeds), learning
    rate schedule and example-weighted FedAvg (buffers included) as ``fl-sim run``; no defense, no attack.

    Returns:
        ``(state, final test accuracy)``.
    """
    cfg = resolve({"model": model, "num-server-rounds": rounds, "attack-every": 0, "seed": seed})
    run = specs(cfg).server
    parts = partitions(data.name, "", cfg["num-supernodes"], cfg["partition"], cfg["dirichlet-alpha"], seed)
    torch.manual_seed(seed)
    glob = build_model(model, data.input_shape, data.num_classes)
    local = build_model(model, data.input_shape, data.num_classes)
    for rnd in range(1, rounds + 1):
        tc = run.task.train_config(run.server.lr_at(cfg["lr"], rnd), rnd)
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in glob.state_dict().items()}
        weight = 0
        for pid, part in enumerate(parts):
            local.load_state_dict(glob.state_dict())
            local.train()
            rng = np.random.default_rng(secrets.round_seed(secrets.node_secret(CLIENT_SECRET, pid), seed, rnd))
            for idx in batch_schedule(part, tc, rng):
                x = to_tensor(data.x_train[idx], data.mean, data.std)
                loss = torch.nn.functional.cross_entropy(local(x), torch.as_tensor(data.y_train[idx]))
                grads = torch.autograd.grad(loss, list(local.parameters()))
                with torch.no_grad():
                    for p, g in zip(local.parameters(), grads):
                        p.add_(g, alpha=-tc.lr)
            n = tc.num_examples(len(part))
            for k, v in local.state_dict().items():
                total[k] += n * v.double()
            weight += n
        ref = glob.state_dict()
        glob.load_state_dict({k: (v / weight).round().to(ref[k].dtype) if not ref[k].is_floating_point()
                              else (v / weight).to(ref[k].dtype) for k, v in total.items()})
    _, acc = evaluate(glob, data.x_test, data.y_test, data.mean, data.std, torch.device("cpu"))
    return {k: v.detach().clone() for k, v in glob.state_dict().items()}, float(acc)


# -- one cell --------------------------------------------------------------------------------------------------------
def cell_config(model: str, attack: str, batch: int, steps: int, time_limit: float, seed: int) -> dict[str, Any]:
    """The run config of one attack in one cell (ConfigError if the combination is refused)."""
    mode = {"mode": "fedsgd"} if steps == 1 else {"mode": "fedavg", "local-steps": steps}
    return resolve({"model": model, "dataset": DATASET, "attack": attack, "batch-size": batch, "lr": LR,
                    "lr-schedule": "constant", "attack-iterations": 0, "attack-time-limit": time_limit,
                    "seed": seed, **mode})


def applicable(model: str, batch: int, steps: int, data: Dataset) -> list[str]:
    """The registered attacks that apply to this cell (their own checks accept the model and the setting)."""
    out = []
    for name in FEDSGD_ATTACKS if steps == 1 else MULTISTEP_ATTACKS:
        if name not in ATTACKS:
            continue
        try:
            cfg = cell_config(model, name, batch, steps, 1.0, 0)
            check_attack_with_model(cfg, build_model(model, data.input_shape, data.num_classes))
        except ConfigError:
            continue
        out.append(name)
    return out


def attack_once(cfg: dict[str, Any], client: Dataset, state: dict[str, torch.Tensor],
                chance_image: np.ndarray) -> dict[str, Any]:
    """Round 1 of a one-client federation from ``state`` on ``client``'s images, attacked: the path of
    :func:`fl_sim.audit.audit_round` with a given global model. ``chance_image`` (``(C, H, W)`` in [0, 1]) is the
    chance-level reconstruction the evaluator scores next to the attack: the whole training split's mean image (the
    client's own few images would make their own mean the reference, e.g. the image itself at B = 1). Returns the
    attack record."""
    run = specs(cfg)
    task = run.server.task
    server = replace(run.server, server=replace(run.server.server, attack_every=1, victim="0"))
    strategy = CuriousFedAvg(server, client, AuditRecorder(None))
    strategy.chance_image = chance_image
    arrays = ArrayRecord({k: v.clone() for k, v in state.items()})
    record = strategy.new_record(1)
    tc = task.train_config(record["lr"], 1)
    strategy.begin_round(1, arrays, tc, {1: 0})
    update = client_update(run.client, arrays.to_torch_state_dict(), client, np.arange(len(client.y_train)), tc,
                           RecordDict(), secrets.once_seed(secrets.node_secret(CLIENT_SECRET, 0), task.seed),
                           secrets.round_seed(secrets.node_secret(CLIENT_SECRET, 0), task.seed, 1),
                           torch.device("cpu"))
    content = contract.train_reply(update.state, update.metrics, 0, update.sample_indices)
    md = Metadata(run_id=0, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=0,
                  reply_to_message_id=uuid.uuid4().hex, group_id="1", created_at=time.time(), ttl=3600,
                  message_type="train")
    strategy.aggregate_train(1, [Message(content=content, metadata=md)])
    return strategy.last_record["attacks"][0]


def chance_level(truth: np.ndarray, mean_image: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of the training split's mean image against each true image, averaged.

    Args:
        truth: ``(N, C, H, W)`` in [0, 1].
        mean_image: ``(C, H, W)`` in [0, 1].
    """
    return (float(np.mean([psnr(mean_image, t) for t in truth])),
            float(np.mean([ssim(mean_image.astype(np.float32), t.astype(np.float32)) for t in truth])))


def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    """One cell (a process-pool job): every applicable attack under ``budget / len(attacks)`` seconds."""
    torch.set_num_threads(1)
    data = load_dataset(DATASET)
    model, batch, steps, state_name = job["model"], job["batch"], job["steps"], job["state"]
    idx = np.random.default_rng(job["seed"]).choice(len(data.y_train), batch * steps, replace=False)
    client = audit_dataset(DATASET, data.x_train[idx], data.y_train[idx])
    truth = data.x_train[idx].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean_image = data.x_train.astype(np.float64).mean(0).transpose(2, 0, 1) / 255.0
    attacks = job["attacks"]
    limit = job["budget"] / max(1, len(attacks))
    results, start = {}, time.perf_counter()
    for name in attacks:
        cfg = cell_config(model, name, batch, steps, limit, job["seed"])
        t = time.perf_counter()
        try:
            rec = attack_once(cfg, client, job["state_dict"], mean_image.astype(np.float32))
        except (ConfigError, ValueError, RuntimeError) as exc:
            rec = {"error": f"{type(exc).__name__}: {exc}"}
        rec["wall_s"] = time.perf_counter() - t
        results[name] = {k: rec.get(k) for k in ("psnr", "ssim", "label_accuracy", "psnr_chance", "ssim_chance",
                                                  "num_images", "iterations", "wall_s", "error")}
    scored = {k: v for k, v in results.items() if v.get("psnr") is not None}
    best = max(scored, key=lambda k: scored[k]["psnr"]) if scored else None
    chance_psnr, chance_ssim = chance_level(truth, mean_image)
    if best is not None and scored[best].get("psnr_chance") is not None:
        chance_psnr, chance_ssim = scored[best]["psnr_chance"], scored[best].get("ssim_chance", chance_ssim)
    b = scored.get(best, {})
    return {"model": model, "state": state_name, "batch": batch, "steps": steps, "images": int(len(idx)),
            "budget_s": job["budget"], "attacks": results, "best": best, "psnr": b.get("psnr"), "ssim": b.get("ssim"),
            "label_accuracy": b.get("label_accuracy"), "psnr_chance": chance_psnr, "ssim_chance": chance_ssim,
            "wall_s": time.perf_counter() - start}


# -- the page --------------------------------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def table(cells: list[dict[str, Any]]) -> str:
    """The map as a markdown table, one row per cell."""
    lines = ["| model | state | B | K | images | best attack | PSNR (dB) | SSIM | label acc. | chance PSNR | "
             "attacks tried (PSNR) | cell time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        tried = ", ".join(f"{k} {_fmt(v.get('psnr'))}" if v.get("psnr") is not None else f"{k} failed"
                          for k, v in c["attacks"].items()) or "none applies"
        lines.append(f"| {c['model']} | {c['state']} | {c['batch']} | {c['steps']} | {c['images']} | "
                     f"{c['best'] or '–'} | {_fmt(c['psnr'])} | {_fmt(c['ssim'], '.3f')} | "
                     f"{_fmt(c['label_accuracy'], '.2f')} | {_fmt(c['psnr_chance'])} | {tried} | {c['wall_s']:.0f} |")
    return "\n".join(lines)


def heatmap(cells: list[dict[str, Any]], path: Path) -> None:
    """One panel per model state: rows = models, columns = (B, K); colour = best PSNR, text = PSNR and (in
    brackets) PSNR above chance; cells within 3 dB of chance are hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = [s for s in STATES if any(c["state"] == s for c in cells)]
    models = list(dict.fromkeys(c["model"] for c in cells))
    cols = sorted({(c["steps"], c["batch"]) for c in cells})
    fig, axes = plt.subplots(1, len(states), figsize=(1.1 * len(cols) * len(states) + 2, 0.8 * len(models) + 1.6),
                             squeeze=False)
    image = None
    for ax, state in zip(axes[0], states):
        grid = np.full((len(models), len(cols)), np.nan)
        for c in cells:
            if c["state"] == state and c["psnr"] is not None:
                grid[models.index(c["model"]), cols.index((c["steps"], c["batch"]))] = c["psnr"]
        image = ax.imshow(grid, cmap="viridis", vmin=5, vmax=45, aspect="auto")
        for c in cells:
            if c["state"] != state:
                continue
            i, j = models.index(c["model"]), cols.index((c["steps"], c["batch"]))
            if c["psnr"] is None:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="k")
                continue
            gain = c["psnr"] - c["psnr_chance"]
            ax.text(j, i, f"{c['psnr']:.0f}\n({gain:+.0f})", ha="center", va="center", fontsize=7,
                    color="w" if c["psnr"] < 30 else "k")
            if gain < 3:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="r", lw=0))
        ax.set_xticks(range(len(cols)), [f"K={k}\nB={b}" for k, b in cols], fontsize=7)
        ax.set_yticks(range(len(models)), models if ax is axes[0][0] else [], fontsize=8)
        ax.set_title("round 1" if state == "round1" else "trained", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="best PSNR (dB)", shrink=0.9)
    fig.suptitle("leakage map: best attack PSNR (in brackets: dB above the mean-image chance level; hatched: "
                 "within 3 dB of it)", fontsize=9, y=1.02 + 0.1 / max(1, len(models)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def headline(cells: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """The figures the paragraph and the JSON line report."""
    def mean(rows: list[dict[str, Any]], key: str = "psnr") -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    scored = [c for c in cells if c["psnr"] is not None]
    gain = [c["psnr"] - c["psnr_chance"] for c in scored]
    out: dict[str, Any] = {
        "cells": len(cells), "scored": len(scored), "wall_s": round(wall_s, 1),
        "budget_s": cells[0]["budget_s"] if cells else None,
        "max_psnr": max((c["psnr"] for c in scored), default=None),
        "mean_psnr_round1": mean([c for c in scored if c["state"] == "round1"]),
        "mean_psnr_trained": mean([c for c in scored if c["state"] == "trained"]),
        "mean_psnr_k1": mean([c for c in scored if c["steps"] == 1]),
        "mean_psnr_k4": mean([c for c in scored if c["steps"] > 1]),
        "cells_within_3db_of_chance": int(sum(g < 3 for g in gain)),
        "cells_above_30db": int(sum(c["psnr"] >= 30 for c in scored)),
    }
    for b in sorted({c["batch"] for c in scored}):
        out[f"mean_psnr_b{b}"] = mean([c for c in scored if c["batch"] == b])
    for m in dict.fromkeys(c["model"] for c in scored):
        out[f"mean_psnr_{m}"] = mean([c for c in scored if c["model"] == m])
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}


def paragraph(cells: list[dict[str, Any]], head: dict[str, Any]) -> str:
    """What the map says, in sentences built from its numbers."""
    scored = [c for c in cells if c["psnr"] is not None]
    if not scored:
        return "No cell was scored."
    parts = []
    bs = sorted({c["batch"] for c in scored})
    by_b = ", ".join(f"{head[f'mean_psnr_b{b}']:.1f} dB at B = {b}" for b in bs)
    parts.append(f"Averaged over models, states and local steps, the best attack's PSNR is {by_b}.")
    if head["mean_psnr_round1"] is not None and head["mean_psnr_trained"] is not None:
        parts.append(f"Round-1 models leak {head['mean_psnr_round1']:.1f} dB on average and trained ones "
                     f"{head['mean_psnr_trained']:.1f} dB.")
    if head["mean_psnr_k1"] is not None and head["mean_psnr_k4"] is not None:
        parts.append(f"One local step gives {head['mean_psnr_k1']:.1f} dB, several steps "
                     f"{head['mean_psnr_k4']:.1f} dB.")
    top = max(scored, key=lambda c: c["psnr"])
    parts.append(f"The most exposed cell is {top['model']} ({top['state']}, B = {top['batch']}, K = {top['steps']}): "
                 f"{top['psnr']:.1f} dB by {top['best']}; {head['cells_above_30db']} of {len(scored)} scored cells "
                 f"reach 30 dB, and {head['cells_within_3db_of_chance']} stay within 3 dB of the mean-image chance "
                 f"level (nothing recovered).")
    return " ".join(parts)


def page(cells: list[dict[str, Any]], head: dict[str, Any], notes: list[str], png: Path, out: Path,
         command: str, trained: dict[str, float]) -> str:
    """The markdown of docs/leakage.md."""
    rel = os.path.relpath(png, out.parent)
    acc = ", ".join(f"{m} {a:.3f}" for m, a in trained.items())
    lines = [
        "# The leakage map",
        "",
        "How much the best applicable attack recovers from one client's update, by model, batch size B, local steps "
        "K and model state, each cell under the same time budget. Generated by `benchmarks/leakage_map.py` (its "
        "docstring has the method); regenerate with",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Budget: {head['budget_s']:g} s per cell, split equally among the attacks that apply; {head['cells']} cells "
        f"in {head['wall_s'] / 60:.1f} min on {os.cpu_count()} cores (torch {torch.__version__}). Data: "
        f"{DATASET} (the embedded subset), the client holds K·B training images; lr {LR}. Chance level: the "
        "training split's mean image scored against the client's images. Trained state: the default federation "
        f"after the rounds given (test accuracy {acc or '–'}).",
        "",
    ]
    if notes:
        lines += ["Notes: " + " ".join(notes), ""]
    lines += [f"![leakage map]({rel})", "", "## What the map says", "", paragraph(cells, head), "", "## Table", "",
              table(cells), "", "Headline figures:", "", f"```json\n{json.dumps(head)}\n```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODEL_SET))
    ap.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    ap.add_argument("--steps", default=",".join(map(str, LOCAL_STEPS)))
    ap.add_argument("--states", default=",".join(STATES))
    ap.add_argument("--rounds", type=int, default=300, help="rounds of the default federation for the trained state")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per cell, split among its attacks")
    ap.add_argument("--jobs", type=int, default=1, help="cells run in parallel (one torch thread each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "leakage.md")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "leakage.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = load_dataset(DATASET)
    notes, models = [], []
    for m in args.models.split(","):
        if m in MODELS:
            models.append(m)
        else:
            notes.append(f"model {m!r} is not registered here; its rows are skipped.")
            print(f"note: model {m!r} is not registered; skipped", flush=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    steps = [int(k) for k in args.steps.split(",")]
    states = [s for s in args.states.split(",") if s]
    missing = [a for a in dict.fromkeys(FEDSGD_ATTACKS + MULTISTEP_ATTACKS) if a not in ATTACKS]
    if missing:
        notes.append(f"attacks not registered here (not tried): {', '.join(missing)}.")
    n_cells = len(models) * len(batches) * len(steps) * len(states)
    print(f"leakage map: {n_cells} cells × {args.budget:g} s budget = at most {n_cells * args.budget / 60:.0f} min "
          f"of attacks with --jobs {args.jobs} = 1 (÷ jobs), plus training", flush=True)
    state_dicts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    trained_acc: dict[str, float] = {}
    for m in models:
        if "round1" in states:
            state_dicts[(m, "round1")] = initial_state(m, data, args.seed)
        if "trained" in states:
            t = time.perf_counter()
            state_dicts[(m, "trained")], trained_acc[m] = trained_state(m, data, args.rounds, args.seed)
            print(f"trained {m} for {args.rounds} rounds: test accuracy {trained_acc[m]:.3f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    jobs = []
    for m in models:
        for state in states:
            for k in steps:
                for b in batches:
                    jobs.append({"model": m, "state": state, "batch": b, "steps": k, "budget": args.budget,
                                 "seed": args.seed, "attacks": applicable(m, b, k, data),
                                 "state_dict": state_dicts[(m, state)]})
    cells = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for c in pool.map(run_cell, jobs):
                cells.append(c)
                _progress(c)
    else:
        for job in jobs:
            cells.append(run_cell(job))
            _progress(cells[-1])
    wall = time.perf_counter() - t0
    head = headline(cells, wall)
    print(table(cells))
    print(f"budget per cell: {args.budget:g} s, split equally among the attacks that apply")
    command = "python benchmarks/leakage_map.py " + " ".join(argv if argv is not None else sys.argv[1:])
    heatmap(cells, args.png)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page(cells, head, notes, args.png, args.out, command.strip(), trained_acc))
    print(f"wrote {args.out} and {args.png}")
    print(json.dumps(head))
    return head


def _progress(c: dict[str, Any]) -> None:
    print(f"{c['model']:>10} {c['state']:>7} B={c['batch']:<3} K={c['steps']}: best {c['best']} "
          f"{_fmt(c['psnr'])} dB (chance {c['psnr_chance']:.1f}) in {c['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
