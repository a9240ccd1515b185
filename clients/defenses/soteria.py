"""Soteria / PLD: prune the fully-connected layer's input representation in its weight gradient.

Paper: Sun, Li, Zhang, Chen, Wang & Chen, "Soteria: Provable Defense against Privacy Leakage in Federated Learning
from Representation Perspective", CVPR 2021 (``jeremy313/Soteria``); "PLD" in the GradDefense talk (seed 001).

Algorithm (as the public code does it, ``GS_attack/reconstruct_image.py``): for the representation
``r = (r_1 … r_d)`` that enters the classifier layer ``fc`` (``model.fc``, else the last ``nn.Linear``), compute for
each sample ``n`` and feature ``i`` the score ``s_{n,i} = ‖∂r_{n,i}/∂x_n‖₂ / (|r_{n,i}| + ε)`` (see below for the sign; the
code — the README's cheap stand-in for ``‖r (∂r/∂x)^{-1}‖``), sum over the batch, take ``τ`` = the ``rate``-th
percentile of the scores and zero the columns ``i`` of ``∇W_fc`` with ``|s_i| < τ``. The bias and every other layer
are untouched. The Jacobian norms are not computed the paper code's way (one backward pass per feature, 588 on
DLG's LeNet): on chains of convolutions and elementwise activations (the LeNets) a windowed forward-mode pass pushes
every input pixel's one-hot through the network on the small window it can reach
(:func:`jacobian_norms_windowed`; ~40 M multiply–adds per 28×28 image against ~240 M for a dense reverse pass), and
on other models one backward pass per chunk of features over a replicated batch (:func:`jacobian_norms_batched`);
both give the per-feature loop's numbers up to float rounding, and the same masks (tests compare them).
The score uses ``|r|`` — the README's ``‖r‖`` — where the code divides by the signed ``r``: the same for the
paper's non-negative features, while with tanh features the signed form gives negative scores and prunes fewer
features than asked (``defense-soteria-signed=true`` restores it). Applied to every local step's
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
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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


def jacobian_norms(model: nn.Module, x: torch.Tensor, chunk: int = CHUNK,
                   method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-feature ``‖∂(Σ_n r_{n,i})/∂x_m‖₂`` for the classifier layer's input ``r``.

    ``method="auto"`` uses the windowed forward-mode Jacobian (:func:`jacobian_norms_windowed`) where the model is a
    chain of convolutions and elementwise activations and that is cheaper, else the batched backward
    (:func:`jacobian_norms_batched`); ``"windowed"`` and ``"batched"`` force one (``"windowed"`` raises
    ``ValueError`` where it does not apply). Both give the per-feature loop's numbers up to float rounding.

    Args:
        model: the model (its mode and buffers are kept).
        x: ``float32 (B, C, H, W)`` batch.
        chunk: features per backward pass of the batched method.
        method: ``"auto"``, ``"windowed"`` or ``"batched"``.

    Returns:
        ``(norms, r)``: ``norms (B, d)`` and the representation ``r (B, d)`` (detached); when samples do not
        interact row ``m`` of ``norms`` is ``‖∂r_{m,i}/∂x_m‖₂``.
    """
    if method not in ("auto", "windowed", "batched"):
        raise ValueError(f"method must be auto, windowed or batched, not {method!r}")
    if method != "batched":
        with _buffers_kept(model):
            out = jacobian_norms_windowed(model, x, force=method == "windowed")
        if out is not None:
            return out
        if method == "windowed":
            raise ValueError(f"the windowed Jacobian does not apply to {type(model).__name__}")
    return jacobian_norms_batched(model, x, chunk)


def jacobian_norms_batched(model: nn.Module, x: torch.Tensor,
                           chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-feature ``‖∂(Σ_n r_{n,i})/∂x_m‖₂`` for the classifier layer's input ``r`` — batched backward.

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


# ---------------------------------------------------------------------------------------------------------------
# The windowed forward-mode Jacobian (the fast path for conv chains)
# ---------------------------------------------------------------------------------------------------------------

#: Elementwise modules the fast path differentiates with ``torch.func.jvp`` (one derivative map per module).
ELEMENTWISE = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Softplus, nn.Softsign, nn.Hardtanh, nn.ReLU6, nn.Hardsigmoid, nn.Hardswish, nn.LogSigmoid,
               nn.Tanhshrink, nn.Identity)
#: The fast path is used only when its gathered weight matrices stay below this many entries.
MAX_PLAN_ENTRIES = 8_000_000


