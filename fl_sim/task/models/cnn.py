"""A ReLU CNN that trains well (the shape of Flower's PyTorch quickstart ``Net``)."""

from __future__ import annotations

import torch
from torch import nn

from fl_sim.task.models.common import flat_size


class SimpleCNN(nn.Module):
    """conv(32, 3×3) → ReLU → max-pool 2 → conv(64, 3×3) → ReLU → max-pool 2 → fc1(128) → ReLU → ``fc``.

    Max-pooling and ReLU make its gradients a poor target for DLG (reported 9–17 dB here).

    Shapes: ``float32 (B, C, H, W) → (B, num_classes)``.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(flat_size(self.features, input_shape), 128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc1(self.features(x).flatten(1))))
