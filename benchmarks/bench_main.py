"""Benchmark of the main job (issue 2). Prints, from one run on this machine:

1. the Flower simulation's wall time over the same local training done in one plain PyTorch loop (a ratio): the same
   model, clients, partitions, batches, learning-rate schedule and central evaluation, without attacks;
2. the time the default attack (iDLG, L-BFGS) and DLG take to reach 30 dB on a round-1 FedSGD update.

Usage::

    python benchmarks/bench_main.py [ROUNDS] [CLIENTS] [--no-attacks]     # defaults: 100 rounds, 10 clients

Both simulation backends run (``sim-backend=ray``, the default, then ``inprocess``), between two runs of the plain
loop, whose rounds are pooled (this machine's speed drifts by up to 2x between runs). The last line is one JSON
object with the headline figures — unprefixed for Ray, ``inprocess_...`` for the in-process backend: the per-round
ratio (issue 13 target <= 1.5x), the
start-up before round 1 (issue 13 target <= 5 s): ``startup_s`` from ``fl_sim.simulation.run``'s call to the start
of round 1 (Ray, the actors and their imports, node registration, ``query.whoami``, the initial evaluation) and
``startup_process_s``, that plus importing ``fl_sim.simulation`` in a fresh interpreter (what ``fl-sim run`` pays
before it); ``teardown_s`` from the end of the last round to ``run``'s return (final model, report, Flower's engine
and Ray shutting down); ``outside_rounds_s`` the wall time less the sum of the round times (start-up, every central
evaluation, teardown: what earlier versions called start-up); and the final accuracies (equal: the simulation
trains exactly like the plain loop, on either backend).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacker import ATTACKS, Budget  # noqa: E402
from clients.secrets import node_secret, round_seed  # noqa: E402
from clients.training import batch_schedule  # noqa: E402
from fl_sim.audit import fedsgd_payload  # noqa: E402
from fl_sim.config import resolve, specs  # noqa: E402
from fl_sim.task.datasets import denormalize, load_dataset, to_tensor  # noqa: E402
from fl_sim.task.models import build_model, evaluate  # noqa: E402
from fl_sim.task.partition import partitions  # noqa: E402
from strategies.metrics import psnr  # noqa: E402


def plain_loop(cfg: dict, client_secret: int, round_s: list[float] | None = None,
               eval_s: list[float] | None = None) -> tuple[float, float]:
    """The federation's local training and FedAvg in one process, one thread: (seconds, final accuracy).

    ``round_s``, when given, receives each round's seconds of training and FedAvg — without the set-up and without
    the central evaluation, like the simulation's ``round_time_s`` (client phase plus aggregation) it is compared
    with; ``eval_s``, when given, receives each evaluation's seconds.

    ``client_secret`` is the run-level client secret of the simulation to match (``RUN_DIR/clients/secret``).
    """
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_dataset(cfg["dataset"], cfg["data-dir"])
    parts = partitions(data.name, cfg["data-dir"], cfg["num-supernodes"], cfg["partition"], cfg["dirichlet-alpha"],
                       cfg["seed"])
    torch.manual_seed(cfg["seed"])
    glob = build_model(cfg["model"], data.input_shape, data.num_classes)
    local = build_model(cfg["model"], data.input_shape, data.num_classes)
    run = specs(cfg).server  # the server's lr schedule and the train config it sends
    acc = 0.0
    round_s = [] if round_s is None else round_s
    for rnd in range(1, cfg["num-server-rounds"] + 1):
        t_round = time.perf_counter()
        train_config = run.task.train_config(run.server.lr_at(cfg["lr"], rnd), rnd)
        lr = train_config.lr
        total = {k: torch.zeros_like(v) for k, v in glob.state_dict().items()}
        weight = 0
        for pid, part in enumerate(parts):
            local.load_state_dict(glob.state_dict())
            rng = np.random.default_rng(round_seed(node_secret(client_secret, pid), cfg["seed"], rnd))
            for idx in batch_schedule(part, train_config, rng):
                x = to_tensor(data.x_train[idx], data.mean, data.std)
                y = torch.as_tensor(data.y_train[idx])
                loss = torch.nn.functional.cross_entropy(local(x), y)
                grads = torch.autograd.grad(loss, list(local.parameters()))
                with torch.no_grad():
                    for p, g in zip(local.parameters(), grads):
                        p.add_(g, alpha=-lr)
            n = cfg["batch-size"] if cfg["mode"] == "fedsgd" else len(part)  # the client's num-examples
            for k, v in local.state_dict().items():
                total[k] += n * v
            weight += n
        glob.load_state_dict({k: v / weight for k, v in total.items()})
        t_eval = time.perf_counter()
        round_s.append(t_eval - t_round)
        _, acc = evaluate(glob, data.x_test, data.y_test, data.mean, data.std, torch.device("cpu"))
        if eval_s is not None:
            eval_s.append(time.perf_counter() - t_eval)
    return time.perf_counter() - start, acc


def simulation(cfg: dict, client_secret: int) -> tuple[float, float, float, float, dict]:
    """The same federation through ``fl-sim run``'s in-process Flower simulation.

    Returns (wall seconds including Ray start-up, final accuracy, median round time after round 1 in seconds, sum of
    all round times in seconds, ``{"startup_s", "teardown_s"}`` in seconds).
    """
    from fl_sim import simulation as sim
    from fl_sim.results import read_metrics

    with tempfile.TemporaryDirectory() as out:
        run_cfg = dict(cfg, **{"out-dir": out, "run-name": "bench"})
        ends: list[float] = []
        start = time.perf_counter()
        run_dir = sim.run(run_cfg, client_secret=client_secret, on_round=lambda row: ends.append(time.perf_counter()))
        seconds = time.perf_counter() - start
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        rows = read_metrics(Path(run_dir))
        steady = float(np.median([r["round_time_s"] for r in rows[1:]]))
        rounds_s = float(sum(r["round_time_s"] for r in rows))
        phases = {"startup_s": ends[0] - rows[0]["round_time_s"] - start, "teardown_s": start + seconds - ends[-1]}
    return seconds, summary["final_accuracy"], steady, rounds_s, phases


def import_seconds() -> float:
    """Seconds a fresh interpreter takes to import ``fl_sim.simulation`` (torch, flwr, Ray and fl-sim)."""
    code = "import time; t = time.perf_counter(); import fl_sim.simulation; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    return float(out.stdout.strip().splitlines()[-1])


def time_to_psnr(attack: str, model: str, target_db: float = 30.0, max_iters: int = 60) -> tuple[float, int, float]:
    """Smallest L-BFGS step budget at which ``attack`` reaches ``target_db`` on a round-1 FedSGD update (B = 1).

    Each budget is a fresh run with the same seed, so the trajectories share their prefix; returns the wall time of
    the first run that reaches the target, its step count, and its PSNR.
    """
    data = load_dataset("fashion-mnist")
    x = to_tensor(data.x_train[[3]], data.mean, data.std)
    y = torch.as_tensor(data.y_train[[3]])
    payload, _, _ = fedsgd_payload(model, x, y, data.mean, data.std, data.num_classes, lr=0.15, seed=0)
    truth = denormalize(x, data.mean, data.std)[0].numpy()
    best = (float("nan"), max_iters, 0.0)
    for k in range(1, max_iters + 1):
        res = ATTACKS[attack].run(payload, Budget(iterations=k, seed=0))
        value = psnr(denormalize(res.images, data.mean, data.std)[0].numpy(), truth)
        if value >= target_db:
            return res.time_s, res.iterations, value
    return best


def main() -> None:
    argv = [a for a in sys.argv[1:] if a != "--no-attacks"]
    attacks = "--no-attacks" not in sys.argv[1:]
    rounds = int(argv[0]) if len(argv) > 0 else 100
    clients = int(argv[1]) if len(argv) > 1 else 10
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # device=cpu: the plain loop runs on the CPU, so the simulation does too (benchmarks/bench_gpu.py times GPUs)
    cfg = resolve({"num-server-rounds": rounds, "num-supernodes": clients, "attack-every": 0, "device": "cpu"})
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; {clients} clients, {rounds} rounds, "
          f"{cfg['model']}, {cfg['mode']} B={cfg['batch-size']}")
    # the plain loop before and after the two simulations: this machine's speed drifts between runs, so its rounds
    # are pooled from both sides of them
    plain_rounds: list[float] = []
    plain_evals: list[float] = []
    t_plain, acc_plain = plain_loop(cfg, client_secret=0, round_s=plain_rounds, eval_s=plain_evals)
    sims = {backend: simulation(dict(cfg, **{"sim-backend": backend}), client_secret=0)
            for backend in ("ray", "inprocess")}
    t_plain2, acc_plain2 = plain_loop(cfg, client_secret=0, round_s=plain_rounds, eval_s=plain_evals)
    plain_round = float(np.median(plain_rounds))
    t_plain = min(t_plain, t_plain2)
    imports = import_seconds()
    print(f"plain PyTorch loop: {t_plain:7.2f} s  (final accuracy {acc_plain:.4f}; the faster of its two runs, "
          f"{acc_plain2:.4f} in the other)")
    result = {"bench": "main", "rounds": rounds, "clients": clients, "plain_round_ms": round(plain_round * 1e3, 2),
              "plain_eval_ms": round(float(np.median(plain_evals)) * 1e3, 2), "import_s": round(imports, 2),
              "final_accuracy_plain": acc_plain}
    for backend, (t_sim, acc_sim, steady, rounds_s, phases) in sims.items():
        prefix = "" if backend == "ray" else "inprocess_"
        print(f"Flower simulation, sim-backend={backend}: {t_sim:7.2f} s  (final accuracy {acc_sim:.4f}; "
              f"start-up included)")
        print(f"  ratio simulation / plain loop: {t_sim / t_plain:.1f}x overall; per round (medians of training "
              f"and FedAvg without the central evaluation, the simulation's after round 1, the plain loop's "
              f"without its set-up): {steady * 1e3:.1f} ms vs {plain_round * 1e3:.1f} ms = "
              f"{steady / plain_round:.2f}x (the plain loop's evaluation: "
              f"{float(np.median(plain_evals)) * 1e3:.1f} ms a round)")
        outside = t_sim - rounds_s
        print(f"  start-up before round 1: {phases['startup_s']:.2f} s from run()'s call, "
              f"{phases['startup_s'] + imports:.2f} s with the {imports:.2f} s import of fl_sim.simulation; "
              f"teardown after the last round {phases['teardown_s']:.2f} s; wall time less the {rounds} round "
              f"times (start-up, evaluations, teardown) {outside:.2f} s")
        result.update({f"{prefix}sim_round_ms": round(steady * 1e3, 2),
                       f"{prefix}round_ratio": round(steady / plain_round, 3),
                       f"{prefix}overall_ratio": round(t_sim / t_plain, 3),
                       f"{prefix}startup_s": round(phases["startup_s"], 2),
                       f"{prefix}startup_process_s": round(phases["startup_s"] + imports, 2),
                       f"{prefix}teardown_s": round(phases["teardown_s"], 2),
                       f"{prefix}outside_rounds_s": round(outside, 2),
                       f"final_accuracy_{prefix}sim": acc_sim})
    for attack in ("idlg", "dlg") if attacks else ():
        t, its, value = time_to_psnr(attack, cfg["model"])
        print(f"{attack} on {cfg['model']} (round-1 FedSGD update, B=1): 30 dB after {its} L-BFGS steps, "
              f"{t:.2f} s (reached {value:.1f} dB)")
        result[f"{attack}_30db_s"], result[f"{attack}_30db_steps"] = round(t, 3), its
    print(json.dumps(result))


if __name__ == "__main__":
    main()
