"""What an honest-but-curious server holds about one client update, what an attack may see of it, and what an
attack returns.

The seam between the federation and the attacks (in the spirit of breaching's ``server_payload``/``shared_data``):
an attack consumes an :class:`AttackPayload` and nothing else. The server strategy builds the full payload from
what it holds — the global model it sent, the arrays the client returned, the client's ``num-examples``, the train
config it sent — and then cuts it to the attack's declared :class:`ThreatModel` (:meth:`AttackPayload.cut`): an
attack that declares nothing gets the model architecture, the global model and the update of the trainable
parameters, and every other field is ``None``. A payload never holds labels, sample indices or anything else from
a client's private state.

:func:`update_to_gradient` is the one place where a weight update is turned into a gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fl_sim.task.contract import TrainConfig
from fl_sim.task.models import build_model


class ThreatModelError(Exception):
    """An attack used a payload field its :class:`ThreatModel` does not grant (a bug in the attack)."""


class AttackError(Exception):
    """A failure an attack declares: it could not produce a reconstruction of *this* update.

    The server counts such a failure (the attack record holds ``error`` and the run's summary says "n of m attacks
    succeeded") and goes on; any other exception from an attack is a bug and stops the run with its traceback.
    Raise one of the two subclasses.
    """


class NotApplicable(AttackError, ValueError):
    """The attack cannot run on this update (e.g. R-GAP on a layer it cannot invert, a batch its method does not
    cover, a defense without the public parameters a denoiser needs). Also a ``ValueError``, so that the checks run
    before a federation starts (which turn ``ValueError`` into a one-line ``ConfigError``) see it too."""


class BudgetExhausted(AttackError, TimeoutError):
    """The attack ran out of its :class:`Budget` (time limit, iterations) before it had any reconstruction to
    return. Attacks that hold a best-so-far result return that instead (``extras["stop"]`` says why)."""


@dataclass(frozen=True)
class ThreatModel:
    """What an attack may see beyond the global model and the update (LeakPro-style capability flags).

    Everything here is something a curious server holds; an attack declares what it uses and receives only that.

    Attributes:
        num_examples: the ``num-examples`` the client reported (its FedAvg weight; the batch size under FedSGD).
        local_hyperparams: the train config the server sent (learning rate, batch size, local steps or epochs,
            mode). Needed to turn an update into a gradient at the right scale and to unroll local training.
        bn_statistics: the client's returned buffers (BatchNorm running statistics): when buffers travel with the
            update they reveal the batch statistics of the client's local steps.
        defense_params: the public parameters of the client's defense (e.g. GradDefense's σ, S, M), as the run
            config states them; never its secrets.
    """

    num_examples: bool = False
    local_hyperparams: bool = False
    bn_statistics: bool = False
    defense_params: bool = False

    def granted(self) -> list[str]:
        """The names of the capabilities granted, e.g. ``["num-examples", "local-hyperparams"]``."""
        return [k.replace("_", "-") for k, v in vars(self).items() if v]


#: The threat model of the matching attacks in fl-sim's registry: the update's size and the train config sent.
SERVER_CONFIG = ThreatModel(num_examples=True, local_hyperparams=True)


@dataclass(frozen=True)
class DefenseInfo:
    """The public side of a client's defense, as the run config states it.

    Attributes:
        name: the ``defense`` key.
        params: its parameter object (public parameters only; the defense's secrets never leave the client).
        metrics: the diagnostics it declares it adds to every reply (beyond the standard metrics).
        own_batches: the defense draws the round's batches itself (e.g. DP-SGD's Poisson sampling), so how many
            images an update holds is the client's secret draw; :func:`images_in_update` is then only the number
            the batch size aims at.
    """

    name: str
    params: Any = None
    metrics: tuple[str, ...] = ()
    own_batches: bool = False


@dataclass(frozen=True)
class AttackPayload:
    """Server-visible data about one client update, cut to what an attack declared.

    Always present:
        model_name: registry name of the global model's architecture (the server chose it).
        input_shape: ``(C, H, W)`` of one input.
        num_classes: number of classes.
        mean, std: public per-channel normalisation of the dataset (in [0, 1] pixel units).
        global_state: the state dict the server sent (parameters and buffers), ``float32`` CPU tensors.
        update: ``client − global`` for every *trainable parameter* the reply carries (same shapes).

    Granted by the :class:`ThreatModel` (``None`` otherwise):
        num_examples: the ``num-examples`` the client reported.
        train_config: the train config the server sent this round.
        buffers: the buffers the client returned (e.g. BatchNorm running mean/var after its local steps).
        defense: the public parameters of the client's defense.
    """

    model_name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    global_state: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    num_examples: int | None = None
    train_config: TrainConfig | None = None
    buffers: dict[str, torch.Tensor] | None = None
    defense: DefenseInfo | None = None

    def cut(self, threat: ThreatModel) -> AttackPayload:
        """This payload with every field ``threat`` does not grant set to ``None`` (the tensors are copied)."""
        return replace(
            self,
            global_state={k: v.clone() for k, v in self.global_state.items()},
            update={k: v.clone() for k, v in self.update.items()},
            num_examples=self.num_examples if threat.num_examples else None,
            train_config=self.train_config if threat.local_hyperparams else None,
            buffers={k: v.clone() for k, v in self.buffers.items()} if threat.bn_statistics and self.buffers else None,
            defense=self.defense if threat.defense_params else None,
        )

    def _need(self, value: Any, what: str) -> Any:
        if value is None:
            raise ThreatModelError(f"this attack uses {what}, which its ThreatModel does not grant")
        return value

    @property
    def batch_size(self) -> int:
        """Images per local step: the ``batch-size`` the server sent, capped by ``num-examples``.

        Raises:
            ThreatModelError: ``local_hyperparams`` or ``num_examples`` not granted.
        """
        tc = self._need(self.train_config, "the train config (local_hyperparams)")
        n = self._need(self.num_examples, "num-examples (num_examples)")
        return max(1, min(int(tc.batch_size), int(n)))

    @property
    def local_steps(self) -> int:
        """Number of local SGD steps behind the update (:meth:`TrainConfig.steps`).

        Raises:
            ThreatModelError: ``local_hyperparams`` or ``num_examples`` not granted.
        """
        tc = self._need(self.train_config, "the train config (local_hyperparams)")
        return tc.steps(self._need(self.num_examples, "num-examples (num_examples)"))

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

        Raises:
            ThreatModelError: ``local_hyperparams`` or ``num_examples`` not granted.
        """
        names = self.parameter_names(model)
        device = next(model.parameters()).device
        upd = [self.update[n].to(device) for n in names]
        tc = self._need(self.train_config, "the train config (local_hyperparams)")
        return update_to_gradient(upd, float(tc.lr), self.local_steps)


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


