"""Label recovery from the gradient of the last fully-connected layer.

For logits ``z = W a + b`` with softmax cross-entropy, ``∂ℓ/∂W_ij = (p_i − 1[i = c]) a_j`` and
``∂ℓ/∂b_i = p_i − 1[i = c]``. For a batch of one, the true class is the only one with a negative bias gradient,
whatever the activation; without a bias, and with non-negative features ``a`` (sigmoid, ReLU), it is the only row of
``∇W`` with a negative sum, which is iDLG's rule (Zhao, Mopuri & Bilen 2020, ``iDLG.py``: ``argmin(sum(dW, -1))``).
The bias form matters for tanh features, which can be negative and break the row-sum rule. The
gradients passed here must be *gradients*, i.e. updates already converted by
:func:`attacker.payload.update_to_gradient` (a weight update has the opposite sign).

For batches (B > 1) :data:`LABEL_METHODS` lists the methods; ``ilrg`` (:func:`ilrg_counts`, Ma et al. ICLR'23) is
the one built for large batches. How a recovered label multiset is judged (the label benchmark
``benchmarks/bench_labels.py`` and ``tests/test_attacks_labels.py`` report them; pure functions of two label
lists, no ground truth ever reaches an attack): :func:`label_count_accuracy` (counts, with multiplicity),
:func:`class_count_accuracy` (classes whose count is exact) and :func:`label_set_accuracy` (which classes occur).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fl_sim.task.models import classifier_layer

#: iLRG's class-mean estimate is used for class ``j`` only when its own samples' net pull on the bias gradient,
#: ``−K ∇b_j``, is at least this multiple of the pull ``K p̄_j`` of the whole batch; see :func:`ilrg_counts`.
ILRG_DOMINANCE = 1.0


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


def round_counts(raw: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Non-negative integer counts summing to ``batch_size`` from real-valued estimates ``raw (C,)``.

    As iLRG's code (``methods.py:iLRG``, its ``mod_res``): negatives → 0, round, counts above ``batch_size`` → 0;
    then, while the sum is off, the counts with the largest rounding error move by one towards their raw value.

    Returns:
        ``int64 (C,)``.
    """
    raw = torch.nan_to_num(raw.detach().double().cpu(), nan=0.0, posinf=float(batch_size), neginf=0.0)
    pos = raw.clamp(min=0)
    counts = pos.round()
    counts[counts > batch_size] = 0
    for _ in range(4 * batch_size):  # at most batch_size moves are needed; the bound only guards the loop
        excess = int(counts.sum()) - batch_size
        if excess == 0:
            break
        err = counts - pos
        if excess > 0:
            err[counts == 0] = -math.inf  # never below zero
            idx = err.argsort(descending=True)[: min(excess, int((counts > 0).sum()))]
            counts[idx] -= 1
        else:
            idx = err.argsort()[: -excess]
            counts[idx] += 1
    return counts.long()


