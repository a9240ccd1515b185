"""What every model shares: the classifier-layer convention, a shape probe, and test-set evaluation.

fl-sim's classifiers map ``float32 (B, C, H, W)`` to logits ``(B, num_classes)`` and end in an ``nn.Linear``
(called ``fc`` where the architecture allows) whose input is the flattened representation that Soteria prunes and
whose weight and bias gradients the iDLG label rule reads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.task.datasets.core import to_tensor


def flat_size(features: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Number of features ``features`` produces for one input of ``input_shape`` ``(C, H, W)``, flattened."""
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).flatten(1).shape[1])


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


def batchnorm_buffers(model: nn.Module) -> tuple[str, ...]:
    """State-dict keys of the buffers of every BatchNorm layer of ``model`` (``running_mean``, ``running_var``,
    ``num_batches_tracked``), in ``state_dict`` order; empty for models without BatchNorm."""
    return tuple(f"{name}.{b}" if name else b for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) for b, _ in m.named_buffers(recurse=False))


def evaluate(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, mean: tuple[float, ...],
             std: tuple[float, ...], device: torch.device, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy (0–1) of ``model`` on ``uint8`` images ``x (N, H, W, C)``, labels ``y``.

    ``x`` and ``y`` are NumPy arrays or tensors (e.g. :func:`fl_sim.task.datasets.on_device`'s copy on
    ``device``, so that nothing is copied per call). The model is put in eval mode (BatchNorm uses its running
    statistics).
    """
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
