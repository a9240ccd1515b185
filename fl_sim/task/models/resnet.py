"""CIFAR ResNets with BatchNorm: ResNet-20 and ResNet-18 (the CIFAR variant), for 3×32×32 and 1×28×28 inputs.

Paper: He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385).

* ``resnet20`` (§4.2 of the paper, 6n+2 layers with n = 3): a 3×3 convolution to 16 channels, three stages of
  three :class:`BasicBlock` at 16, 32 and 64 channels (the first block of stages 2 and 3 has stride 2), global
  average pooling and ``fc``. **Deviation:** where the shape changes the shortcut is a 1×1 convolution with
  BatchNorm (the paper's option B, as in breaching's ``resnet20`` and FedKL's ``resnet20_kl``), not the paper's
  parameter-free option A (zero padding); 272,474 parameters for 10 classes (option A: 269,722).
* ``resnet18``: the CIFAR variant used by Inverting Gradients, breaching (``stem="CIFAR"``) and
  ``kuangliu/pytorch-cifar`` (``models/resnet.py``): a 3×3 stride-1 stem convolution to 64 channels with
  BatchNorm and no max-pool, four stages of two blocks at 64/128/256/512 channels (strides 1/2/2/2), global average
  pooling (adaptive, so 28×28 inputs work: 28→14→7→4) and ``fc``; 11,173,962 parameters for 10 classes.

Convolutions have no bias; every convolution is followed by a BatchNorm2d (PyTorch defaults: momentum 0.1,
ε = 1e-5, affine), so the last two parameter tensors are ``fc.weight`` and ``fc.bias`` (the analytic label rules
rely on it). Weights keep PyTorch's default initialisation (as ``kuangliu/pytorch-cifar``; akamaster's and
torchvision's Kaiming-normal ``fan_out`` init is not used). Shapes: ``float32 (B, C, H, W) → (B, num_classes)``.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Both convolutions are 3×3 (the first with ``stride``); the shortcut is the identity, or a 1×1 convolution with
    BatchNorm when the stride or the channel count changes (option B of He et al. 2016).

    Args:
        cin: input channels.
        cout: output channels.
        stride: stride of the first convolution (and of the projection).

    Shapes: ``(B, cin, H, W) → (B, cout, ⌈H/stride⌉, ⌈W/stride⌉)``, float32.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def stages(cin: int, widths: tuple[int, ...], blocks: int, strides: tuple[int, ...]) -> nn.Sequential:
    """``len(widths)`` stages of ``blocks`` :class:`BasicBlock` each; stage ``s`` has ``widths[s]`` channels and
    its first block has stride ``strides[s]``."""
    layers = []
    for cout, stride in zip(widths, strides):
        for b in range(blocks):
            layers.append(BasicBlock(cin, cout, stride if b == 0 else 1))
            cin = cout
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet: 3×3 stem convolution + BatchNorm + ReLU, :func:`stages`, global average pool, ``fc``.

    Args:
        input_shape: ``(C, H, W)`` (H, W >= 8 for the stride-2 stages).
        num_classes: output size.
        stem: channels of the stem convolution.
        widths: channels of each stage.
        blocks: blocks per stage.
        strides: stride of each stage's first block.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, stem: int, widths: tuple[int, ...],
                 blocks: int, strides: tuple[int, ...]):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layers = stages(stem, widths, blocks, strides)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(out.mean(dim=(2, 3)))


def resnet20(input_shape: tuple[int, int, int], num_classes: int) -> CifarResNet:
    """ResNet-20 (He et al. 2016, CIFAR: 3 stages × 3 blocks, 16/32/64 channels, option-B shortcuts)."""
    return CifarResNet(input_shape, num_classes, 16, (16, 32, 64), 3, (1, 2, 2))


def resnet18(input_shape: tuple[int, int, int], num_classes: int) -> CifarResNet:
    """ResNet-18, CIFAR variant (3×3 stem, no max-pool; 4 stages × 2 blocks, 64/128/256/512 channels)."""
    return CifarResNet(input_shape, num_classes, 64, (64, 128, 256, 512), 2, (1, 2, 2, 2))
