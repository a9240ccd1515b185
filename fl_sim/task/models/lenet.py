"""The LeNet of DLG (Zhu et al., NeurIPS'19, ``mit-han-lab/dlg`` ``models/vision.py``), sigmoid or tanh."""

from __future__ import annotations

import torch
from torch import nn

from fl_sim.task.models.common import flat_size


class LeNet(nn.Module):
    """Three 5×5 convolutions with 12 channels (strides 2, 2, 1; padding 2), each followed by ``act``, then one
    fully-connected layer ``fc`` (588 inputs for 28×28, 768 for 32×32).

    There is no pooling, so gradients are twice differentiable everywhere with smooth activations, which is what
    makes DLG work.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output size.
        act: activation module class (``nn.Sigmoid`` in the paper; ``nn.Tanh`` trains better under FedSGD).
        uniform_init: when set, weights and biases are drawn from U(−a, a) as in the DLG script (a = 0.5).

    Shapes: ``float32 (B, C, H, W) → (B, num_classes)``.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, act: type[nn.Module] = nn.Sigmoid,
                 uniform_init: float | None = 0.5):
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 12, 5, stride=2, padding=2), act(),
            nn.Conv2d(12, 12, 5, stride=2, padding=2), act(),
            nn.Conv2d(12, 12, 5, stride=1, padding=2), act(),
        )
        self.fc = nn.Linear(flat_size(self.features, input_shape), num_classes)
        if uniform_init is not None:
            for p in self.parameters():
                nn.init.uniform_(p, -uniform_init, uniform_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def lenet(input_shape: tuple[int, int, int], num_classes: int) -> LeNet:
    """``lenet``: DLG's own LeNet, sigmoid activations, U(−0.5, 0.5) initialisation (leaks; barely trains)."""
    return LeNet(input_shape, num_classes, act=nn.Sigmoid, uniform_init=0.5)


def lenet_tanh(input_shape: tuple[int, int, int], num_classes: int) -> LeNet:
    """``lenet-tanh`` (the default): tanh activations and PyTorch's default initialisation (leaks and trains)."""
    return LeNet(input_shape, num_classes, act=nn.Tanh, uniform_init=None)
