"""No defense: the gradient is sent as computed (the baseline every defense is measured against)."""

from __future__ import annotations

import torch

from clients.defenses.base import Defense, StepContext


def apply(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """Return ``grads`` unchanged."""
    return grads


DEFENSE = Defense("no defense", apply)
