"""Server-side steps of client defenses, applied to the FedAvg aggregate.

Registry :data:`SERVER_STEPS`: defense name → ``(aggregated ArrayRecord, train replies, sent, cfg) -> ArrayRecord``.
``sent`` holds what the server sent this round (``state``: the global state dict, ``config``: the train config).
A step may use only public parameters (the run config) and what the server received.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ArrayRecord, Message

ServerStep = Callable[[ArrayRecord, list[Message], Mapping[str, Any], Mapping[str, Any]], ArrayRecord]

#: Server-side defense steps by defense name (defenses without one are absent).
SERVER_STEPS: dict[str, ServerStep] = {}
