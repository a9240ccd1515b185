"""FedKL key-lock models: a LeNet and a ResNet-20 whose first convolution block is locked by a private key.

Paper: Ren, Deng, Xie, Ma & Ma, "Gradient Leakage Defense with Key-Lock Module for Federated Learning",
arXiv:2305.04095 (``Rand2AI/FedKL``, ``backbone/KL_layer_block.py``). A :class:`KeyLock` block computes

``x → Conv2d → BatchNorm2d(affine=False) → γ ⊙ · + β``,  ``γ = act(scale_fc(k))``, ``β = act(shift_fc(k))``,

where ``k`` is a fixed random key (a buffer of ``key_dim`` values in [0, 1); 1024 in the paper) and ``scale_fc``,
``shift_fc`` are ``nn.Linear(key_dim, C_out)`` "lock" layers. As in the paper's "single" variants only the first
convolution is locked. The key and the lock layers are a client's secret: :func:`private_state_keys` lists their
state-dict keys; the ``fedkl`` defense (``clients/defenses/fedkl.py``) keeps them in the client's ``Context.state``
and sends zeros in their place. The lock activation is a sigmoid (the paper's leakage-test models; its training
models use ReLU), which keeps γ in (0, 1) and the network twice differentiable for gradient-matching attacks.
"""

from __future__ import annotations

import torch
from torch import nn

from fl_sim.task.models.common import flat_size
from fl_sim.task.models.resnet import stages

#: Key length of the paper's code (``config.json`` ``KEY_LENGTH``).
KEY_DIM = 1024


class KeyLock(nn.Module):
    """A convolution whose per-channel affine map comes from a private key through private lock layers.

    Args:
        conv: the convolution to lock (its ``out_channels`` sets the lock layers' size).
        key_dim: length of the key vector.
        act: activation of the lock layers' outputs (``nn.Sigmoid`` here).

    Shapes: ``(B, C_in, H, W) → (B, C_out, H', W')``, float32.
    """

    def __init__(self, conv: nn.Conv2d, key_dim: int = KEY_DIM, act: type[nn.Module] = nn.Sigmoid):
        super().__init__()
        channels = conv.out_channels
        self.conv = conv
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.scale_fc = nn.Linear(key_dim, channels)
        self.shift_fc = nn.Linear(key_dim, channels)
        self.act = act()
        self.register_buffer("key", torch.zeros(key_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.act(self.scale_fc(self.key))
        beta = self.act(self.shift_fc(self.key))
        return self.norm(self.conv(x)) * gamma[None, :, None, None] + beta[None, :, None, None]


#: The private parts of a :class:`KeyLock`, relative to the block's name.
PRIVATE_SUFFIXES = ("key", "scale_fc.weight", "scale_fc.bias", "shift_fc.weight", "shift_fc.bias")


def private_state_keys(model: nn.Module) -> tuple[str, ...]:
    """State-dict keys of every :class:`KeyLock`'s key and lock layers (empty for models without one)."""
    return tuple(f"{name}.{suffix}" for name, m in model.named_modules() if isinstance(m, KeyLock)
                 for suffix in PRIVATE_SUFFIXES)


class LeNetKL(nn.Module):
    """The DLG LeNet (:class:`fl_sim.task.models.lenet.LeNet`, tanh, 3 convs of 12 channels, ``fc``) with a key-locked conv1.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output size.
        key_dim: key length.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, key_dim: int = KEY_DIM):
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            KeyLock(nn.Conv2d(c, 12, 5, stride=2, padding=2), key_dim), nn.Tanh(),
            nn.Conv2d(12, 12, 5, stride=2, padding=2), nn.Tanh(),
            nn.Conv2d(12, 12, 5, stride=1, padding=2), nn.Tanh(),
        )
        self.fc = nn.Linear(flat_size(self.features.eval(), input_shape), num_classes)
        self.features.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class ResNet20KL(nn.Module):
    """ResNet-20 for small images (He et al. 2016, CIFAR variant: 3 stages × 3 blocks, 16/32/64 channels) with a
    key-locked first convolution (FedKL's ``resnet20_kl``), global average pooling and ``fc``.

    Args:
        input_shape: ``(C, H, W)`` (any size >= 8×8).
        num_classes: output size.
        key_dim: key length.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, key_dim: int = KEY_DIM):
        super().__init__()
        self.lock = KeyLock(nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False), key_dim)
        self.layers = stages(16, (16, 32, 64), 3, (1, 2, 2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.lock(x)))
        return self.fc(out.mean(dim=(2, 3)))
