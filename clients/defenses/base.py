"""The interface every client-side defense implements.

A defense transforms the gradient of every local SGD step (so training feels it, and so does what is sent). It may
also keep per-client secrets across rounds in Flower's ``Context.state`` (a ``RecordDict`` that never leaves the
client) and touch the model after the global arrays are loaded (``on_model``) or the outgoing state dict before the
reply is built (``on_reply``). The server-side part of a defense, if any, lives in ``strategies/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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


GradientFn = Callable[[list[torch.Tensor], StepContext], list[torch.Tensor]]


@dataclass(frozen=True)
class Defense:
    """A registered client-side defense.

    Attributes:
        apply: ``(grads, ctx) -> grads`` applied to each local step's gradient list (shapes preserved).
        summary: one line for ``fl-sim defenses`` and reports (paper and year).
        on_model: optional ``(model, state, config)`` hook run after the global arrays are loaded.
        on_reply: optional ``(state_dict, state, config) -> state_dict`` hook run before the reply is built.
        model_hint: a model the defense requires (e.g. FedKL's key-lock nets), for error messages.
    """

    apply: GradientFn
    summary: str
    on_model: Callable[[nn.Module, RecordDict, Mapping[str, Any]], None] | None = None
    on_reply: Callable[[dict[str, torch.Tensor], RecordDict, Mapping[str, Any]], dict[str, torch.Tensor]] | None = None
    model_hint: str = ""
