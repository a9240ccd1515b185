"""Server steps: the server-side part of a client defense, applied to the FedAvg aggregate.

Registry :data:`SERVER_STEPS`: defense name → ``(aggregated ArrayRecord, usable train replies, SentRound, defense
params) -> ArrayRecord``. A step may use only public parameters (the defense's parameter object, built from the run
config) and what the server received. A new step is one module plus one ``SERVER_STEPS.register`` line below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, Message

from fl_sim.task.registry import Registry
from strategies.rounds import SentRound
from strategies.steps import graddefense

ServerStep = Callable[[ArrayRecord, list[Message], SentRound, Any], ArrayRecord]

#: Server steps by defense name (defenses without one are absent).
SERVER_STEPS: Registry[ServerStep] = Registry("server step")
SERVER_STEPS.register("graddefense", graddefense.compensate)

__all__ = ["SERVER_STEPS", "ServerStep"]
