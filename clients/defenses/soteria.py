"""Soteria / PLD: prune the fully-connected layer's input representation in its weight gradient.

Paper: Sun, Li, Zhang, Chen, Wang & Chen, "Soteria: Provable Defense against Privacy Leakage in Federated Learning
from Representation Perspective", CVPR 2021 (``jeremy313/Soteria``); "PLD" in the GradDefense talk (seed 001).

Algorithm (as the public code does it, ``GS_attack/reconstruct_image.py``): for the representation
``r = (r_1 … r_d)`` that enters the classifier layer ``fc`` (``model.fc``, else the last ``nn.Linear``), compute for
each sample ``n`` and feature ``i`` the score ``s_{n,i} = ‖∂r_{n,i}/∂x_n‖₂ / (|r_{n,i}| + ε)`` (see below for the sign; the
code — the README's cheap stand-in for ``‖r (∂r/∂x)^{-1}‖``), sum over the batch, take ``τ`` = the ``rate``-th
percentile of the scores and zero the columns ``i`` of ``∇W_fc`` with ``|s_i| < τ``. The bias and every other layer
are untouched. The Jacobian norms are computed in batched form — one backward pass per chunk of features
(:data:`CHUNK` features per backward pass over a replicated batch) instead of the paper
code's one backward per feature — and give the same numbers (a test compares both). The score uses ``|r|`` — the
README's ``‖r‖`` — where the code divides by the signed ``r``: the same for the paper's non-negative features,
while with tanh features the signed form gives negative scores and prunes fewer features than asked
(``defense-soteria-signed=true`` restores it). Applied to every local step's
gradient (as Plato does), so the mask is always computed on the data that produced the gradient.

Parameters (run-config keys):
    ``defense-soteria-rate`` (70.0): percent of the features pruned (GradDefense's PoC of Soteria uses 70, the
    Soteria GS example 60).
    ``defense-soteria-eps`` (0.1): ``ε`` in the score's denominator (0.1 in the GS code and GradDefense's PoC; 0
    in the DLG notebook).
    ``defense-soteria-signed`` (false): divide by the signed ``r`` as the public code does.
    ``defense-soteria-every`` (1): recompute the feature mask every N local steps of a round (1 = every step, as
    above; 0 = once per round, on its first batch); the steps in between apply the last mask computed in this round.
    A deviation for multi-step local training only (the paper and its code defend one gradient): the mask costs
    ~400 training steps at B = 32 on LeNet, so a converged FedAvg run (hundreds of steps per round) is out of reach
    with a mask per step; the first step of every round — and a FedSGD update, or a probe, which are one step —
    always gets its own mask.

What the server must know: nothing (plain FedAvg).

Known breaks: muting the defended layer — leaving ``∇W_fc`` out of the gradient-matching loss and matching the other
layers as usual (Bayes framework, ``remove_defense``; GradDefense PoC ``indices='rl'``; "PLD-muted" in seed 001,
19.8 dB on Fashion-MNIST); mask inference — reading the mask from the zero columns of the observed ``∇W_fc`` and
applying it to the trial gradient (GGL). With tanh features, ``r + ε`` can be near 0 or negative, which inflates or
flips scores (hence ``|r|`` by default).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clients.defenses.base import Defense, StepContext
from clients.defenses.prune import percentile
from fl_sim.task.keys import Key
from fl_sim.task.models import classifier_layer

KEYS = {
    "defense-soteria-rate": Key(70.0, "soteria: percent of the FC layer's input features pruned", low=0, high=100),
    "defense-soteria-eps": Key(0.1, "soteria: epsilon in the score's denominator ||dr/dx|| / (r + eps)", low=0),
    "defense-soteria-signed": Key(False, "soteria: divide by the signed r as the public code does (default |r|)"),
    "defense-soteria-every": Key(1, "soteria: recompute the feature mask every N local steps of a round (1 = every "
                                    "step; 0 = once per round, on its first batch; the steps between reuse it)",
                                 low=0),
}


@dataclass(frozen=True)
class Params:
    """Soteria's parameters: ``rate`` (percent of features pruned), ``eps``, ``signed``, ``every`` (see the module
    docstring)."""

    rate: float
    eps: float
    signed: bool
    every: int = 1

#: Features per backward pass at most.
CHUNK = 128
#: Images per replicated backward pass at most (``features per pass × B``), which bounds activation memory.
MAX_COPIES = 1024


@contextlib.contextmanager
def _buffers_kept(model: nn.Module):
    """Restore the model's buffers (BatchNorm running statistics) after the extra forward passes."""
    saved = {k: v.clone() for k, v in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k])


