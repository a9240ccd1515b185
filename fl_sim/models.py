"""Model registry.

Every builder takes ``(input_shape, num_classes)`` — ``input_shape`` is ``(C, H, W)`` from the dataset — and
returns an ``nn.Module`` mapping ``float32 (B, C, H, W)`` to logits ``(B, num_classes)``. Classifiers end in an
``nn.Linear`` called ``fc`` whose input is the flattened representation that Soteria prunes and whose weight and
bias gradients the iDLG label rule reads. A new model is one builder plus one line in :data:`MODELS`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.data import to_tensor
from fl_sim.fedkl_models import LeNetKL, ResNet20KL


def _flat_size(features: nn.Module, input_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).flatten(1).shape[1])


class LeNet(nn.Module):
    """The LeNet of DLG (Zhu et al., NeurIPS'19, ``mit-han-lab/dlg`` ``models/vision.py``).

    Three 5×5 convolutions with 12 channels (strides 2, 2, 1; padding 2), each followed by ``act``, then one
    fully-connected layer ``fc`` (588 inputs for 28×28, 768 for 32×32). There is no pooling, so gradients are
    twice differentiable everywhere with smooth activations, which is what makes DLG work.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output size.
        act: activation module class (``nn.Sigmoid`` in the paper; ``nn.Tanh`` trains better under FedSGD).
        uniform_init: when set, weights and biases are drawn from U(−a, a) as in the DLG script (a = 0.5).
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
        self.fc = nn.Linear(_flat_size(self.features, input_shape), num_classes)
        if uniform_init is not None:
            for p in self.parameters():
                nn.init.uniform_(p, -uniform_init, uniform_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class SimpleCNN(nn.Module):
    """A ReLU CNN that trains well (the shape of Flower's PyTorch quickstart ``Net``).

    conv(32, 3×3) → ReLU → max-pool 2 → conv(64, 3×3) → ReLU → max-pool 2 → fc1(128) → ReLU → ``fc``.
    Max-pooling and ReLU make its gradients a poor target for DLG (reported 9–17 dB here).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = _flat_size(self.features, input_shape)
        self.fc1 = nn.Linear(flat, 128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc1(self.features(x).flatten(1))))


#: Model registry: name → builder ``(input_shape (C, H, W), num_classes) -> nn.Module``.
MODELS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "lenet": lambda shape, k: LeNet(shape, k, act=nn.Sigmoid, uniform_init=0.5),
    "lenet-tanh": lambda shape, k: LeNet(shape, k, act=nn.Tanh, uniform_init=None),
    "cnn": SimpleCNN,
    "lenet-kl": LeNetKL,
    "resnet20-kl": ResNet20KL,
}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build model ``name`` for inputs ``(C, H, W)`` and ``num_classes`` outputs.

    Raises:
        KeyError: unknown name (the message lists the registry).
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    return MODELS[name](tuple(input_shape), int(num_classes))


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The final fully-connected layer (``model.fc``, else the last ``nn.Linear``).

    Raises:
        ValueError: the model has no ``nn.Linear``.
    """
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        return fc
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    return linears[-1]


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, mean, std, device: torch.device,
             batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy (0–1) of ``model`` on ``uint8`` images ``x (N, H, W, C)``, labels ``y``."""
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = to_tensor(x[i : i + batch_size], mean, std, device)
            yb = torch.as_tensor(y[i : i + batch_size], device=device)
            out = model(xb)
            total_loss += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    n = max(1, len(x))
    return total_loss / n, correct / n


class ConvNet(nn.Module):
    """A small untrained-friendly ReLU ConvNet for Inverting Gradients (in the spirit of ``inversefed``'s ConvNet).

    conv(32, 3×3) → ReLU → conv(32, 3×3) → ReLU → max-pool 2 → conv(64, 3×3) → ReLU → max-pool 2 → ``fc``.
    All convolutions use padding 1 and biases; no batch norm (so the attack needs no batch statistics). On
    3×32×32 inputs ``fc`` has 64·8·8 = 4,096 inputs.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(_flat_size(self.features, input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class RGAPNet(nn.Module):
    """The networks of R-GAP (Zhu & Blaschko, ICLR'21, ``JunyiZhu-AI/R-GAP`` ``models/``): bias-free layers with
    LeakyReLU(0.2), no pooling.

    ``features`` is a ``Sequential`` of (bias-free conv or linear, LeakyReLU) pairs given by ``spec``; ``fc`` maps
    the flattened features to ``num_classes`` logits. Adaptation to fl-sim's classifier convention: the paper's
    nets end in a single bias-free output unit trained with a logistic loss; here ``fc`` has ``num_classes`` outputs
    and a bias, and training uses softmax cross-entropy. The bias makes the last step of R-GAP exact and
    closed-form (``x = ∇W_i / ∇b_i``) instead of the paper's scalar inversion of ``u·ℓ'(u)``; the convolutional
    part, where the recursion and the rank analysis happen, is the paper's.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output size.
        spec: per hidden layer, ``("conv", out_channels, kernel, stride, padding)`` or ``("linear", out_features)``.
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
                width = _flat_size(nn.Sequential(*layers), input_shape)
                layers += [nn.Linear(width, item[1], bias=False), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(_flat_size(self.features, input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


#: R-GAP's CNN6 (fully recoverable per the paper's rank analysis): 3→12 (4×4, s2, p2), 12→36 (s2), 36→36, 36→36,
#: 36→64 (s2), 64→128; 3×3 kernels with padding 1 unless stated. 3×32×32 → 128×5×5 = 3,200 features.
CNN6_SPEC = (("conv", 12, 4, 2, 2), ("conv", 36, 3, 2, 1), ("conv", 36, 3, 1, 1), ("conv", 36, 3, 1, 1),
             ("conv", 64, 3, 2, 1), ("conv", 128, 3, 1, 1))
#: CNN6-d: CNN6 with a 20-channel second layer, rank-deficient per the paper.
CNN6D_SPEC = (("conv", 12, 4, 2, 2), ("conv", 20, 3, 2, 1), ("conv", 36, 3, 1, 1), ("conv", 36, 3, 1, 1),
              ("conv", 64, 3, 2, 1), ("conv", 128, 3, 1, 1))
#: FCN3: 784 → 1000 → 100 (then ``fc`` to the classes; the paper's third layer is 100 → 1).
FCN3_SPEC = (("linear", 1000), ("linear", 100))

MODELS.update({
    "convnet": ConvNet,
    "cnn6": lambda shape, k: RGAPNet(shape, k, CNN6_SPEC),
    "cnn6-d": lambda shape, k: RGAPNet(shape, k, CNN6D_SPEC),
    "fcn3": lambda shape, k: RGAPNet(shape, k, FCN3_SPEC),
})
