"""The interface every client-side defense implements.

A defense transforms the gradient of every local SGD step (so training feels it, and so does what is sent). It may
also keep per-client secrets across rounds in Flower's ``Context.state`` (a ``RecordDict`` that never leaves the
client) and touch the model after the global arrays are loaded (``on_model``) or the outgoing state dict before the
reply is built (``on_reply``), and add per-round diagnostics to the reply's metrics (``report``, e.g. the privacy
budget spent). The server-side part of a defense, if any, lives in ``strategies/``.

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


@dataclass
class StepContext:
    """What a defense sees at one local step. Everything here stays on the client.

    Attributes:
        model: the local model (train mode), parameters at the value the gradient was taken at.
        names: trainable parameter names, aligned with the gradient list.
        x: the step's batch, normalised ``float32 (B, C, H, W)``.
        y: its labels, ``int64 (B,)``.
        loss_fn: ``(logits, y) -> scalar`` mean loss used for training.
        config: the resolved run config (``defense-*`` keys among it).
        state: this client's persistent ``Context.state`` (secrets live here, never in a message).
        generator: a ``torch.Generator`` seeded for this client, round and step (reproducible noise).
        step: local step index (0-based).
        server_round: the server round.
        info: per-step diagnostics the defense sets (merged into the reply's metrics; last step wins).
        data: this client's dataset (``fl_sim.data.Dataset``; private, e.g. for GradDefense's root set) or None.
        partition: ``int64`` indices of this client's samples in ``data.x_train``, or None.
    """

    model: nn.Module
    names: list[str]
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    config: Mapping[str, Any]
    state: RecordDict
    generator: torch.Generator
    step: int = 0
    server_round: int = 0
    info: dict[str, float] = field(default_factory=dict)
    data: Any = None
    partition: np.ndarray | None = None


GradientFn = Callable[[list[torch.Tensor], StepContext], list[torch.Tensor]]


@dataclass(frozen=True)
class Defense:
    """A registered client-side defense.

    Attributes:
        apply: ``(grads, ctx) -> grads`` applied to each local step's gradient list (shapes preserved).
        summary: one line for ``fl-sim defenses`` and reports (paper and year).
        on_model: optional ``(model, state, config, seed)`` hook run after the global arrays are loaded (train and
            evaluate); ``seed`` is constant per client for the whole run (for secrets drawn once).
        on_reply: optional ``(state_dict, state, config) -> state_dict`` hook run before the reply is built.
        report: optional ``(state, config) -> {metric: float}`` run after training; merged into the reply's
            MetricRecord (public diagnostics only, e.g. the privacy budget spent).
        model_hint: a model the defense requires (e.g. FedKL's key-lock nets), for error messages.
        models: registry names of the models the defense works with (empty = any); checked before a run starts.
    """

    apply: GradientFn
    summary: str
    on_model: Callable[[nn.Module, RecordDict, Mapping[str, Any], int], None] | None = None
    on_reply: Callable[[dict[str, torch.Tensor], RecordDict, Mapping[str, Any]], dict[str, torch.Tensor]] | None = None
    report: Callable[[RecordDict, Mapping[str, Any]], dict[str, float]] | None = None
    model_hint: str = ""
    models: tuple[str, ...] = ()


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
    from torch.func import functional_call, grad, vmap

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
