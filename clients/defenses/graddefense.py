"""GradDefense: sensitivity-balanced slicing and random perturbation of M of S slices (client side).

Paper: Wang, Guo, Xie & Qi, "Protect Privacy from Gradient Leakage Attack in Federated Learning", IEEE INFOCOM 2022
(``wangjunxiao/GradDefense``; seed 001 "Ours"). The server side — global update compensation by Marchenko–Pastur
eigen-filtering — is :func:`strategies.steps.graddefense.compensate`.

Client side, on every local step's gradient (``P`` entries in parameter order):

1. **Sensitivity** (``sensitivity.py``) from a root set — ``defense-gd-root-per-class`` samples of each class, the
   first of this client's partition: ``L = CE(f(x_root), y_root)``, ``G_l = ∂L/∂θ_l`` (with graph),
   ``s_l = mean_b ‖∂(Σ G_l)/∂x_b‖₂`` — one scalar per parameter tensor. Computed on the current model at the
   client's first round and then every ``defense-gd-sensitivity-every`` rounds (kept in ``Context.state``).
   Note (as in the public code): for a softmax cross-entropy classifier ``Σ_ij ∂L/∂W_ij = (Σ_i (p_i − y_i)) Σ_j r_j
   = 0``, so the last layer's weight and bias get a sensitivity of ~0 and end up, whole, in the last slice — which
   goes out unperturbed with probability ``1 − M/S`` (one upload in two at the defaults), handing the attacker a
   clean classifier gradient (for one image it gives the representation ``r`` exactly).
   ``defense-gd-sensitivity=jacobian`` (deviation from the public code) replaces the ones vector by ``K =
   defense-gd-probes`` random ±1 probes and so estimates the Jacobian's Frobenius norm ``mean_b ‖∂G_l/∂x_b‖_F``
   (Hutchinson) — the norm of the Jacobian that the ones-vector product stands in for — which has no cancellation: on ``lenet-tanh`` the
   classifier weight then carries ~38 % of the total sensitivity and spreads over ~4 of the 10 slices. Costs ``K``
   VJPs per tensor instead of one (0.5 s for 50 root images on ``lenet-tanh`` here, 5 s on ``convnet``, once per
   ``defense-gd-sensitivity-every`` rounds); the probes come from the client's private step generator.
2. **Slicing**: every entry of tensor ``l`` carries ``s_l / n_l``; the flattened gradient is cut into ``S``
   contiguous slices of equal cumulative sensitivity. The public code packs ``gcd``-sized atoms greedily with
   inclusive boundaries (slices overlap by one entry, and a heavy tiny tensor can collapse slices to one entry);
   here the entry at which the cumulative sensitivity reaches ``k/S`` of the total starts slice ``k`` (the same
   rule with one-entry atoms and global targets); slices do not overlap and each keeps >= 1 entry.
3. **Selection**: ``M`` of the ``S`` slices uniformly at random per step (from the client's step-seeded generator;
   the choice never leaves the client).
4. **Perturbation**: i.i.d. ``N(0, σ²)`` on every entry of the selected slices; the others are sent as computed.
5. **Optional clipping** (``clip.py``): per-sample gradients (``torch.func``), each sample's part in each selected
   slice clipped to L2 norm ``defense-gd-clip-bound`` (0 = ``σ``, as the code ties it), averaged, then noised.

Parameters (run-config keys, defaults):
    ``defense-gd-slices`` S (10), ``defense-gd-perturb-slices`` M (5), ``defense-gd-sigma`` σ (0.1),
    ``defense-gd-clip`` (false), ``defense-gd-clip-bound`` (0 = σ), ``defense-gd-root-per-class`` (5),
    ``defense-gd-sensitivity-every`` (50 rounds; 0 = only at the first round), ``defense-gd-sensitivity``
    ("public" = the paper's code; "jacobian"), ``defense-gd-probes`` K (8, for "jacobian"), and for the server
    ``defense-gd-compensation`` (true), ``defense-gd-q`` Q (6.0), ``defense-gd-noise-variance`` ("mean"),
    ``defense-gd-reshape`` ("pad"), ``defense-gd-keep-below`` (false).
    The public demos use S=10, M=5 with σ=5e-4 (CIFAR-10 batch 32) and Plato σ=0.01; σ=0.1 is what stops iDLG on a
    single Fashion-MNIST image here (see the README section).

What the server must know: σ, S, M, Q, the number of clients and their weights, the learning rate and local steps
it sent — all public; never the sensitivities, the slices chosen or the noise.

Known breaks (none shown in public code; candidates): noise-aware matching that down-weights or drops the
high-variance slices (half of the slices are clean in each upload at M/S = 0.5), generative priors (GGL), diffusion
denoising of perturbed gradients (arXiv 2407.05285). Muting one layer does not help the attacker: the perturbed
slices move at random (seed 001: "Ours" vs the muted-layer attack).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord

from clients.defenses.base import Defense, StepContext, per_sample_gradients
from fl_sim.task.datasets import to_tensor
from fl_sim.task.keys import ConfigError, Key

STATE_KEY = "graddefense"

#: GradDefense's keys: the client side (slices, noise, clipping, sensitivity) and the server's compensation
#: (``strategies/steps/graddefense.py`` reads them from :class:`Params`; all public).
KEYS = {
    "defense-gd-slices": Key(10, "graddefense: number of slices S", low=1),
    "defense-gd-perturb-slices": Key(5, "graddefense: slices perturbed per step M (<= S)", low=0),
    "defense-gd-sigma": Key(0.1, "graddefense: std of the Gaussian noise on the perturbed slices", low=0),
    "defense-gd-clip": Key(False, "graddefense: clip each sample's part of each perturbed slice (per-sample "
                                  "gradients)"),
    "defense-gd-clip-bound": Key(0.0, "graddefense: per-sample slice clipping bound (0 = sigma, as the paper's code)",
                                 low=0),
    "defense-gd-root-per-class": Key(5, "graddefense: root-set samples per class for the layer sensitivity", low=1),
    "defense-gd-sensitivity-every": Key(50, "graddefense: recompute the sensitivity every N rounds (0 = once)",
                                        low=0),
    "defense-gd-sensitivity": Key("public", "graddefense: layer sensitivity: public = ||d(sum dL/dtheta_l)/dx|| as the "
                                            "paper's code (~0 for the classifier layer), jacobian = Hutchinson "
                                            "estimate of the Jacobian's Frobenius norm ||d(dL/dtheta_l)/dx||_F",
                                  choices=("public", "jacobian")),
    "defense-gd-probes": Key(8, "graddefense: random +-1 probes per tensor for defense-gd-sensitivity=jacobian",
                             low=1),
    "defense-gd-compensation": Key(True, "graddefense: server-side Marchenko-Pastur compensation of the aggregate"),
    "defense-gd-q": Key(6.0, "graddefense: aspect ratio Q = V/W of the compensation matrix", low=1),
    "defense-gd-noise-variance": Key("mean", "graddefense: noise variance the compensation assumes: mean = of the "
                                             "weighted mean (correct), sum = K(M/S)sigma^2 (the paper's code)",
                                     choices=("mean", "sum")),
    "defense-gd-reshape": Key("pad", "graddefense: V x W reshape: pad = zero-pad to W = floor(sqrt(P/Q)), "
                                     "divisor = exact divisor of P (the paper's code)", choices=("pad", "divisor")),
    "defense-gd-keep-below": Key(False, "graddefense: compensation also keeps eigenvectors below the noise bulk "
                                        "(the paper's code)"),
}


@dataclass(frozen=True)
class Params:
    """GradDefense's parameters (the ``defense-gd-*`` keys, see the module docstring).

    Raises:
        ConfigError: ``perturb_slices > slices``.
    """

    slices: int
    perturb_slices: int
    sigma: float
    clip: bool
    clip_bound: float
    root_per_class: int
    sensitivity_every: int
    sensitivity: str
    probes: int
    compensation: bool
    q: float
    noise_variance: str
    reshape: str
    keep_below: bool

    def __post_init__(self) -> None:
        if self.perturb_slices > self.slices:
            raise ConfigError(f"defense-gd-perturb-slices={self.perturb_slices} is not allowed; it must be "
                              f"<= defense-gd-slices={self.slices}")


def root_indices(labels: np.ndarray, partition: np.ndarray, per_class: int) -> np.ndarray:
    """The root set: the first ``per_class`` samples of each class present in ``partition`` (partition order).

    Args:
        labels: ``int64 (N,)`` labels of the whole training split.
        partition: ``int64`` indices of this client's samples.
        per_class: samples per class (>= 1).

    Returns:
        ``int64`` indices into the training split, grouped by class.
    """
    ys = labels[partition]
    out = [partition[ys == c][:per_class] for c in np.unique(ys)]
    return np.concatenate(out) if out else partition[:0]


def probe_norms(g: torch.Tensor, x: torch.Tensor, probes: int, gen: torch.Generator,
                retain_graph: bool = True) -> torch.Tensor:
    """Hutchinson estimate of each sample's ``‖J_b‖_F`` with ``J_b = ∂g/∂x_b`` (``g`` a function of ``x``, with graph).

    For Rademacher probes ``v`` (i.i.d. ±1, the shape of ``g``), ``E_v ‖J_bᵀ v‖² = ‖J_b‖_F²`` (Hutchinson 1990); one
    vector–Jacobian product ``∂⟨v, g⟩/∂x`` per probe gives ``J_bᵀ v`` for every sample ``b`` at once. The estimate is
    ``sqrt(mean_k ‖J_bᵀ v_k‖²)``. With ``K`` probes the squared norm's variance is
    ``2(‖A‖_F² − Σ_i A_ii²)/K`` for ``A = J_b J_bᵀ`` (Avron & Toledo, J. ACM 2011), so its relative standard error
    is at most ``sqrt(2/K)`` and the norm's about ``1/sqrt(2K)`` (at most 25 % for the default ``K = 8``; far less
    when ``J_b`` is not close to rank one, as for a whole layer: a test checks it against the brute-force norm).

    Args:
        g: a gradient tensor built with ``create_graph=True`` from a loss of ``x``.
        x: ``float32 (B, ...)`` input that requires grad.
        probes: ``K`` >= 1.
        gen: CPU generator for the probes (the client's private step generator).
        retain_graph: keep the graph after the last probe (for further layers).

    Returns:
        ``float32 (B,)`` estimated Frobenius norms (zeros when ``g`` does not depend on ``x``).
    """
    if not g.requires_grad:
        return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    sq = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for k in range(probes):
        v = torch.randint(0, 2, tuple(g.shape), generator=gen).to(g.device, g.dtype) * 2 - 1
        (jx,) = torch.autograd.grad(g, x, grad_outputs=v, retain_graph=retain_graph or k < probes - 1,
                                    allow_unused=True)
        if jx is None:
            return sq
        sq = sq + jx.detach().flatten(1).pow(2).sum(dim=1)
    return (sq / probes).sqrt()


def layer_sensitivity(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, method: str = "public",
                      probes: int = 8, gen: torch.Generator | None = None) -> list[float]:
    """GradDefense's per-tensor sensitivity ``s_l = mean_b ‖∂G_l/∂x_b‖`` with ``G_l = ∂L/∂θ_l``, ``L = CE`` (batch mean).

    ``method="public"`` is ``sensitivity.py``: one vector–Jacobian product against a vector of ones,
    ``s_l = mean_b ‖∂(Σ G_l)/∂x_b‖₂``. For the softmax classifier layer ``Σ_ij G_ij = Σ_b (Σ_i (p_bi − y_bi)) Σ_j r_bj
    / B = 0`` identically (and ``Σ_i ∂L/∂b_i = 0``), so its sensitivity is 0 up to rounding (~1e-9).
    ``method="jacobian"`` estimates the Frobenius norm ``s_l = mean_b ‖∂G_l/∂x_b‖_F`` with ``probes`` Rademacher
    probes (:func:`probe_norms`; the same VJP with random ±1 vectors instead of the ones vector), which has no such
    cancellation. The model's buffers (BatchNorm running statistics) are left as they were.

    Args:
        model: the current model (its mode is kept).
        x: root-set images ``float32 (B, C, H, W)``.
        y: root-set labels ``int64 (B,)``.
        method: ``"public"`` or ``"jacobian"``.
        probes: probes per tensor for ``"jacobian"``.
        gen: CPU generator for the probes (required for ``"jacobian"``).

    Returns:
        One float per trainable parameter, in ``model.parameters()`` order (units of ``∂²L/∂θ∂x``).

    Raises:
        ValueError: an unknown method, or ``"jacobian"`` without a generator.
    """
    if method not in ("public", "jacobian"):
        raise ValueError(f"unknown sensitivity method {method!r}")
    if method == "jacobian" and gen is None:
        raise ValueError("the jacobian sensitivity needs a generator for its probes")
    saved = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        x = x.detach().clone().requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
    finally:
        with torch.no_grad():  # the extra train-mode forward must not move BatchNorm statistics
            for k, v in model.named_buffers():
                v.copy_(saved[k])
    out = []
    for k, g in enumerate(grads):
        retain = k < len(grads) - 1
        if method == "jacobian":
            out.append(float(probe_norms(g, x, probes, gen, retain).mean()))
            continue
        (jx,) = torch.autograd.grad(g.sum(), x, retain_graph=retain, allow_unused=True)
        out.append(0.0 if jx is None else float(jx.flatten(1).norm(dim=1).mean()))
    return out


def slice_bounds(sizes: list[int], sens: list[float], num_slices: int) -> np.ndarray:
    """Cut ``P = Σ sizes`` flattened entries into ``num_slices`` contiguous slices of equal total sensitivity.

    Entry ``j`` of tensor ``l`` carries ``sens[l] / sizes[l]``; slice ``k`` is ``[b_k, b_{k+1})`` where ``b_k`` is the
    first entry at which the cumulative sensitivity reaches ``k / S`` of the total. Boundaries are then made strictly
    increasing so every slice holds at least one entry (needs ``P >= S``). All-zero sensitivities give equal sizes.

    Returns:
        ``int64 (S + 1,)`` boundaries with ``b_0 = 0`` and ``b_S = P``.

    Raises:
        ValueError: fewer entries than slices, or mismatched lists.
    """
    if len(sizes) != len(sens):
        raise ValueError(f"{len(sizes)} tensor sizes but {len(sens)} sensitivities")
    total = int(sum(sizes))
    if num_slices < 1 or total < num_slices:
        raise ValueError(f"cannot cut {total} entries into {num_slices} slices")
    density = np.concatenate([np.full(n, max(s, 0.0) / n) for n, s in zip(sizes, sens)])
    if density.sum() <= 0:
        density = np.ones(total)
    cum = np.cumsum(density)
    targets = cum[-1] * np.arange(1, num_slices) / num_slices
    inner = np.searchsorted(cum, targets, side="left")  # the entry that reaches the target starts a slice
    bounds = np.concatenate([[0], inner, [total]]).astype(np.int64)
    for k in range(1, num_slices):  # at least one entry per slice, from the left ...
        bounds[k] = max(bounds[k], bounds[k - 1] + 1)
    for k in range(num_slices - 1, 0, -1):  # ... and room for the slices on the right
        bounds[k] = min(bounds[k], bounds[k + 1] - 1)
    return bounds


@functools.lru_cache(maxsize=64)
def cached_slice_bounds(sizes: tuple[int, ...], sens: tuple[float, ...], num_slices: int) -> np.ndarray:
    """:func:`slice_bounds`, computed once per (sizes, sensitivities, S) in this process (read-only array).

    The sensitivities change only when they are recomputed (``defense-gd-sensitivity-every``), so every local step
    in between reuses the same boundaries instead of rebuilding the ``(P,)`` density and its cumulative sum.
    """
    bounds = slice_bounds(list(sizes), list(sens), num_slices)
    bounds.setflags(write=False)
    return bounds


def slice_mask(bounds: np.ndarray, chosen: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(P,)`` mask of the entries in the ``chosen`` slices (``[b_k, b_{k+1})`` for each chosen ``k``).

    Set range by range (M slice assignments) rather than by bucketing every entry's slice id: the same mask.
    """
    mask = torch.zeros(total, dtype=torch.bool, device=device)
    for k in chosen.tolist():
        mask[int(bounds[k]) : int(bounds[k + 1])] = True
    return mask


def _sensitivities(ctx: StepContext) -> list[float]:
    """This client's cached sensitivities, recomputed on schedule (first round, then every N rounds)."""
    every = ctx.params.sensitivity_every
    rec = ctx.state[STATE_KEY] if STATE_KEY in ctx.state else None
    fresh = rec is not None and len(rec["sensitivity"]) == len(ctx.names) and (
        every == 0 or ctx.server_round - int(rec["round"]) < every)
    if fresh:
        return [float(s) for s in rec["sensitivity"]]
    if ctx.data is None or ctx.partition is None:
        sens = [1.0] * len(ctx.names)  # no root set available: size-proportional slices
    else:
        idx = root_indices(ctx.data.y_train, ctx.partition, ctx.params.root_per_class)
        device = ctx.x.device
        x = to_tensor(ctx.data.x_train[idx], ctx.data.mean, ctx.data.std, device)
        y = torch.as_tensor(ctx.data.y_train[idx], device=device)
        sens = layer_sensitivity(ctx.model, x, y, ctx.params.sensitivity, ctx.params.probes, ctx.generator)
    ctx.state[STATE_KEY] = ConfigRecord({"sensitivity": [float(s) for s in sens], "round": ctx.server_round})
    return sens


def perturb(grads: list[torch.Tensor], bounds: np.ndarray, num_perturbed: int, sigma: float,
            gen: torch.Generator, clip_bound: float = 0.0,
            per_sample: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Add ``N(0, σ²)`` to ``num_perturbed`` random slices of the flattened gradient (optionally clip first).

    Args:
        grads: gradient tensors in parameter order.
        bounds: slice boundaries from :func:`slice_bounds`.
        num_perturbed: M, slices chosen uniformly without replacement.
        sigma: noise std σ (>= 0).
        gen: CPU generator for the choice and the noise.
        clip_bound: L2 bound for each sample's part of each selected slice (used with ``per_sample``).
        per_sample: per-sample gradients ``(B, *shape)`` per tensor; when given, the selected slices are rebuilt as
            the mean of the clipped per-sample slices (GradDefense's ``clip.py``).

    Returns:
        New tensors, same shapes.
    """
    flat = torch.cat([g.reshape(-1) for g in grads])
    num_slices = len(bounds) - 1
    chosen = torch.randperm(num_slices, generator=gen)[:num_perturbed]
    mask = slice_mask(bounds, chosen, flat.numel(), flat.device)
    if per_sample is not None:
        ps = torch.cat([g.reshape(g.shape[0], -1) for g in per_sample], dim=1)
        clipped = ps.clone()
        for k in chosen.tolist():
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            part = ps[:, lo:hi]
            factor = torch.clamp(clip_bound / (part.norm(dim=1, keepdim=True) + 1e-12), max=1.0)
            clipped[:, lo:hi] = part * factor
        flat = torch.where(mask, clipped.mean(dim=0), flat)
    noise = torch.randn(flat.numel(), generator=gen).to(flat.device, flat.dtype) * sigma
    flat = flat + noise * mask
    out, pos = [], 0
    for g in grads:
        out.append(flat[pos : pos + g.numel()].view_as(g))
        pos += g.numel()
    return out


def apply(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """Perturb M of S sensitivity-balanced slices of this step's gradient (see the module docstring)."""
    p: Params = ctx.params
    sens = _sensitivities(ctx)
    bounds = cached_slice_bounds(tuple(g.numel() for g in grads), tuple(sens), p.slices)
    per_sample, bound = None, 0.0
    if p.clip:
        per_sample = [g.detach() for g in per_sample_gradients(ctx)]
        bound = p.clip_bound or p.sigma
    return perturb(grads, bounds, p.perturb_slices, p.sigma, ctx.generator, bound, per_sample)


DEFENSE = Defense("GradDefense: noise on M of S sensitivity-balanced slices (Wang et al., INFOCOM'22); server "
                  "compensation", apply, KEYS, Params, "defense-gd-")