def _chain_modules(model: nn.Module) -> list[nn.Module] | None:
    """``model.features`` flattened into a list when it is a chain the fast path handles, else ``None``.

    Handled: ``nn.Conv2d`` (no groups, no dilation, zero padding given as numbers), the elementwise modules of
    :data:`ELEMENTWISE` (in place only ReLU and LeakyReLU) and eval-mode ``nn.BatchNorm2d`` (a per-channel affine
    map), with at least two convolutions. That the model really computes ``fc(features(x).flatten(1))`` is checked on every call.
    """
    feats = getattr(model, "features", None)
    if not isinstance(feats, nn.Sequential):
        return None
    mods: list[nn.Module] = []
    stack = list(feats)[::-1]
    while stack:
        m = stack.pop()
        if isinstance(m, nn.Sequential):
            stack.extend(list(m)[::-1])
        elif isinstance(m, nn.Conv2d):
            if (m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros"
                    or isinstance(m.padding, str)):
                return None
            mods.append(m)
        elif isinstance(m, ELEMENTWISE) or (isinstance(m, nn.BatchNorm2d) and not m.training
                                             and m.track_running_stats):
            # an in-place module overwrites the input its derivative is taken at; ReLU and LeakyReLU (slope >= 0)
            # keep its sign, which is all their derivative needs
            if getattr(m, "inplace", False) and not (type(m) is nn.ReLU or (
                    type(m) is nn.LeakyReLU and m.negative_slope >= 0)):
                return None
            mods.append(m)
        else:
            return None
    return mods if sum(isinstance(m, nn.Conv2d) for m in mods) >= 2 else None


