"""Local training on one client: FedSGD (one gradient on one batch) or FedAvg (several plain SGD steps).

Plain SGD without momentum or weight decay, so that the server-side conversion ``ĝ = −Δ / (lr · K)`` in
:func:`attacker.payload.update_to_gradient` is exact for FedSGD. The defense transforms every step's gradient
before the step is taken, and may choose the round's batches itself (:attr:`Defense.batches`, e.g. DP-SGD's
Poisson sampling, whose batches can be empty: such a step's gradient is zero before the defense sees it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from torch import nn

from clients.defenses import Defense, StepContext
from fl_sim.task.contract import TrainConfig
from fl_sim.task.datasets import Dataset, on_device, to_tensor


@dataclass
class TrainResult:
    """What one round of local training produced (besides the updated model).

    Attributes:
        num_examples: FedAvg weight (:meth:`TrainConfig.num_examples`).
        loss: mean training loss over the local steps with a non-empty batch (before each step); NaN when every
            batch was empty.
        train_time_s: wall-clock seconds of local training, defense included.
        defense_time_s: seconds spent inside the defense (its batch hook included).
        steps: local SGD steps taken (:meth:`TrainConfig.steps`).
        sample_indices: indices into the training split of the samples used, in order of use (audit only).
        defense_info: per-round diagnostics the defense set on its step contexts (e.g. Soteria's pruned share).
    """

    num_examples: int
    loss: float
    train_time_s: float
    defense_time_s: float
    steps: int
    sample_indices: list[int]
    defense_info: dict[str, float] = field(default_factory=dict)


def batch_schedule(partition: np.ndarray, train_config: TrainConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """The batches (arrays of training-split indices) one client uses in one round.

    * ``fedsgd``: one batch of ``batch_size`` distinct samples drawn at random from the partition.
    * ``fedavg`` with ``local_steps = K > 0``: K batches, walking through reshuffled passes over the partition.
    * ``fedavg`` otherwise: ``local_epochs`` shuffled passes of ``⌈n / B⌉`` batches (the last one may be smaller).

    There are always :meth:`TrainConfig.steps` batches.

    Raises:
        ValueError: a batch larger than the partition.
    """
    n, bs = len(partition), train_config.batch_size
    if bs > n:
        raise ValueError(f"batch-size={bs} exceeds this client's {n} samples")
    if train_config.mode == "fedsgd":
        return [rng.choice(partition, size=bs, replace=False)]
    if train_config.local_steps > 0:
        batches, order, pos = [], rng.permutation(partition), 0
        for _ in range(train_config.local_steps):
            if pos + bs > n:
                order, pos = rng.permutation(partition), 0
            batches.append(order[pos : pos + bs])
            pos += bs
        return batches
    batches = []
    for _ in range(train_config.local_epochs):
        order = rng.permutation(partition)
        batches.extend(order[i : i + bs] for i in range(0, n, bs))
    return batches


def train_mode(model: nn.Module) -> None:
    """``model.train()``, skipped when every module already trains (its ``setattr`` walk costs ~40 µs a call)."""
    if not all(m.training for m in model.modules()):
        model.train()


def local_train(model: nn.Module, data: Dataset, partition: np.ndarray, train_config: TrainConfig,
                defense: Defense, params: Any, state: RecordDict, seed: int, device: torch.device) -> TrainResult:
    """Train ``model`` in place on this client's partition for one round.

    Args:
        model: the global model, loaded (and prepared by the defense's ``on_model``), on ``device``.
        data: the dataset (``uint8`` arrays; the training split goes to ``device`` once per process,
            :func:`fl_sim.task.datasets.on_device`, and each batch is indexed and normalised there).
        partition: ``int64`` indices of this client's samples in ``data.x_train``.
        train_config: what the server sent this round.
        defense: the defense applied to every step's gradient.
        params: its parameter object.
        state: this client's ``Context.state``.
        seed: seed of this round's batch sampling and defense randomness (derived from the client's secret).
        device: where to compute.

    Returns:
        A :class:`TrainResult`.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    defense_s = 0.0
    if defense.batches is not None:
        t_def = time.perf_counter()
        batches = defense.batches(partition, train_config, rng, params, state)
        defense_s += time.perf_counter() - t_def
    else:
        batches = batch_schedule(partition, train_config, rng)
    named = list(model.named_parameters())
    names, params_list = [n for n, _ in named], [p for _, p in named]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    train_mode(model)
    losses, info = [], {}
    x_all, y_all = on_device(data, "train", device)  # copied to the device once per process, not per round
    for step, idx in enumerate(batches):
        rows = torch.as_tensor(idx, device=device, dtype=torch.long)
        x = to_tensor(x_all[rows], data.mean, data.std, device)
        y = y_all[rows]
        if len(idx):
            loss = F.cross_entropy(model(x), y)
            grads = list(torch.autograd.grad(loss, params_list))
            losses.append(float(loss.detach()))
        else:  # an empty batch (a defense's own sampling): no loss, a zero gradient
            grads = [torch.zeros_like(p) for p in params_list]
        t_def = time.perf_counter()
        ctx = StepContext(model, names, x, y, F.cross_entropy, params, state, gen, step, train_config.server_round,
                          data=data, partition=partition)
        grads = defense.apply(grads, ctx)
        defense_s += time.perf_counter() - t_def
        info.update(ctx.info)
        with torch.no_grad():
            for p, g in zip(params_list, grads):
                p.add_(g, alpha=-train_config.lr)
    used = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    # np.mean of one float64 is that float; skip NumPy's reduction set-up for FedSGD's single step
    loss_mean = (losses[0] if len(losses) == 1 else float(np.mean(losses))) if losses else math.nan
    return TrainResult(train_config.num_examples(len(partition)), loss_mean, time.perf_counter() - t0,
                       defense_s, len(batches), used.astype(np.int64, copy=False).tolist(), info)
