"""The networks of R-GAP (Zhu & Blaschko, ICLR'21, ``JunyiZhu-AI/R-GAP`` ``models/``): CNN6, CNN6-d and FCN3."""

from __future__ import annotations

import torch
from torch import nn

from fl_sim.task.models.common import flat_size


class RGAPNet(nn.Module):
    """Bias-free layers with LeakyReLU(0.2), no pooling.

    ``features`` is a ``Sequential`` of (bias-free conv or linear, LeakyReLU) pairs given by ``spec``; ``fc`` maps
    the flattened features to ``num_classes`` logits. Deviation from the paper's code: its nets end in a single
    bias-free output unit trained with a logistic loss; here ``fc`` has ``num_classes`` outputs and a bias, and
    training uses softmax cross-entropy (fl-sim's classifier convention). The bias makes the last step of R-GAP
    exact and closed-form (``x = ∇W_i / ∇b_i``) instead of the paper's scalar inversion of ``u·ℓ'(u)``; the
    convolutional part, where the recursion and the rank analysis happen, is the paper's.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output size.
        spec: per hidden layer, ``("conv", out_channels, kernel, stride, padding)`` or ``("linear", out_features)``.

    Shapes: ``float32 (B, C, H, W) → (B, num_classes)``.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, spec: tuple[tuple, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        c = input_shape[0]
        for item in spec:
            if item[0] == "conv":
                _, out, k, s, p = item
                layers += [nn.Conv2d(c, out, k, stride=s, padding=p, bias=False), nn.LeakyReLU(0.2)]
                c = out
            else:
                if not any(isinstance(m, nn.Flatten) for m in layers):
                    layers.append(nn.Flatten(1))
                width = flat_size(nn.Sequential(*layers), input_shape)
                layers += [nn.Linear(width, item[1], bias=False), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(flat_size(self.features, input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


#: CNN6 (fully recoverable per the paper's rank analysis): 3→12 (4×4, s2, p2), 12→36 (s2), 36→36, 36→36,
#: 36→64 (s2), 64→128; 3×3 kernels with padding 1 unless stated. 3×32×32 → 128×5×5 = 3,200 features.
CNN6_SPEC = (("conv", 12, 4, 2, 2), ("conv", 36, 3, 2, 1), ("conv", 36, 3, 1, 1), ("conv", 36, 3, 1, 1),
             ("conv", 64, 3, 2, 1), ("conv", 128, 3, 1, 1))
#: CNN6-d: CNN6 with a 20-channel second layer, rank-deficient per the paper.
CNN6D_SPEC = (("conv", 12, 4, 2, 2), ("conv", 20, 3, 2, 1), ("conv", 36, 3, 1, 1), ("conv", 36, 3, 1, 1),
              ("conv", 64, 3, 2, 1), ("conv", 128, 3, 1, 1))
#: FCN3: 784 → 1000 → 100 (then ``fc`` to the classes; the paper's third layer is 100 → 1).
FCN3_SPEC = (("linear", 1000), ("linear", 100))


def cnn6(input_shape: tuple[int, int, int], num_classes: int) -> RGAPNet:
    """``cnn6``: R-GAP's fully recoverable CNN6."""
    return RGAPNet(input_shape, num_classes, CNN6_SPEC)


def cnn6_d(input_shape: tuple[int, int, int], num_classes: int) -> RGAPNet:
    """``cnn6-d``: R-GAP's rank-deficient CNN6-d."""
    return RGAPNet(input_shape, num_classes, CNN6D_SPEC)


def fcn3(input_shape: tuple[int, int, int], num_classes: int) -> RGAPNet:
    """``fcn3``: R-GAP's fully connected FCN3."""
    return RGAPNet(input_shape, num_classes, FCN3_SPEC)
