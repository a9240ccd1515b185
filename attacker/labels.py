"""Label recovery from the gradient of the last fully-connected layer.

For logits ``z = W a + b`` with softmax cross-entropy, ``∂ℓ/∂W_ij = (p_i − 1[i = c]) a_j`` and
``∂ℓ/∂b_i = p_i − 1[i = c]``. For a batch of one, the true class is the only one with a negative bias gradient,
whatever the activation; without a bias, and with non-negative features ``a`` (sigmoid, ReLU), it is the only row of
``∇W`` with a negative sum, which is iDLG's rule (Zhao, Mopuri & Bilen 2020, ``iDLG.py``: ``argmin(sum(dW, -1))``).
The bias form matters for tanh features, which can be negative and break the row-sum rule. The
gradients passed here must be *gradients*, i.e. updates already converted by
:func:`attacker.payload.update_to_gradient` (a weight update has the opposite sign).
"""

from __future__ import annotations

import torch
from torch import nn

from fl_sim.models import classifier_layer


def classifier_gradients(model: nn.Module, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick the final ``nn.Linear``'s weight ``(C, d)`` and bias ``(C,)`` gradients out of ``grads``.

    ``grads`` is aligned with ``model.parameters()``. The bias gradient is ``None`` when the layer has no bias.
    """
    fc = classifier_layer(model)
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    w = grads[ids[id(fc.weight)]]
    b = grads[ids[id(fc.bias)]] if fc.bias is not None else None
    return w, b


def idlg_label(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None = None) -> int:
    """iDLG's analytic label for a batch of one.

    Args:
        weight_grad: ``(C, d)`` gradient of the last layer's weight.
        bias_grad: ``(C,)`` gradient of its bias, or ``None``.

    Returns:
        ``argmin_i (∇b)_i`` when the bias gradient is given (exact for B = 1 with any activation), else
        ``argmin_i Σ_j (∇W)_ij`` (exact for B = 1 and non-negative features).
    """
    if bias_grad is not None:
        return int(bias_grad.argmin())
    return int(weight_grad.sum(dim=-1).argmin())


def batch_labels(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """Labels for a batch of ``batch_size`` (with repetition) from the last layer's gradient.

    B = 1 uses :func:`idlg_label`. For B > 1 every class whose bias gradient is negative is present at least once
    (exact when features are non-negative); the remaining slots go to the classes with the most negative bias
    gradients, one unit of ``-1/B`` (the gradient of one confident sample) at a time — a count-based estimate in the
    spirit of Wainakh et al. 2022. Without a bias, the row minima of ``∇W`` rank the classes (Yin et al. 2021).

    Returns:
        ``int64 (batch_size,)`` sorted labels.
    """
    if batch_size == 1:
        return torch.tensor([idlg_label(weight_grad, bias_grad)])
    score = bias_grad.detach().clone() if bias_grad is not None else weight_grad.detach().min(dim=-1).values
    labels: list[int] = []
    present = torch.nonzero(score < 0).flatten().tolist()
    present.sort(key=lambda c: float(score[c]))
    for c in present[:batch_size]:
        labels.append(c)
        score[c] += 1.0 / batch_size
    while len(labels) < batch_size:
        c = int(score.argmin())
        labels.append(c)
        score[c] += 1.0 / batch_size
    return torch.tensor(sorted(labels), dtype=torch.long)
