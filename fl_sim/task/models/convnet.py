"""A small untrained-friendly ReLU ConvNet for Inverting Gradients (in the spirit of ``inversefed``'s ConvNet)."""

from __future__ import annotations

import torch
from torch import nn

from fl_sim.task.models.common import flat_size


class ConvNet(nn.Module):
    """conv(32, 3×3) → ReLU → conv(32, 3×3) → ReLU → max-pool 2 → conv(64, 3×3) → ReLU → max-pool 2 → ``fc``.

    All convolutions use padding 1 and biases; no batch norm (so the attack needs no batch statistics). On
    3×32×32 inputs ``fc`` has 64·8·8 = 4,096 inputs.

    Shapes: ``float32 (B, C, H, W) → (B, num_classes)``.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(flat_size(self.features, input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))