def counts_to_labels(counts: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``int64 (batch_size,)`` sorted labels holding class ``c`` ``counts[c]`` times."""
    labels = [c for c in range(len(counts)) for _ in range(int(counts[c]))]
    return torch.tensor(sorted(labels[:batch_size]), dtype=torch.long)


def ilrg_counts(weight_grad: torch.Tensor, bias_grad: torch.Tensor, fc: nn.Linear, batch_size: int,
                mean_softmax: torch.Tensor | None = None, dominance: float = ILRG_DOMINANCE) -> torch.Tensor:
    """Per-class counts by iLRG (Ma et al., "Instance-wise Batch Label Restoration via Gradients in Federated
    Learning", ICLR 2023; ``BUAA-CST/iLRG`` ``methods.py:get_emb, iLRG``, ``utils.py:post_process_emb``).

    With mean-reduced cross-entropy over a batch of ``K`` samples, ``K ∇b_i = Σ_k (p_ki − 1[y_k = i])``. iLRG
    approximates the mean softmax of the class-``j`` samples by ``p̂_j = softmax(fc(ê_j))`` with the class-mean
    embedding ``ê_j = ∇W_j / ∇b_j`` (exact when only class ``j`` contributes to row ``j``; for an untrained model
    ``p_kj ≪ 1``), and solves the linear system ``Σ_j n_j (p̂_{j,i} − δ_ij) = K ∇b_i`` (every class ``i``) plus
    ``Σ_j n_j = K`` with the Moore–Penrose pseudo-inverse; :func:`round_counts` makes the result integer.

    **Deviation (``mean_softmax`` given):** ``ê_j = Σ_k (p_kj − 1[y_k = j]) h_k / Σ_k (p_kj − 1[y_k = j])``
    mixes the class-``j`` embeddings (weight ``p − 1``) with everyone's (weight ``p``), and its denominator
    ``K ∇b_j = K p̄_j − n_j`` is near zero whenever a class's count is close to ``K p̄_j`` — the common case with
    few classes and large batches (10 classes, K = 64: iLRG's own log has 0.598 class-count accuracy on MNIST at
    K = 64; here the paper's rule reaches 0.958 label-count / 0.600 class-count accuracy on lenet-tanh,
    ``benchmarks/bench_labels.py``). Rows where class ``j`` does not dominate, ``−K ∇b_j < dominance · K p̄_j``
    with ``p̄ = mean_softmax``, use ``mean_softmax`` (the model's mean softmax on dummy inputs, LLG's and Geng et
    al.'s estimate) instead of ``p̂_j``; with many classes (100, K = 24) every present class dominates and the
    result is the paper's. With ``mean_softmax=None`` every row uses ``p̂_j``, as the paper does. In float64.

    Args:
        weight_grad: ``(C, d)`` gradient of the last layer's weight.
        bias_grad: ``(C,)`` gradient of its bias.
        fc: the last layer (its weight and bias give ``p̂_j``).
        batch_size: ``K``.
        mean_softmax: ``(C,)`` fallback estimate of the mean softmax, or ``None`` (the paper's method).
        dominance: the fallback is used where ``−K ∇b_j < dominance · K · mean_softmax_j``.

    Returns:
        ``int64 (C,)`` counts summing to ``batch_size``.
    """
    w = weight_grad.detach().double().cpu()
    b = bias_grad.detach().double().cpu()
    k, c = int(batch_size), len(b)
    safe = torch.where(b == 0, torch.full_like(b, 1e-300), b)
    emb = w / safe[:, None]
    with torch.no_grad():
        logits = torch.nn.functional.linear(emb, fc.weight.detach().double().cpu(), fc.bias.detach().double().cpu())
        probs = torch.softmax(torch.nan_to_num(logits, nan=0.0, posinf=1e300, neginf=-1e300), dim=-1)  # (C, C)
    if mean_softmax is not None:
        weak = -k * b < dominance * k * mean_softmax.detach().double().cpu()
        probs[weak] = mean_softmax.detach().double().cpu()
    coefs = torch.cat([(probs - torch.eye(c, dtype=probs.dtype)).T, torch.ones(1, c, dtype=probs.dtype)])
    values = torch.cat([k * b, torch.tensor([float(k)], dtype=b.dtype)])
    raw = torch.linalg.pinv(coefs) @ values
    return round_counts(raw, k)


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


def _ilrg(model: nn.Module, w: torch.Tensor, b: torch.Tensor | None, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    if b is None:  # iLRG needs the bias gradient; without it the row sums of ∇W stand in (LLG)
        return _llg(model, w, b, n, shape)
    probs, _ = _dummy_statistics(model, shape)
    return counts_to_labels(ilrg_counts(w, b, classifier_layer(model), n, probs), n)


def label_count_accuracy(recovered: torch.Tensor | list[int], true: torch.Tensor | list[int]) -> float:
    """Label-count accuracy: ``Σ_c min(n̂_c, n_c) / B`` — the fraction of the batch's ``B`` labels recovered with
    their multiplicity (iLRG's "IRec"; the evaluator's ``label_accuracy``, :func:`strategies.metrics.label_accuracy`).
    1 means every class count is exact."""
    rec, tru = _bincounts(recovered, true)
    return float(torch.minimum(rec, tru).sum()) / max(1, int(tru.sum()))


def class_count_accuracy(recovered: torch.Tensor | list[int], true: torch.Tensor | list[int],
                         num_classes: int) -> float:
    """Fraction of the ``num_classes`` classes whose count is exact, absent classes included (iLRG's "LnAcc")."""
    rec, tru = _bincounts(recovered, true, num_classes)
    return float((rec == tru).double().mean())


def label_set_accuracy(recovered: torch.Tensor | list[int], true: torch.Tensor | list[int],
                       num_classes: int) -> float:
    """Label-set accuracy: the fraction of the ``num_classes`` classes whose presence in the batch is recovered
    right (present and recovered, or absent and not recovered; iLRG's "LeAcc")."""
    rec, tru = _bincounts(recovered, true, num_classes)
    return float(((rec > 0) == (tru > 0)).double().mean())


def _bincounts(recovered, true, num_classes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rec = torch.as_tensor(recovered, dtype=torch.long).flatten()
    tru = torch.as_tensor(true, dtype=torch.long).flatten()
    size = max(num_classes, int(rec.max()) + 1 if len(rec) else 0, int(tru.max()) + 1 if len(tru) else 0)
    return torch.bincount(rec, minlength=size), torch.bincount(tru, minlength=size)


#: Label-recovery methods for B > 1: name → ``(model, ∇W (C, d), ∇b (C,) or None, B, input_shape) -> labels``.
#: ``bias``: every class with a negative bias gradient, then one ``1/B`` unit at a time (:func:`batch_labels`);
#: ``yin``: row minima of ∇W, distinct labels (:func:`yin_labels`); ``llg``: counts from the bias gradient and the
#: model's mean softmax on dummy data (:func:`llg_labels`); ``ilrg``: iLRG's linear system with class-mean softmax
#: estimates where they are well conditioned (:func:`ilrg_counts`); ``auto``: the default, currently ``llg`` (the
#: most accurate of these on fl-sim's default model: see ``tests/test_attacks_labels.py`` and
#: ``benchmarks/bench_labels.py``).
LABEL_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "auto": _llg,
    "bias": lambda model, w, b, n, shape: batch_labels(w, b, n),
    "yin": lambda model, w, b, n, shape: yin_labels(w, b, n),
    "llg": _llg,
    "ilrg": _ilrg,
}