class _Axis:
    """One spatial axis of a conv chain: where the tangent of each input position can be non-zero, level by level.

    Input position ``i = S·P + φ`` (``S`` the chain's total stride, ``φ`` its phase) reaches, at level ``l``
    (after ``l`` convolutions), the positions ``shift_l·P + lo[φ][l] … + size[φ][l] − 1`` (possibly outside the grid,
    where the tangent is zero); within one phase these windows are translates of each other.
    """

    def __init__(self, convs: list[tuple[int, int, int]], n0: int):
        self.convs = convs
        self.stride = math.prod(s for _, s, _ in convs)
        self.cells = -(-n0 // self.stride)
        self.n = [n0]
        for k, s, p in convs:
            self.n.append((self.n[-1] + 2 * p - k) // s + 1)
        self.lo: list[list[int]] = []
        self.size: list[list[int]] = []
        for phi in range(self.stride):
            a, b, lo, size = phi, phi, [phi], [1]
            for k, s, p in convs:  # outputs o with o·s − p ≤ i ≤ o·s − p + k − 1
                a, b = -((k - 1 - p - a) // s), (b + p) // s
                lo.append(a)
                size.append(b - a + 1)
            self.lo.append(lo)
            self.size.append(size)
        cum = np.cumprod([1] + [s for _, s, _ in convs])
        self.shift = [self.stride // int(c) for c in cum]

    def max_size(self, level: int) -> int:
        return max(s[level] for s in self.size)

    def kernel_index(self, phi: int, level: int, rows: int, cols: int) -> torch.Tensor:
        """``(rows, cols)`` kernel tap of conv ``level`` from window entry ``col`` to ``row``; ``k`` where none."""
        k, s, p = self.convs[level - 1]
        o = torch.arange(rows)[:, None]
        i = torch.arange(cols)[None, :]
        tap = (i + self.lo[phi][level - 1]) - s * (o + self.lo[phi][level]) + p
        ok = (tap >= 0) & (tap < k) & (o < self.size[phi][level]) & (i < self.size[phi][level - 1])
        return torch.where(ok, tap, k)

    def positions(self, phi: int, level: int, size: int) -> torch.Tensor:
        """``(cells, size)`` absolute positions of the phase's windows at ``level``; ``-1`` off the grid."""
        pos = self.shift[level] * torch.arange(self.cells)[:, None] + self.lo[phi][level] + torch.arange(size)[None, :]
        ok = (pos >= 0) & (pos < self.n[level]) & (torch.arange(size)[None, :] < self.size[phi][level])
        return torch.where(ok, pos, -1)


def _flat_index(ch: int, ph: torch.Tensor, pw: torch.Tensor, h: int, w: int, sentinel: int) -> torch.Tensor:
    """Flat indices ``c·h·w + y·w + x`` as ``(cells_h, cells_w, ch, size_h, size_w)``; ``sentinel`` off the grid."""
    c = torch.arange(ch)[None, None, :, None, None]
    y = ph[:, None, None, :, None]
    x = pw[None, :, None, None, :]
    idx = c * h * w + y * w + x
    return torch.where((y >= 0) & (x >= 0), idx, sentinel)


class _Plan:
    """Index tensors of the windowed Jacobian for one chain geometry and input shape (built once, then cached).

    Phases ``(φ_h, φ_w)`` are grouped by the last convolution's local matrix (which depends only on the window
    sizes and kernel-tap pattern of levels ``L−1`` and ``L``); within a group the windows of the lower levels are
    padded to the group's largest, so each level is one batched matmul per group and the last level one matmul.

    Attributes (per group ``g``, ``m_g`` phases, ``cells`` = cells per phase):
        groups: the phases of each group.
        size[g][l]: window ``(h, w)`` at level ``l`` (padded within the group).
        kernel_idx[g][l − 1]: flat indices into conv ``l``'s weight (plus one zero) — ``(m_g, n_{l−1}, n_l)`` for
            ``l < L``, ``(n_{L−1}, n_L)`` (shared) for ``l = L``; ``n_l = channels · h · w``.
        deriv_idx[l]: for every group in turn, ``(m_g, cells, n_l)`` flat indices into level ``l``'s map (plus one
            zero), concatenated; ``deriv_split[l]`` the groups' lengths.
        runs[g]: ``(start, stop)`` of the phases of group ``g`` whose last-level windows sit at the same offset
            (their squared tangents add up before the scatter).
        out_idx[g][k]: ``(cells · n_L)`` flat indices of run ``k``'s last-level windows into the output (plus one
            slot for positions off the grid).
    """

    def __init__(self, convs: list[nn.Conv2d], in_shape: tuple[int, int, int]):
        cin, h, w = in_shape
        self.ah = _Axis([(m.kernel_size[0], m.stride[0], m.padding[0]) for m in convs], h)
        self.aw = _Axis([(m.kernel_size[1], m.stride[1], m.padding[1]) for m in convs], w)
        ah, aw = self.ah, self.aw
        L = self.levels = len(convs)
        ch = self.channels = [cin] + [m.out_channels for m in convs]
        self.cells = ah.cells * aw.cells
        self.all_pixels = h % ah.stride == 0 and w % aw.stride == 0
        groups: dict[str, list[tuple[int, int]]] = {}
        offset = {}  # the last level's window offset of each phase: phases with equal ones add up before the scatter
        for f in [(fh, fw) for fh in range(ah.stride) for fw in range(aw.stride)]:
            kh = ah.kernel_index(f[0], L, ah.size[f[0]][L], ah.size[f[0]][L - 1])
            kw = aw.kernel_index(f[1], L, aw.size[f[1]][L], aw.size[f[1]][L - 1])
            groups.setdefault(repr((kh.tolist(), kw.tolist())), []).append(f)
            offset[f] = (ah.lo[f[0]][L], aw.lo[f[1]][L])
        self.groups = [sorted(g, key=lambda f: offset[f]) for g in groups.values()]
        # runs of phases with the same offset within each group: (start, stop)
        self.runs = []
        for g in self.groups:
            starts = [i for i in range(len(g)) if i == 0 or offset[g[i]] != offset[g[i - 1]]]
            self.runs.append(list(zip(starts, starts[1:] + [len(g)])))
        self.size = [[(max(ah.size[f[0]][l] for f in g), max(aw.size[f[1]][l] for f in g)) for l in range(L + 1)]
                     for g in self.groups]
        # a last convolution of stride 1 runs as a convolution of each window padded by k − 1 (its output window)
        self.last_conv = convs[-1].stride == (1, 1)
        self.kernel_idx = []
        for g, size in zip(self.groups, self.size):
            ks = [torch.stack([self._kernel(f, l, ch[l - 1], ch[l], size[l - 1], size[l]) for f in g])
                  for l in range(1, L)]
            if not self.last_conv:
                ks.append(self._kernel(g[0], L, ch[L - 1], ch[L], size[L - 1], size[L]))
            self.kernel_idx.append(ks)
        self.deriv_idx, self.deriv_split = [], []
        for l in range(L):
            parts = [torch.stack([self._window(f, l, ch[l], size[l]) for f in g]).flatten()
                     for g, size in zip(self.groups, self.size)]
            self.deriv_idx.append(torch.cat(parts))
            self.deriv_split.append([int(p.numel()) for p in parts])
        self.out_size = ch[L] * ah.n[L] * aw.n[L]
        self.kernel_cache: dict = {}
        self.out_idx = [[self._window(g[a], L, ch[L], size[L]).flatten() for a, _ in runs]
                        for g, size, runs in zip(self.groups, self.size, self.runs)]
        self.entries = sum(int(i.numel()) for ks in self.kernel_idx for i in ks)
        rows = self.cells * cin
        self.macs = sum(len(g) * rows * int(k.shape[-2]) * int(k.shape[-1])
                        for g, ks in zip(self.groups, self.kernel_idx) for k in ks[1:])
        if self.last_conv:  # taps that land inside the window only
            kh, kw = convs[-1].kernel_size
            self.macs += sum(len(g) * rows * ch[L - 1] * ch[L] * size[L - 1][0] * kh * size[L - 1][1] * kw
                             for g, size in zip(self.groups, self.size))

    def _kernel(self, f, level, cin, cout, size_in, size_out) -> torch.Tensor:
        """``(cin·size_in, cout·size_out)`` flat indices into ``weight (cout, cin, kh, kw)`` padded by one zero."""
        conv_h, conv_w = self.ah.convs[level - 1][0], self.aw.convs[level - 1][0]
        th = self.ah.kernel_index(f[0], level, size_out[0], size_in[0])  # (oh, ih)
        tw = self.aw.kernel_index(f[1], level, size_out[1], size_in[1])  # (ow, iw)
        sentinel = cout * cin * conv_h * conv_w
        co = torch.arange(cout)[None, None, None, :, None, None]
        ci = torch.arange(cin)[:, None, None, None, None, None]
        ih = th.T[None, :, None, None, :, None]  # (ih, oh)
        iw = tw.T[None, None, :, None, None, :]  # (iw, ow)
        idx = ((co * cin + ci) * conv_h + ih) * conv_w + iw
        idx = torch.where((ih < conv_h) & (iw < conv_w), idx, sentinel)
        return idx.reshape(cin * size_in[0] * size_in[1], cout * size_out[0] * size_out[1])

    def _window(self, f, level, ch, size) -> torch.Tensor:
        """``(cells, ch·size_h·size_w)`` flat indices of the phase's windows into a level's map plus one zero."""
        n_h, n_w = self.ah.n[level], self.aw.n[level]
        ph, pw = self.ah.positions(f[0], level, size[0]), self.aw.positions(f[1], level, size[1])
        idx = _flat_index(ch, ph, pw, n_h, n_w, ch * n_h * n_w)
        return idx.reshape(self.cells, -1)


_PLANS: dict[tuple, tuple[bool, _Plan | None]] = {}


def _estimate(convs: list[nn.Conv2d], in_shape: tuple[int, int, int]) -> tuple[int, int]:
    """``(multiply–adds, gathered weight entries)`` of the windowed pass per sample, before padding within groups."""
    ah = _Axis([(m.kernel_size[0], m.stride[0], m.padding[0]) for m in convs], in_shape[1])
    aw = _Axis([(m.kernel_size[1], m.stride[1], m.padding[1]) for m in convs], in_shape[2])
    ch = [in_shape[0]] + [m.out_channels for m in convs]
    rows = ah.cells * aw.cells * in_shape[0]
    macs = entries = 0
    for fh in range(ah.stride):
        for fw in range(aw.stride):
            n = [c * ah.size[fh][l] * aw.size[fw][l] for l, c in enumerate(ch)]
            entries += sum(n[l - 1] * n[l] for l in range(1, len(n)))
            macs += rows * sum(n[l - 1] * n[l] for l in range(2, len(n)))
    return macs, entries


def _plan(convs: list[nn.Conv2d], in_shape: tuple[int, int, int], force: bool = False) -> _Plan | None:
    """The cached plan for this geometry, or ``None`` where the windowed pass would cost more than the batched
    backward (multiply–adds, or gathered weights above :data:`MAX_PLAN_ENTRIES`) and ``force`` is not set."""
    key = (tuple(in_shape), tuple((m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                                   tuple(m.padding)) for m in convs))
    if key not in _PLANS:
        if len(_PLANS) >= 16:
            _PLANS.clear()
        macs, entries = _estimate(convs, in_shape)
        cheap = entries <= MAX_PLAN_ENTRIES and macs <= _dense_macs(convs, in_shape)
        _PLANS[key] = (cheap, _Plan(convs, in_shape) if cheap else None)
    cheap, plan = _PLANS[key]
    if plan is None and force:
        plan = _Plan(convs, in_shape)
        _PLANS[key] = (cheap, plan)
    return plan if cheap or force else None


def _kernels(plan: _Plan, convs: list[nn.Conv2d]) -> list[list[torch.Tensor]]:
    """The gathered local matrices for the convs' current weights, kept on the plan while the weights are equal
    (so the clients of one round, which share the global model, gather them once per process)."""
    key = (convs[0].weight.device, convs[0].weight.dtype)
    hit = plan.kernel_cache.get(key)
    if hit is not None and all(torch.equal(a, m.weight) for a, m in zip(hit[0], convs)):
        return hit[1]
    flat = [torch.cat([m.weight.detach().flatten(), m.weight.new_zeros(1)]) for m in convs]
    mats = [[flat[l][idx.to(key[0])] for l, idx in enumerate(ks)] for ks in plan.kernel_idx]
    plan.kernel_cache = {key: ([m.weight.detach().clone() for m in convs], mats)}
    return mats


def _forward_chain(model: nn.Module, mods: list[nn.Module], x: torch.Tensor):
    """Run the model once, recording each chain module's input and output; ``None`` unless the model computes
    ``fc(chain(x).flatten(1))`` exactly (each module fed the previous one's output, the first fed ``x``)."""
    fc = classifier_layer(model)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    store: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out))) for m in mods]
    hooks.append(fc.register_forward_hook(lambda m, inp, out: store.__setitem__("r", inp[0])))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    if len(seen) != len(mods) or "r" not in store or seen[0][0] is not x:
        return None
    if any(seen[i][0] is not seen[i - 1][1] for i in range(1, len(seen))):
        return None
    r = store["r"].flatten(1)
    last = seen[-1][1]
    if r.shape != (x.shape[0], last[0].numel()) or not torch.equal(r, last.flatten(1)):
        return None
    return seen, r


