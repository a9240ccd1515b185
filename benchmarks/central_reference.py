"""Central training reference for the converged sweeps: a model trained on the whole training split in one place.

The converged seed-001 sweep (``sweeps/seed001-fmnist-converged.toml``) asks FedAvg without defense to end within
1 point of the same model trained centrally on the same data for the same number of epochs. This script is that
central run: plain SGD (the clients' optimiser: no momentum, no weight decay), cross-entropy, the data set's
normalisation, a fresh shuffle per epoch, test accuracy after every epoch.

Usage (the numbers in docs/sweeps.md came from these commands, one torch thread)::

    python benchmarks/central_reference.py --model lenet-tanh --epochs 10 --batch-size 32 --lr 0.05
    python benchmarks/central_reference.py --model lenet --epochs 10 --batch-size 32 --lr 0.5
    python benchmarks/central_reference.py --model lenet-tanh --epochs 10 --schedule cosine-epoch   # FedAvg's

``--schedule``: ``cosine`` (default) decays the rate over all steps, ``lr·½(1 + cos(π k / K))`` at step ``k`` of
``K``; ``cosine-epoch`` keeps it constant within an epoch at ``lr·½(1 + cos(π e / E))`` — what the server's
``lr-schedule=cosine`` sends over ``num-server-rounds = E`` rounds of ``local-epochs = 1``; ``constant``.
``--json PATH`` writes ``{"settings": ..., "epochs": [{"epoch", "accuracy", "loss", "time_s"}]}``.

``--fedavg-clients M`` runs the federated counterpart instead, in one process: ``fl-sim run``'s training with
``mode=fedavg local-epochs=1`` over ``--epochs`` rounds of M clients (the same IID partitions, client batch
schedules and seeds, and the server's cosine schedule over the rounds; FedAvg weighted by partition size), test
accuracy after every round — the numbers ``fl-sim run`` gives to the last digit, without Ray::

    python benchmarks/central_reference.py --fedavg-clients 2 --lr 0.15     # the converged sweep's setting
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients import secrets  # noqa: E402
from clients.training import batch_schedule  # noqa: E402
from fl_sim.config import resolve, specs  # noqa: E402
from fl_sim.task.datasets import load_dataset, to_tensor  # noqa: E402
from fl_sim.task.models import build_model, evaluate  # noqa: E402
from fl_sim.task.partition import partitions  # noqa: E402

SCHEDULES = ("cosine", "cosine-epoch", "constant")


#: The run-level client secret these scripts draw with: ``fl-sim run --client-secret 0`` (the Makefile's default)
#: makes the same batch and defense draws.
CLIENT_SECRET = 0


def lr_at(lr: float, schedule: str, step: int, steps: int, epoch: int, epochs: int) -> float:
    """The learning rate of ``step`` (0-based, of ``steps``) in ``epoch`` (0-based, of ``epochs``)."""
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    if schedule == "cosine-epoch":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return lr


def train_central(model_name: str, epochs: int, batch_size: int, lr: float, schedule: str = "cosine",
                  dataset: str = "fashion-mnist", data_dir: str = "/usr/share/datasets/fashion-mnist",
                  seed: int = 0, log=print) -> list[dict[str, float]]:
    """Train ``model_name`` centrally and return the test accuracy (0–1), loss and elapsed time after each epoch.

    Model initialisation ``torch.manual_seed(seed)``, shuffles from ``numpy.random.default_rng(seed)``; batches of
    ``batch_size`` (the last of an epoch may be smaller); float32 on the CPU.
    """
    torch.manual_seed(seed)
    ds = load_dataset(dataset, data_dir)
    model = build_model(model_name, ds.input_shape, ds.num_classes)
    params = list(model.parameters())
    rng = np.random.default_rng(seed)
    n = len(ds.y_train)
    per_epoch = math.ceil(n / batch_size)
    steps, k, t0, out = epochs * per_epoch, 0, time.perf_counter(), []
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            x = to_tensor(ds.x_train[idx], ds.mean, ds.std)
            y = torch.as_tensor(ds.y_train[idx])
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            rate = lr_at(lr, schedule, k, steps, epoch, epochs)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g, alpha=-rate)
            k += 1
        loss, acc = evaluate(model, ds.x_test, ds.y_test, ds.mean, ds.std, torch.device("cpu"))
        out.append({"epoch": epoch + 1, "accuracy": acc, "loss": loss, "time_s": time.perf_counter() - t0})
        log(f"{model_name} epoch {epoch + 1}/{epochs}: test accuracy {acc:.4f}, loss {loss:.4f}, "
            f"{out[-1]['time_s']:.0f} s")
    return out


def train_fedavg(model_name: str, clients: int, rounds: int, batch_size: int, lr: float,
                 dataset: str = "fashion-mnist", data_dir: str = "/usr/share/datasets/fashion-mnist", seed: int = 0,
                 log=print) -> list[dict[str, float]]:
    """FedAvg as ``fl-sim run`` trains it (one local epoch per round, lr cosine over the rounds), in one process.

    Returns the test accuracy (0–1), loss and elapsed time after each round, as :func:`train_central` per epoch.
    """
    cfg = resolve({"dataset": dataset, "data-dir": data_dir, "model": model_name, "num-supernodes": clients,
                   "mode": "fedavg", "local-epochs": 1, "batch-size": batch_size, "lr": lr, "lr-schedule": "cosine",
                   "num-server-rounds": rounds, "seed": seed, "attack-every": 0})
    ds = load_dataset(dataset, data_dir)
    parts = partitions(ds.name, data_dir, clients, cfg["partition"], cfg["dirichlet-alpha"], seed)
    torch.manual_seed(seed)
    glob = build_model(model_name, ds.input_shape, ds.num_classes)
    local = build_model(model_name, ds.input_shape, ds.num_classes)
    run = specs(cfg).server
    t0, out = time.perf_counter(), []
    for rnd in range(1, rounds + 1):
        tc = run.task.train_config(run.server.lr_at(lr, rnd), rnd)
        total = {k: torch.zeros_like(v) for k, v in glob.state_dict().items()}
        for pid, part in enumerate(parts):
            local.load_state_dict(glob.state_dict())
            rng = np.random.default_rng(secrets.round_seed(secrets.node_secret(CLIENT_SECRET, pid), seed, rnd))
            for idx in batch_schedule(part, tc, rng):
                x = to_tensor(ds.x_train[idx], ds.mean, ds.std)
                grads = torch.autograd.grad(F.cross_entropy(local(x), torch.as_tensor(ds.y_train[idx])),
                                            list(local.parameters()))
                with torch.no_grad():
                    for p, g in zip(local.parameters(), grads):
                        p.add_(g, alpha=-tc.lr)
            for k, v in local.state_dict().items():
                total[k] += len(part) * v
        glob.load_state_dict({k: v / sum(len(p) for p in parts) for k, v in total.items()})
        loss, acc = evaluate(glob, ds.x_test, ds.y_test, ds.mean, ds.std, torch.device("cpu"))
        out.append({"epoch": rnd, "accuracy": acc, "loss": loss, "time_s": time.perf_counter() - t0})
        log(f"fedavg {clients} clients, {model_name} round {rnd}/{rounds} (lr {tc.lr:.4f}): test accuracy {acc:.4f}, "
            f"loss {loss:.4f}, {out[-1]['time_s']:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lenet-tanh")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: as one simulated client)")
    ap.add_argument("--json", type=Path, default=None, help="also write the per-epoch numbers here")
    ap.add_argument("--fedavg-clients", type=int, default=0,
                    help="run FedAvg with this many clients instead (--epochs rounds of one local epoch)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.fedavg_clients > 0:
        epochs = train_fedavg(a.model, a.fedavg_clients, a.epochs, a.batch_size, a.lr, a.dataset, a.data_dir, a.seed)
    else:
        epochs = train_central(a.model, a.epochs, a.batch_size, a.lr, a.schedule, a.dataset, a.data_dir, a.seed)
    if a.json is not None:
        a.json.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(a).items()}, "epochs": epochs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
