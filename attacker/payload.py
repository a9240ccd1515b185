"""What an honest-but-curious server holds about one client update, and what an attack returns.

The seam between the federation and the attacks (in the spirit of breaching's ``server_payload``/``shared_data``):
an attack consumes an :class:`AttackPayload` and nothing else. The payload is built by the server strategy from the
global arrays it sent, the arrays the client returned, the client's ``num-examples`` and the train config the server
itself sent. It never holds labels, sample indices or anything else from the client's private state.

:func:`update_to_gradient` is the one place where a weight update is turned into a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fl_sim.models import build_model


@dataclass(frozen=True)
class ThreatModel:
    """What an attack needs beyond the payload's always-present fields (LeakPro-style capability flags).

    Attributes:
        labels: the true labels of the batch (an oracle; no attack in fl-sim's registry sets it by default).
        local_hyperparams: the local learning rate, number of steps and batch size. The server sent them, so a
            curious server has them; attacks that unroll local training declare it.
        bn_statistics: the batch-norm statistics of the client's batch (not shared in fl-sim's protocol).
    """

    labels: bool = False
    local_hyperparams: bool = False
    bn_statistics: bool = False


@dataclass
class AttackPayload:
    """Server-visible data about one client update.

    Attributes:
        model_name: registry name of the global model's architecture (the server chose it).
        input_shape: ``(C, H, W)`` of one input.
        num_classes: number of classes.
        mean: public per-channel normalisation mean of the dataset (in [0, 1] pixel units).
        std: public per-channel normalisation standard deviation.
        global_state: the state dict the server sent (parameters and buffers), ``float32`` tensors on CPU.
        update: ``client_state - global_state`` for every key of the reply's ArrayRecord (same shapes).
        num_examples: the ``num-examples`` the client reported.
        train_config: the train config the server sent this round (``mode``, ``lr``, ``batch-size``,
            ``local-steps``, ``local-epochs``, ``server-round``...).
        round: the server round.
        client: the client's identity as the server knows it (its partition id in fl-sim).
        ignored_keys: state keys the server knows carry no information (e.g. FedKL lock layers sent as zeros).
    """

    model_name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    global_state: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    num_examples: int
    train_config: dict[str, Any]
    round: int = 0
    client: str = ""
    ignored_keys: tuple[str, ...] = ()

    @property
    def batch_size(self) -> int:
        """Images per local step: the ``batch-size`` the server sent, capped by ``num-examples``."""
        return max(1, min(int(self.train_config.get("batch-size", self.num_examples)), int(self.num_examples)))

    @property
    def local_steps(self) -> int:
        """Number of local SGD steps behind the update, from the server's own train config.

        ``fedsgd``: 1. ``fedavg``: ``local-steps`` when positive, else ``local-epochs × ⌈num-examples / B⌉``.
        """
        cfg = self.train_config
        if cfg.get("mode", "fedsgd") == "fedsgd":
            return 1
        if int(cfg.get("local-steps", 0)) > 0:
            return int(cfg["local-steps"])
        return int(cfg.get("local-epochs", 1)) * math.ceil(int(self.num_examples) / self.batch_size)

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The global model the client started from, in train mode (as the client ran it), on ``device``."""
        model = build_model(self.model_name, self.input_shape, self.num_classes)
        model.load_state_dict(self.global_state)
        return model.to(device).train()

    def parameter_names(self, model: nn.Module) -> list[str]:
        """Names of the trainable parameters, in ``model.parameters()`` order."""
        return [n for n, _ in model.named_parameters()]

    def gradients(self, model: nn.Module) -> list[torch.Tensor]:
        """The observed update as an average gradient per parameter, in ``model.parameters()`` order.

        See :func:`update_to_gradient`.
        """
        names = self.parameter_names(model)
        device = next(model.parameters()).device
        upd = [self.update[n].to(device) for n in names]
        return update_to_gradient(upd, float(self.train_config["lr"]), self.local_steps)


def update_to_gradient(update: list[torch.Tensor], lr: float, steps: int) -> list[torch.Tensor]:
    """Turn a weight update into the average gradient that produced it.

    Local SGD without momentum gives ``Δ = θ_K − θ_0 = −lr · Σ_k g_k``, so the mean gradient is
    ``ĝ = −Δ / (lr · K)``. For ``fedsgd`` (K = 1) this is exactly the batch gradient; for K > 1 it is the average
    of the K step gradients (each taken at a different θ_k). Every attack that matches gradients, and every label
    rule that reads signs, goes through this function.

    Args:
        update: per-parameter tensors ``Δ`` (any shapes, ``float32``).
        lr: the local learning rate the server sent (> 0).
        steps: the number of local steps K (>= 1).

    Returns:
        Tensors of the same shapes: ``-Δ / (lr · K)``.

    Raises:
        ValueError: ``lr <= 0`` or ``steps < 1``.
    """
    if lr <= 0 or steps < 1:
        raise ValueError(f"cannot convert an update to a gradient with lr={lr} and steps={steps}")
    scale = -1.0 / (lr * steps)
    return [u * scale for u in update]


@dataclass
class Budget:
    """How much work one attack may do.

    Attributes:
        iterations: optimiser iterations per restart (0 = the attack's own default).
        restarts: independent random restarts; the one with the lowest objective is returned.
        time_limit_s: wall-clock seconds for the whole attack (0 = none); the best result so far is returned.
        seed: seed of the random initialisation.
        progress: optional callback ``(iteration, objective)`` called every few iterations.
    """

    iterations: int = 0
    restarts: int = 1
    time_limit_s: float = 0.0
    seed: int = 0
    progress: Callable[[int, float], None] | None = None


@dataclass
class AttackResult:
    """A reconstruction.

    Attributes:
        images: ``float32 (B, C, H, W)`` in the dataset's *normalised* space (de-normalise before scoring).
        labels: ``int64 (B,)`` recovered or optimised labels.
        iterations: optimiser iterations actually run (summed over restarts).
        time_s: wall-clock seconds.
        objective: final value of the attack's objective for the returned restart.
        extras: attack-specific diagnostics (JSON-serialisable scalars).
    """

    images: torch.Tensor
    labels: torch.Tensor
    iterations: int
    time_s: float
    objective: float
    extras: dict[str, Any] = field(default_factory=dict)
