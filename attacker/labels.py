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

from collections.abc import Callable

import torch
from torch import nn

from fl_sim.task.models import classifier_layer


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


def yin_labels(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """Yin et al. (CVPR'21, "See through gradients"): the ``batch_size`` classes with the most negative row minimum
    of ``∇W`` — each label at most once (exact for distinct labels and non-negative features).

    Returns:
        ``int64 (batch_size,)`` sorted labels (classes repeat only when ``batch_size`` exceeds their number).
    """
    order = weight_grad.detach().min(dim=-1).values.argsort().tolist()
    picked = [order[i % len(order)] for i in range(batch_size)]
    return torch.tensor(sorted(picked), dtype=torch.long)


def llg_labels(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, batch_size: int,
               mean_softmax: torch.Tensor, mean_feature_sum: float = 1.0) -> torch.Tensor:
    """Count-based estimate in the style of LLG (Wainakh et al., PETS'22) with a white-box impact estimate.

    With mean-reduced cross-entropy, ``∇b_c = p̄_c − n_c / B`` where ``p̄`` is the batch-mean softmax and ``n_c``
    the count of class ``c``. ``p̄`` is unknown; ``mean_softmax`` estimates it (the model's mean softmax on dummy
    inputs), so ``n_c ≈ B (p̄_c − ∇b_c)``; the counts are rounded by largest remainder to sum to ``B``. Without a
    bias, the row sums of ``∇W`` divided by the mean feature sum stand in for ``∇b`` (valid for features of
    constant sign). Every class with a negative bias-gradient entry is certainly present and gets one label first.

    Returns:
        ``int64 (batch_size,)`` sorted labels.
    """
    g = bias_grad.detach() if bias_grad is not None else weight_grad.detach().sum(-1) / mean_feature_sum
    est = (batch_size * (mean_softmax.to(g.device) - g)).clamp(min=0)
    counts = torch.zeros_like(est)
    # a negative bias-gradient entry proves the class is present (p̄_c >= 0), whatever the activation
    for c in (g.argsort().tolist() if bias_grad is not None else []):
        if g[c] < 0 and counts.sum() < batch_size:
            counts[c] = 1
    rest = batch_size - int(counts.sum())
    if rest > 0:
        extra = (est - counts).clamp(min=0)
        extra = extra * (rest / extra.sum()) if float(extra.sum()) > 0 else torch.full_like(est, rest / len(est))
        base = extra.floor()
        counts += base
        left = batch_size - int(counts.sum())
        if left > 0:
            counts[(extra - base).argsort(descending=True)[:left]] += 1
    labels = [c for c in range(len(counts)) for _ in range(int(counts[c]))]
    return torch.tensor(sorted(labels[:batch_size]), dtype=torch.long)


def _dummy_statistics(model: nn.Module, input_shape: tuple[int, ...], n: int = 32,
                      seed: int = 0) -> tuple[torch.Tensor, float]:
    """Mean softmax ``(C,)`` and mean feature sum (input of the last linear layer) of ``model`` on ``n`` N(0, 1)
    dummy inputs of shape ``input_shape``."""
    fc = classifier_layer(model)
    device = next(model.parameters()).device
    feats: list[torch.Tensor] = []
    hook = fc.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach()))
    try:
        x = torch.randn((n, *input_shape), generator=torch.Generator().manual_seed(seed)).to(device)
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=-1).mean(0)
    finally:
        hook.remove()
    return probs, float(feats[0].flatten(1).sum(1).mean())


def recover_labels(model: nn.Module, grads: list[torch.Tensor], batch_size: int, method: str,
                   input_shape: tuple[int, ...]) -> torch.Tensor:
    """Labels of a batch of ``batch_size`` from the observed gradients with the method ``method``.

    Args:
        model: the global model (its last linear layer is located with :func:`classifier_gradients`).
        grads: gradients aligned with ``model.parameters()`` (updates already converted to gradients).
        batch_size: the number of labels to return.
        method: a key of :data:`LABEL_METHODS` (B = 1 always uses iDLG's exact rule, :func:`idlg_label`).
        input_shape: ``(C, H, W)`` of one input (for methods that probe the model with dummy inputs).

    Returns:
        ``int64 (batch_size,)`` sorted labels, on the CPU.

    Raises:
        KeyError: unknown method.
    """
    if method not in LABEL_METHODS:
        raise KeyError(f"unknown label method {method!r}; allowed: {', '.join(sorted(LABEL_METHODS))}")
    w, b = classifier_gradients(model, grads)
    if batch_size == 1:
        return torch.tensor([idlg_label(w, b)])
    return LABEL_METHODS[method](model, w, b, batch_size, tuple(input_shape)).cpu()


def _llg(model: nn.Module, w: torch.Tensor, b: torch.Tensor | None, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    probs, feat_sum = _dummy_statistics(model, shape)
    return llg_labels(w, b, n, probs, feat_sum)


#: Label-recovery methods for B > 1: name → ``(model, ∇W (C, d), ∇b (C,) or None, B, input_shape) -> labels``.
#: ``bias``: every class with a negative bias gradient, then one ``1/B`` unit at a time (:func:`batch_labels`);
#: ``yin``: row minima of ∇W, distinct labels (:func:`yin_labels`); ``llg``: counts from the bias gradient and the
#: model's mean softmax on dummy data (:func:`llg_labels`); ``auto``: the default, currently ``llg`` (the most
#: accurate of these on fl-sim's models: see ``tests/test_attacks_labels.py``).
LABEL_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "auto": _llg,
    "bias": lambda model, w, b, n, shape: batch_labels(w, b, n),
    "yin": lambda model, w, b, n, shape: yin_labels(w, b, n),
    "llg": _llg,
}

