"""Local training on one client: FedSGD (one gradient on one batch) or FedAvg (several plain SGD steps).

Plain SGD without momentum or weight decay, so that the server-side conversion ``ĝ = −Δ / (lr · K)`` in
:func:`attacker.payload.update_to_gradient` is exact for FedSGD. The defense transforms every step's gradient
before the step is taken.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from torch import nn

from clients.defenses import Defense, StepContext
from fl_sim.data import Dataset, to_tensor


@dataclass
class TrainResult:
    """What one round of local training produced (besides the updated model).

    Attributes:
        num_examples: FedAvg weight: ``B`` for fedsgd, the partition size for fedavg.
        loss: mean training loss over the local steps (before each step).
        train_time_s: wall-clock seconds of local training, defense included.
        defense_time_s: seconds spent inside the defense.
        steps: local SGD steps taken.
        sample_indices: indices into the training split of the samples used, in order of use (audit only).
        defense_info: per-round diagnostics returned by the defense (e.g. the privacy budget spent).
    """

    num_examples: int
    loss: float
    train_time_s: float
    defense_time_s: float
    steps: int
    sample_indices: list[int]
    defense_info: dict[str, float] = field(default_factory=dict)


def batch_schedule(partition: np.ndarray, mode: str, batch_size: int, local_steps: int, local_epochs: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """The batches (arrays of training-split indices) one client uses in one round.

    * ``fedsgd``: one batch of ``batch_size`` distinct samples drawn at random from the partition.
    * ``fedavg`` with ``local_steps = K > 0``: K batches, walking through reshuffled passes over the partition.
    * ``fedavg`` otherwise: ``local_epochs`` shuffled passes of ``⌈n / B⌉`` batches (the last one may be smaller).

    Raises:
        ValueError: unknown mode, or a batch larger than the partition.
    """
    n = len(partition)
    if batch_size > n:
        raise ValueError(f"batch-size={batch_size} exceeds this client's {n} samples")
    if mode == "fedsgd":
        return [rng.choice(partition, size=batch_size, replace=False)]
    if mode != "fedavg":
        raise ValueError(f"unknown mode {mode!r}; allowed: fedsgd, fedavg")
    if local_steps > 0:
        batches, order, pos = [], rng.permutation(partition), 0
        for _ in range(local_steps):
            if pos + batch_size > n:
                order, pos = rng.permutation(partition), 0
            batches.append(order[pos : pos + batch_size])
            pos += batch_size
        return batches
    batches = []
    for _ in range(local_epochs):
        order = rng.permutation(partition)
        batches.extend(order[i : i + batch_size] for i in range(0, n, batch_size))
    return batches


def local_train(
    model: nn.Module,
    data: Dataset,
    partition: np.ndarray,
    train_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    defense: Defense,
    state: RecordDict,
    seed: int,
    device: torch.device,
) -> TrainResult:
    """Train ``model`` in place on this client's partition for one round.

    Args:
        model: the global model, loaded, on ``device``.
        data: the dataset (``uint8`` arrays; batches are converted on the fly).
        partition: ``int64`` indices of this client's samples in ``data.x_train``.
        train_config: what the server sent this round: ``mode``, ``lr``, ``batch-size``, ``local-steps``,
            ``local-epochs``, ``server-round``.
        run_config: the resolved run config (for the defense's keys).
        defense: the defense applied to every step's gradient.
        state: this client's ``Context.state``.
        seed: seed for batch sampling and the defense's randomness (client- and round-specific).
        device: where to compute.

    Returns:
        A :class:`TrainResult`.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    mode = str(train_config["mode"])
    bs = int(train_config["batch-size"])
    lr = float(train_config["lr"])
    batches = batch_schedule(partition, mode, bs, int(train_config.get("local-steps", 0)),
                             int(train_config.get("local-epochs", 1)), rng)
    names = [n for n, _ in model.named_parameters()]
    params = [p for p in model.parameters()]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model.train()
    losses, defense_s, info = [], 0.0, {}
    for step, idx in enumerate(batches):
        x = to_tensor(data.x_train[idx], data.mean, data.std, device)
        y = torch.as_tensor(data.y_train[idx], device=device)
        loss = F.cross_entropy(model(x), y)
        grads = list(torch.autograd.grad(loss, params))
        t_def = time.perf_counter()
        ctx = StepContext(model, names, x, y, F.cross_entropy, run_config, state, gen, step,
                          int(train_config.get("server-round", 0)), data=data, partition=partition)
        grads = defense.apply(grads, ctx)
        defense_s += time.perf_counter() - t_def
        info.update(ctx.info)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g, alpha=-lr)
        losses.append(float(loss.detach()))
    used = np.concatenate(batches)
    num_examples = bs if mode == "fedsgd" else len(partition)
    return TrainResult(num_examples, float(np.mean(losses)), time.perf_counter() - t0, defense_s, len(batches),
                       [int(i) for i in used], info)
