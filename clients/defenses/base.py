"""The interface every client-side defense implements, and the per-sample gradient helper.

A defense is one module that declares a :class:`Defense`: its run-config keys (``defense-*``), the frozen parameter
object built from them, its checks against other keys, the public metrics it reports, and its hooks. It transforms
the gradient of every local SGD step (so training feels it, and so does what is sent). It may also keep per-client
secrets across rounds in Flower's ``Context.state`` (a ``RecordDict`` that never leaves the client), touch the
model after the global arrays are loaded (``on_model``) or the outgoing state dict before the reply is built
(``on_reply``, which also sees the global arrays the server sent), choose the round's batches itself (``batches``,
e.g. DP-SGD's Poisson sampling), read public values of other components' keys (``derive``, e.g. the number of
rounds), and add per-round public diagnostics to the reply's metrics (``report``, e.g. the privacy budget spent). A server-side part, if any, is a server step in ``strategies/steps/``. Registering the module's
:class:`Defense` in :data:`clients.defenses.DEFENSES` (one line) makes it a ``defense=NAME`` choice.

:func:`per_sample_gradients` gives the per-sample gradients of a step's batch (``torch.func.vmap`` over
``torch.func.grad``) for defenses that clip sample by sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn
from torch.func import functional_call, grad, vmap

from fl_sim.task.config import TaskConfig
from fl_sim.task.contract import TrainConfig
from fl_sim.task.keys import ConfigError, Key, build


@dataclass
class StepContext:
    """What a defense sees at one local step. Everything here stays on the client.

    Attributes:
        model: the local model (train mode), parameters at the value the gradient was taken at.
        names: trainable parameter names, aligned with the gradient list.
        x: the step's batch, normalised ``float32 (B, C, H, W)``.
        y: its labels, ``int64 (B,)``.
        loss_fn: ``(logits, y) -> scalar`` mean loss used for training.
        params: the defense's parameter object (:meth:`Defense.configure`).
        state: this client's persistent ``Context.state`` (secrets live here, never in a message).
        generator: a ``torch.Generator`` seeded from the client's secret for this round (reproducible noise).
        step: local step index (0-based).
        server_round: the server round.
        info: per-step diagnostics the defense sets (merged into the reply's metrics; last step wins). Only the
            names in :attr:`Defense.metrics` may be set.
        data: this client's dataset (``Dataset``; private, e.g. for GradDefense's root set) or None.
        partition: ``int64`` indices of this client's samples in ``data.x_train``, or None.
    """

    model: nn.Module
    names: list[str]
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    params: Any
    state: RecordDict
    generator: torch.Generator
    step: int = 0
    server_round: int = 0
    info: dict[str, float] = field(default_factory=dict)
    data: Any = None
    partition: np.ndarray | None = None


GradientFn = Callable[[list[torch.Tensor], StepContext], list[torch.Tensor]]


@dataclass(frozen=True)
class ReplyContext:
    """What a defense's ``on_reply`` hook sees besides the outgoing state dict. Everything here stays on the client.

    Attributes:
        global_state: the state dict the server sent this round (CPU tensors, the server's key order), so that a
            hook can work on the update ``local − global`` (e.g. Flower's ``LocalDpMod``).
        seed: the client's secret seed of this round (the same one the batches and the step noise come from).
        server_round: the server round.
    """

    global_state: Mapping[str, torch.Tensor]
    seed: int
    server_round: int = 0


BatchesFn = Callable[[np.ndarray, TrainConfig, np.random.Generator, Any, RecordDict], list[np.ndarray]]


@dataclass(frozen=True)
class Defense:
    """A client-side defense: what its module declares.

    Attributes:
        summary: one line for ``fl-sim defenses`` and reports (paper and year).
        apply: ``(grads, ctx) -> grads`` applied to each local step's gradient list (shapes preserved).
        keys: the run-config keys it owns (``defense-...``), with defaults, ranges and help.
        params: a frozen dataclass whose fields are the keys without ``prefix`` (``-`` → ``_``); ``None`` for a
            defense without keys. Its ``__post_init__`` may raise :class:`ConfigError` for bad combinations of its
            own keys.
        prefix: the common prefix of its keys (``"defense-gd-"``).
        check: optional ``(params, task) -> None`` raising :class:`ConfigError` for combinations with the task's
            keys that cannot work (checked before a run starts).
        models: registry names of the models the defense works with (empty = any).
        metrics: names of the public diagnostics it adds to a reply (through ``ctx.info`` or ``report``); nothing
            else may be added.
        on_model: optional ``(model, state, params, seed)`` hook run after the global arrays are loaded (train and
            evaluate); ``seed`` is the client's secret seed for secrets drawn once per run.
        on_reply: optional ``(state_dict, state, params, reply) -> state_dict`` hook run before the reply is built;
            ``reply`` is a :class:`ReplyContext` (the global arrays sent, the round's secret seed).
        report: optional ``(state, params) -> {metric: float}`` run after training (public diagnostics only).
        batches: optional ``(partition, train_config, rng, params, state) -> [int64 index arrays]`` replacing
            :func:`clients.training.batch_schedule` (the round's batches, one array of training-split indices per
            local step; an array may be empty). ``rng`` is the round's secret ``numpy`` generator. It may raise
            (e.g. a privacy budget that this round would exceed): the client then sends an error reply.
        derive: optional ``(params, cfg) -> params`` run by :meth:`configure` after the defense's own keys are read:
            fills in values taken from other components' public keys of the same run config (e.g. dp-sgd's planned
            rounds from ``num-server-rounds``). It must not raise for a config that lacks those keys.
    """

    summary: str
    apply: GradientFn
    keys: Mapping[str, Key] = field(default_factory=dict)
    params: type | None = None
    prefix: str = ""
    check: Callable[[Any, TaskConfig], None] | None = None
    models: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    on_model: Callable[[nn.Module, RecordDict, Any, int], None] | None = None
    on_reply: Callable[[dict[str, torch.Tensor], RecordDict, Any, ReplyContext], dict[str, torch.Tensor]] | None = None
    report: Callable[[RecordDict, Any], dict[str, float]] | None = None
    batches: BatchesFn | None = None
    derive: Callable[[Any, Mapping[str, Any]], Any] | None = None

    def configure(self, cfg: Mapping[str, Any]) -> Any:
        """The parameter object from a run config (``None`` for a defense without keys).

        Raises:
            ConfigError: a value its key does not allow, or a bad combination of its keys.
        """
        if self.params is None:
            return None
        params = build(self.params, self.keys, cfg, self.prefix)
        return self.derive(params, cfg) if self.derive is not None else params

    def validate(self, name: str, params: Any, task: TaskConfig) -> None:
        """Checks against the task's keys (the model it needs, and :attr:`check`).

        Raises:
            ConfigError: one line naming the keys.
        """
        if self.models and task.model not in self.models:
            raise ConfigError(f"model={task.model!r} is not allowed with defense={name!r}; model must be one of "
                              f"{', '.join(self.models)}")
        if self.check is not None:
            self.check(params, task)


def per_sample_gradients(ctx: StepContext) -> list[torch.Tensor]:
    """Per-sample gradients of the step's loss, one row per sample of ``ctx.x``.

    Uses ``torch.func.functional_call`` + ``vmap(grad)`` (no model changes, no hooks). Each sample is run as a
    batch of one, so models whose train-mode forward couples samples (BatchNorm) get per-sample statistics here
    (BatchNorm2d normalises over the sample's own spatial positions; running statistics are not updated).

    Args:
        ctx: the step context (``model``, ``x (B, C, H, W)``, ``y (B,)``, ``loss_fn``).

    Returns:
        One tensor per trainable parameter (``ctx.names`` order) of shape ``(B, *param.shape)``, on the
        parameters' device. Their mean over dim 0 is the batch gradient (for a mean-reduced loss without
        cross-sample coupling).
    """
    model = ctx.model
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return ctx.loss_fn(out, y.unsqueeze(0))

    # train-mode BatchNorm would update its running statistics in place inside the transform: use batch statistics
    # without tracking for the duration (the model's buffers are left as they are)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")(params, ctx.x, ctx.y)
    finally:
        for m in norms:
            m.track_running_stats = True
    return [grads[n] for n in ctx.names]