def _representation(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``x`` (made to require grad) and return ``(x, r)`` with ``r (B, d)`` the classifier layer's input."""
    fc = classifier_layer(model)
    store: dict[str, torch.Tensor] = {}
    handle = fc.register_forward_hook(lambda m, inp, out: store.__setitem__("r", inp[0]))
    try:
        x = x.detach().clone().requires_grad_(True)
        model(x)
    finally:
        handle.remove()
    return x, store["r"].flatten(1)


def _couples_samples(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def jacobian_norms(model: nn.Module, x: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-feature ``‖∂(Σ_n r_{n,i})/∂x_m‖₂`` for the classifier layer's input ``r`` — batched.

    For each feature ``i`` this is the paper code's backward of ``r`` with a one-hot column ``i`` as
    ``grad_outputs``; features are done ``chunk`` at a time in one backward pass: the batch is replicated ``chunk``
    times and copy ``j`` receives the one-hot of feature ``start + j`` (exact when samples do not interact). Models
    with train-mode BatchNorm (which couples the copies) use ``autograd.grad(..., is_grads_batched=True)`` on the
    original batch instead. The model's buffers are restored afterwards.

    Args:
        model: the model (its mode is kept).
        x: ``float32 (B, C, H, W)`` batch.
        chunk: features per backward pass.

    Returns:
        ``(norms, r)``: ``norms (B, d)`` and the representation ``r (B, d)`` (detached); when samples do not
        interact row ``m`` of ``norms`` is ``‖∂r_{m,i}/∂x_m‖₂``.
    """
    b = x.shape[0]
    with _buffers_kept(model):
        if _couples_samples(model):
            xg, r = _representation(model, x)
            d = r.shape[1]
            norms = torch.empty(b, d, device=r.device, dtype=r.dtype)
            for start in range(0, d, chunk):
                stop = min(d, start + chunk)
                basis = torch.zeros(stop - start, b, d, device=r.device, dtype=r.dtype)
                basis[torch.arange(stop - start), :, torch.arange(start, stop)] = 1.0
                (jac,) = torch.autograd.grad(r, xg, grad_outputs=basis, retain_graph=stop < d, is_grads_batched=True)
                norms[:, start:stop] = jac.flatten(2).norm(dim=2).T
            return norms, r.detach()
        with torch.no_grad():
            _, r0 = _representation(model, x)
        d = r0.shape[1]
        k = max(1, min(chunk, d, MAX_COPIES // b))
        xg, r = _representation(model, x.repeat(k, *([1] * (x.dim() - 1))))  # copy j = rows j*B .. j*B+B-1
        norms = torch.empty(b, d, device=r.device, dtype=r.dtype)
        rows = torch.arange(k, device=r.device)
        for start in range(0, d, k):
            stop = min(d, start + k)
            basis = torch.zeros(k, b, d, device=r.device, dtype=r.dtype)
            basis[rows[: stop - start], :, torch.arange(start, stop, device=r.device)] = 1.0
            (jac,) = torch.autograd.grad(r, xg, grad_outputs=basis.reshape(k * b, d), retain_graph=stop < d)
            norms[:, start:stop] = jac.reshape(k, b, -1).norm(dim=2)[: stop - start].T
        return norms, r0.detach()


def jacobian_norms_loop(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one backward pass per feature, as in Soteria's code (for tests; slow)."""
    with _buffers_kept(model):
        x, r = _representation(model, x)
        b, d = r.shape
        norms = torch.empty(b, d, device=r.device, dtype=r.dtype)
        for i in range(d):
            onehot = torch.zeros_like(r)
            onehot[:, i] = 1.0
            (jac,) = torch.autograd.grad(r, x, grad_outputs=onehot, retain_graph=i < d - 1)
            norms[:, i] = jac.flatten(1).norm(dim=1)
    return norms, r.detach()


def scores(norms: torch.Tensor, r: torch.Tensor, eps: float, signed: bool = False) -> torch.Tensor:
    """Soteria's per-feature score ``Σ_n ‖∂r_{n,i}/∂x_n‖ / (|r_{n,i}| + ε)``, shape ``(d,)``.

    ``signed=True`` divides by ``r_{n,i} + ε`` as the public code does (identical for the paper's non-negative
    sigmoid/ReLU features; with tanh features it yields negative scores whose large magnitudes survive the
    ``|s| < τ`` test, so fewer than ``rate`` % of the features get pruned).
    """
    return (norms / ((r if signed else r.abs()) + eps)).sum(dim=0)


def feature_mask(score: torch.Tensor, rate: float) -> torch.Tensor:
    """``1`` for features kept, ``0`` for the pruned ones (``|s_i| < τ``, ``τ`` = ``rate``-th percentile of ``s``)."""
    if rate <= 0:
        return torch.ones_like(score)
    finite = torch.nan_to_num(score, nan=0.0, posinf=torch.finfo(score.dtype).max, neginf=torch.finfo(score.dtype).min)
    tau = percentile(finite, rate)
    return (finite.abs() >= tau).to(score.dtype)


def defended_index(model: nn.Module) -> int:
    """Index, in ``model.parameters()`` order, of the classifier layer's weight (the defended gradient)."""
    fc = classifier_layer(model)
    return next(i for i, p in enumerate(model.parameters()) if p is fc.weight)


#: The mask last computed for a model during its round (``defense-soteria-every`` != 1); a round's model object lives
#: for that round only, so an entry never outlives it (and never reaches ``Context.state`` or a message).
_ROUND_MASKS: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def _fresh_mask(p: Params, step: int) -> bool:
    """Whether local step ``step`` (0-based) computes its own mask under ``every`` (step 0 always does)."""
    return step == 0 or (p.every > 0 and step % p.every == 0)


def apply(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """Mask the columns of the classifier weight's gradient by Soteria's feature scores on this step's batch (or, with
    ``defense-soteria-every`` != 1 between recomputations, by the mask last computed in this round)."""
    p: Params = ctx.params
    mask = None if _fresh_mask(p, ctx.step) else _ROUND_MASKS.get(ctx.model)
    if mask is None:
        norms, r = jacobian_norms(ctx.model, ctx.x)
        mask = feature_mask(scores(norms, r, p.eps, p.signed), p.rate)
        if p.every != 1:
            _ROUND_MASKS[ctx.model] = mask
    i = defended_index(ctx.model)
    out = list(grads)
    out[i] = grads[i] * mask.to(grads[i].dtype)[None, :]
    ctx.info["soteria-pruned"] = float(np.round(1.0 - float(mask.mean()), 6))
    return out


DEFENSE = Defense("Soteria/PLD: prune the FC input representation (Sun et al., CVPR'21)", apply, KEYS, Params,
                  "defense-soteria-", metrics=("soteria-pruned",))