def jacobian_norms_windowed(model: nn.Module, x: torch.Tensor,
                            force: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact ``‖∂r_{n,i}/∂x_n‖₂`` by forward-mode propagation of each input pixel's one-hot through a conv chain,
    each tangent kept on the window it can reach (``None`` where the model is not such a chain).

    For a chain ``x → conv₁ → σ₁ → … → conv_L → σ_L = r`` (:func:`_chain_modules`) the Jacobian is
    ``D_L W_L … D_1 W_1`` with ``W_l`` the convolutions as matrices and ``D_l`` the activations' derivatives.
    The tangent of pixel ``p`` after level ``l`` is non-zero only on a window of the level's grid (the pixel's
    forward receptive field), and pixels of the same phase ``p mod S`` have translated windows, so one small dense
    local matrix per phase and level (gathered from the conv weight; cached while the weights do not change)
    applied to all pixels of that phase replaces the dense convolution over a mostly-zero tangent. The squared
    tangents are summed into ``‖∂r_i/∂x‖²`` at the window's positions. The result equals the per-feature backward
    loop (:func:`jacobian_norms_loop`) up to float rounding; the tests compare them.

    On DLG's LeNet (28×28, strides 2, 2, 1) that is 16 phases in 4 groups, windows of at most 4×4 (level 2) and
    8×8 (level 3): ~10 M multiply–adds for levels 1–2 and ~30 M for the last convolution (run as a convolution of
    each window, whose padding taps oneDNN skips), against ~240 M for a dense reverse pass over the 588 features.
    A last convolution of stride > 1 uses a gathered local matrix instead.

    Args:
        model: the model (not modified; run once in its current mode).
        x: ``float32 (B, C, H, W)``.
        force: use the windowed pass even where the batched backward would be cheaper.

    Returns:
        ``(norms (B, d), r (B, d))`` detached, or ``None`` when the fast path does not apply, or would be dearer
        than the batched backward and ``force`` is not set.
    """
    mods = _chain_modules(model)
    if mods is None or x.dim() != 4:
        return None
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    plan = _plan(convs, tuple(x.shape[1:]), force)
    if plan is None:
        return None
    with torch.no_grad():
        rec = _forward_chain(model, mods, x)
        if rec is None:
            return None
        seen, r = rec
        # derivative maps, one per level (None where the level has no elementwise module)
        derivs: list[torch.Tensor | None] = [None] * (plan.levels + 1)
        level = 0
        for m, (inp, out) in zip(mods, seen):
            if isinstance(m, nn.Conv2d):
                level += 1
                continue
            d = _derivative(m, inp, out)
            derivs[level] = d if derivs[level] is None else derivs[level] * d
        return _windowed(plan, convs, derivs, x), r.detach()


def _dense_macs(convs: list[nn.Conv2d], in_shape: tuple[int, int, int]) -> int:
    """Multiply–adds of a dense reverse pass over all ``d`` features (the batched backward's work), per sample."""
    h, w, per = in_shape[1], in_shape[2], 0
    for m in convs:
        h = (h + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
        w = (w + 2 * m.padding[1] - m.kernel_size[1]) // m.stride[1] + 1
        per += m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1] * h * w
    return convs[-1].out_channels * h * w * per


def _gather(d: torch.Tensor | None, idx: torch.Tensor, split: list[int], plan: _Plan) -> list | None:
    """``d (B, C, H, W)`` at each group's flat indices (index ``C·H·W`` reads 0): ``(m_g, B, cells, 1, n)`` each."""
    if d is None:
        return None
    b = d.shape[0]
    flat = torch.cat([d.reshape(b, -1), d.new_zeros(b, 1)], dim=1).index_select(1, idx.to(d.device))
    return [part.reshape(b, len(g), plan.cells, 1, -1).transpose(0, 1)
            for part, g in zip(flat.split(split, dim=1), plan.groups)]


def _derivative(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The elementwise derivative of ``m`` at ``inp`` (closed form for the common activations, else ``jvp``)."""
    if isinstance(m, nn.Tanh):
        return 1 - out * out
    if isinstance(m, nn.Sigmoid):
        return out * (1 - out)
    if type(m) is nn.ReLU:
        return (inp > 0).to(inp.dtype)
    if type(m) is nn.LeakyReLU:
        return torch.where(inp > 0, 1.0, m.negative_slope).to(inp.dtype)
    return torch.func.jvp(m, (inp,), (torch.ones_like(inp),))[1]


def _windowed(plan: _Plan, convs: list[nn.Conv2d], derivs: list, x: torch.Tensor) -> torch.Tensor:
    """The windowed forward-mode pass of :func:`jacobian_norms_windowed`: ``(B, d)`` norms."""
    b, cin, cells, L = x.shape[0], x.shape[1], plan.cells, plan.levels
    mats = _kernels(plan, convs)
    d0 = derivs[0]
    if d0 is None and not plan.all_pixels:
        d0 = torch.ones_like(x)  # 0 for the pixels of a partial cell, which do not exist
    gathered = [_gather(d0 if l == 0 else derivs[l], plan.deriv_idx[l], plan.deriv_split[l], plan) for l in range(L)]
    acc = x.new_zeros(b, plan.out_size + 1)
    for gi, g in enumerate(plan.groups):
        m, ks = len(g), mats[gi]
        # level 1: the tangent of the one-hot (pixel, channel) is row ``channel`` of the local matrix
        t = ks[0][:, None, None, :, :].expand(m, b, cells, cin, ks[0].shape[-1])  # (m, B, cells, cin, n_1)
        if gathered[0] is not None:  # (m, B, cells, 1, cin): the input-level derivative per channel
            t = t * gathered[0][gi].squeeze(3).unsqueeze(4)
        for l in range(1, L):
            if l > 1:
                t = torch.bmm(t.reshape(m, -1, t.shape[-1]), ks[l - 1]).reshape(m, b, cells, cin, -1)
            if gathered[l] is not None:
                t = t * gathered[l][gi]
        if plan.last_conv:  # stride 1: a "full" convolution of each window (oneDNN skips the padding's taps)
            (sih, siw), last = plan.size[gi][L - 1], convs[-1]
            y = F.conv2d(t.reshape(-1, plan.channels[L - 1], sih, siw), last.weight.detach(),
                         padding=(last.kernel_size[0] - 1, last.kernel_size[1] - 1))
        else:  # (m·B·cells·cin, n_L): one local matrix
            y = t.reshape(-1, t.shape[-1]) @ ks[-1]
        sq = y.square().reshape(m, b, cells, cin, -1)
        sq = sq.sum(3) if cin > 1 else sq.squeeze(3)  # (m, B, cells, n_L)
        for (start, stop), idx in zip(plan.runs[gi], plan.out_idx[gi]):
            part = sq[start] if stop == start + 1 else sq[start:stop].sum(0)
            acc.index_add_(1, idx.to(x.device), part.reshape(b, -1))
    acc = acc[:, :-1]
    if derivs[L] is not None:  # the last level's derivative depends only on the output position: (d·y)² = d²·y²
        acc = acc * derivs[L].reshape(b, -1).square()
    return acc.sqrt()


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
