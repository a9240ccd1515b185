"""DLG and iDLG: gradient matching with L-BFGS.

* ``dlg`` — Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS'19; ``mit-han-lab/dlg`` ``main.py``): dummy images
  ``x'`` and dummy label logits ``y'`` drawn from N(0, 1) are optimised jointly with L-BFGS (lr 1) to minimise
  ``Σ_l ‖∇θ_l ℓ(F(x'), softmax(y')) − g_l‖²``, where ``ℓ`` is cross-entropy against the soft label. No prior, no box.
* ``idlg`` — Improved DLG (Zhao, Mopuri & Bilen 2020, ``iDLG.py``): the label is first read off the last layer's
  gradient (:mod:`attacker.labels`), then only ``x'`` is optimised against hard-label cross-entropy.

Both consume the observed update as an average gradient (:meth:`AttackPayload.gradients`), so on a ``fedsgd``
update they match exactly what the client computed. One "iteration" is one L-BFGS ``step`` (up to ``max_iter`` = 20
closure evaluations inside), as in the original scripts; ``extras["closures"]`` counts the evaluations.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from attacker import matching
from attacker.labels import recover_labels
from attacker.options import AttackOptions
from attacker.payload import AttackPayload, AttackResult, Budget

DEFAULT_ITERATIONS = 200
#: Early stop when ``distance / ‖g‖² < REL_TOL`` (about 80–90 dB on LeNet; float32 bottoms out near 1e-13).
REL_TOL = 1e-10


def _soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``Σ_c −softmax(target)_c · log softmax(logits)_c``."""
    return torch.mean(torch.sum(-F.softmax(target_logits, dim=-1) * F.log_softmax(logits, dim=-1), dim=-1))


def _match(payload: AttackPayload, budget: Budget, joint_labels: bool, options: AttackOptions | None) -> AttackResult:
    start = time.perf_counter()
    options = options or AttackOptions()
    model = payload.build_model()
    target = matching.prepare(payload, model, options)
    params = target.needed_params
    b = payload.batch_size
    target_sq = target.norm_sq or 1.0
    iterations = budget.iterations or DEFAULT_ITERATIONS
    gen = torch.Generator().manual_seed(int(budget.seed))

    if joint_labels:
        fixed_labels = None
    else:
        fixed_labels = recover_labels(model, target.grads, b, options.labels, payload.input_shape)

    best: AttackResult | None = None
    total_iters, closures = 0, 0
    for _restart in range(max(1, budget.restarts)):
        x = torch.randn((b, *payload.input_shape), generator=gen).requires_grad_(True)
        variables = [x]
        y_logits = None
        if joint_labels:
            y_logits = torch.randn((b, payload.num_classes), generator=gen).requires_grad_(True)
            variables.append(y_logits)
        opt = torch.optim.LBFGS(variables, lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                                tolerance_change=1e-14)
        count = [0]

        def distance() -> torch.Tensor:
            out = model(x)
            loss = _soft_cross_entropy(out, y_logits) if joint_labels else F.cross_entropy(out, fixed_labels)
            return target.l2(torch.autograd.grad(loss, params, create_graph=True))

        def closure() -> torch.Tensor:
            opt.zero_grad()
            dist = distance()
            dist.backward()
            count[0] += 1
            return dist

        objective = float("inf")
        for it in range(iterations):
            value = opt.step(closure)
            total_iters += 1
            objective = float(value.detach()) if value is not None else objective
            if not torch.isfinite(x).all():
                break
            if budget.progress is not None and it % 10 == 0:
                budget.progress(it, objective)
            if objective < REL_TOL * target_sq:
                break
            if budget.time_limit_s and time.perf_counter() - start > budget.time_limit_s:
                break
        closures += count[0]
        final = float(distance().detach()) if torch.isfinite(x).all() else float("inf")
        labels = y_logits.detach().argmax(-1) if joint_labels else fixed_labels
        if best is None or final < best.objective:
            best = AttackResult(x.detach().clone(), labels.clone(), 0, 0.0, final)
        if budget.time_limit_s and time.perf_counter() - start > budget.time_limit_s:
            break
    assert best is not None
    best.iterations = total_iters
    best.time_s = time.perf_counter() - start
    best.extras = {"closures": closures}
    return best


def dlg(payload: AttackPayload, budget: Budget, options: AttackOptions | None = None) -> AttackResult:
    """DLG: joint optimisation of images and soft labels (see the module docstring).

    Args:
        payload: the server-visible update; its ``batch_size`` sets the number of dummy images.
        budget: iterations (L-BFGS steps, default 200), restarts, time limit, seed.
        options: adaptive knobs (ignored/weighted layers, mask inference, clipping replication).

    Returns:
        Images ``(B, C, H, W)`` in normalised space and the argmax of the optimised label logits.
    """
    return _match(payload, budget, True, options)


def idlg(payload: AttackPayload, budget: Budget, options: AttackOptions | None = None) -> AttackResult:
    """iDLG: analytic labels from the last layer, then L2 gradient matching on the images only.

    Args:
        payload: the server-visible update.
        budget: iterations (L-BFGS steps, default 200), restarts, time limit, seed.
        options: adaptive knobs (ignored/weighted layers, mask inference, clipping replication).

    Returns:
        Images ``(B, C, H, W)`` in normalised space and the analytic labels.
    """
    return _match(payload, budget, False, options)