def images_in_update(train_config: TrainConfig, num_examples: int) -> int:
    """How many distinct images an update holds, from what the server knows: the train config it sent and the
    client's ``num-examples`` (the rule of ``clients.training.batch_schedule``).

    * ``fedsgd``: the one batch, ``min(batch-size, num-examples)`` images (``num-examples`` is B there).
    * ``fedavg`` with ``local-steps = K > 0``: ``K × B`` images while they fit in one pass over the client's
      ``n = num-examples`` samples; the whole partition ``n`` when ``K × B > n`` and ``B`` divides ``n`` (the first
      pass already used every sample).
    * ``fedavg`` with ``local-steps = 0``: ``local-epochs`` full passes, so the whole partition ``n``.

    Args:
        train_config: the train config the server sent.
        num_examples: the ``num-examples`` the client reported (fedavg: its partition size).

    Returns:
        The number of distinct training images behind the update (>= 1).

    Raises:
        ValueError: the number is not determined by what the server knows: ``K × B > n`` with ``n`` not a multiple
            of ``B`` (the first pass leaves ``n mod B`` samples out, and whether the reshuffled next pass picks them
            up is the client's secret draw).
    """
    n, b = int(num_examples), max(1, int(train_config.batch_size))
    if train_config.mode == "fedsgd":
        return max(1, min(b, n))
    if train_config.local_steps == 0:
        return n
    k = int(train_config.local_steps)
    if k * b <= n:
        return k * b
    if n % b == 0:
        return n
    raise ValueError(f"local-steps={k} × batch-size={b} = {k * b} exceeds the client's {n} samples, which "
                     f"batch-size does not divide: the update holds between {n - n % b} and {n} distinct images")


def split_update(global_state: Mapping[str, torch.Tensor], returned: Mapping[str, torch.Tensor],
                 parameter_names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(update, buffers)`` of a reply: ``returned − global`` for the trainable parameters (as ``float32``), and
    the returned values of every other key the server sent (buffers such as BatchNorm running statistics)."""
    params = set(parameter_names)
    update = {k: returned[k].float() - global_state[k].float() for k in global_state if k in returned and k in params}
    buffers = {k: returned[k].clone() for k in global_state if k in returned and k not in params}
    return update, buffers


@dataclass
class Budget:
    """How much work one attack may do.

    Attributes:
        iterations: optimiser iterations per restart (0 = the attack's own default).
        restarts: independent random restarts; the one with the lowest objective is returned.
        time_limit_s: wall-clock seconds for the whole attack (0 = none); the best result so far is returned.
        seed: seed of the random initialisation.
        progress: optional callback ``(iteration, objective)`` called every few iterations.
        device: where the attack computes (``payload.build_model(budget.device)``; its random starts are still
            drawn on the CPU from ``seed``, so a CPU run is unchanged and a GPU run starts from the same points).
    """

    iterations: int = 0
    restarts: int = 1
    time_limit_s: float = 0.0
    seed: int = 0
    progress: Callable[[int, float], None] | None = None
    device: str | torch.device = "cpu"


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
