"""What the server sent in a round, as the strategy, its server steps and the attacker's payload see it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, Message

from fl_sim.task.contract import TrainConfig


@dataclass
class SentRound:
    """The server's own record of one round's train messages.

    Attributes:
        round: the server round (1-based).
        state: the global state dict it sent (cloned tensors).
        expected: ``{key: (shape, dtype)}`` of the arrays sent; replies must match it exactly.
        train_config: the train config it sent.
        nodes: ``{node id: partition id}`` of the sampled clients.
        messages: the messages sent (the Grid gives them their message ids when it sends them).
    """

    round: int
    state: dict[str, torch.Tensor]
    expected: dict[str, tuple[tuple[int, ...], str]]
    train_config: TrainConfig
    nodes: dict[int, int] = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)


def expected_arrays(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` of the global arrays the server sends; replies must match it exactly."""
    return {k: (tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}


def sent_round(server_round: int, arrays: ArrayRecord, train_config: TrainConfig,
               nodes: Mapping[int, int] | None = None, messages: list[Message] | None = None) -> SentRound:
    """A :class:`SentRound` for ``arrays`` sent with ``train_config`` to ``nodes``."""
    return SentRound(server_round, {k: v.clone() for k, v in arrays.to_torch_state_dict().items()},
                     expected_arrays(arrays), train_config, dict(nodes or {}), list(messages or []))


def cast_like(arrays: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Give the aggregate the dtypes of the global model the server sent.

    Flower's FedAvg averages every array in floating point, so an integer buffer (BatchNorm's
    ``num_batches_tracked``, ``int64``) would come back as ``float64`` and every later reply — which carries the
    client's ``int64`` buffer — would fail the dtype check. Integer arrays are rounded, floating ones cast.
    """
    state = arrays.to_torch_state_dict()
    out: dict[str, Any] = {}
    for k, v in state.items():
        ref = reference.get(k)
        if ref is None or v.dtype == ref.dtype:
            out[k] = v
        else:
            out[k] = (v if ref.is_floating_point() else v.round()).to(ref.dtype)
    return ArrayRecord(out)
