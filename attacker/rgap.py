"""R-GAP: the closed-form recursive gradient attack and its rank analysis (Zhu & Blaschko, ICLR'21).

For a network ``x_{i+1} = σ_i(W_i x_i + b_i)`` without pooling, with invertible activations (LeakyReLU, sigmoid,
tanh, identity) and a final linear classifier ``fc``, the attack works from the top down (``JunyiZhu-AI/R-GAP``
``main.py``, ``recursive_attack.py``):

1. **Classifier.** With softmax cross-entropy, ``∇W_fc = k aᵀ`` and ``∇b_fc = k`` for ``k = p − e_y`` and the
   features ``a``. With a bias (fl-sim's classifier convention) ``a = ∇W_fcᵀ k / ‖k‖²`` exactly. Without one,
   ``a = t·u`` along the top singular vector ``u`` of ``∇W_fc``, and the scale ``t`` follows from
   ``log k_i = t (W u)_i + const`` over the classes ``i ≠ y`` (the softmax generalisation of the paper's
   scalar inversion of ``u·ℓ′(u)``).
2. **Each hidden layer, top down.** From the layer's recovered output ``x_{i+1}``: ``z_i = σ_i^{-1}(x_{i+1})`` and
   ``δ_i = (W_{i+1}ᵀ δ_{i+1}) ⊙ σ_i′(z_i)``; then ``x_i`` solves the stacked linear least-squares system of the
   *gradient constraints* ``∇W_i = δ_i x_iᵀ`` (for a convolution: ``∇K_i[o, c, u, v] = Σ_p δ_i[o, p]
   x_i[c, s·p + (u, v)]``) and the *forward constraints* ``W_i x_i = z_i − b_i``. Padded entries are not unknowns
   (the paper's padding constraints ``P x = 0``). The system is solved through its normal equations in float64
   (Cholesky; a minimum-norm least-squares solve when it is singular); the gradient block is built from its
   per-channel structure (``Σ_{u,v} S_uvᵀ δᵀδ S_uv``), so nothing of size ``|∇W_i| × |x_i|`` is formed.
3. **Mini-batches** (fully-connected nets, the paper's FCN3 with ``-b``): ``∇W_fc = (1/B) K Aᵀ`` has rank B;
   with ``A = V M`` on its top-B right singular vectors, the ``B × B`` matrix ``M`` solves the small non-linear
   least-squares problem ``Σ_j k(m_j) m_jᵀ = B·U S`` (and ``Σ_j k(m_j) = B ∇b``), with ``k(m) = softmax(W V m + b)
   − e_y`` and the labels from :mod:`attacker.labels` (scipy ``least_squares``, several starts). Each hidden
   fully-connected layer then solves the Sylvester equation of both constraint blocks for all B inputs at once.
   The paper's script reconstructs one combined image; this recovers each image. Convolutional nets take B = 1.

:func:`rank_analysis` reports, per layer, the rank of the constraint system against the number of unknowns (the
paper's risk estimate: full column rank everywhere ⇒ the input is uniquely recoverable from the gradient).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import nn

from attacker.labels import recover_labels
from attacker.options import AttackOptions
from attacker.payload import AttackPayload, AttackResult, Budget, BudgetExhausted, NotApplicable
from fl_sim.task.config import TaskConfig
from fl_sim.task.datasets import DATASETS
from fl_sim.task.models import classifier_layer

# ---------------------------------------------------------------------------------------------------------------
# Network structure


@dataclass
class Layer:
    """One hidden layer of an R-GAP-attackable network: ``x_{i+1} = act(module(x_i))``.

    Attributes:
        module: the ``nn.Conv2d`` or ``nn.Linear``.
        act: the activation module after it (``None`` = identity).
        in_shape: shape of one input ``x_i`` (``(C, H, W)`` for a convolution, ``(d,)`` for a linear layer).
        out_shape: shape of one output.
        weight_index: position of ``module.weight`` in ``model.parameters()``.
    """

    module: nn.Module
    act: nn.Module | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight_index: int


def _inverse(act: nn.Module | None, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ^{-1}(y), σ′(σ^{-1}(y)))`` for an invertible activation (float64 tensors)."""
    if act is None or isinstance(act, nn.Identity):
        return y, torch.ones_like(y)
    if isinstance(act, nn.LeakyReLU):
        s = float(act.negative_slope)
        if s <= 0:
            raise NotApplicable("R-GAP needs an invertible activation; LeakyReLU with slope 0 is ReLU")
        neg = y < 0
        return torch.where(neg, y / s, y), torch.where(neg, torch.full_like(y, s), torch.ones_like(y))
    if isinstance(act, nn.Sigmoid):
        yc = y.clamp(1e-12, 1 - 1e-12)
        return torch.log(yc / (1 - yc)), yc * (1 - yc)
    if isinstance(act, nn.Tanh):
        yc = y.clamp(-1 + 1e-12, 1 - 1e-12)
        return torch.atanh(yc), 1 - yc * yc
    raise NotApplicable(f"R-GAP needs invertible activations; {type(act).__name__} is not supported")


def network_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[Layer]:
    """The hidden layers of ``model`` in forward order (every module before the classifier ``fc``).

    Supported: ``model.features`` (or the modules before ``fc``) made of ``Conv2d`` / ``Linear`` layers, each
    optionally followed by one invertible activation, and ``Flatten``.

    Raises:
        NotApplicable: (a ``ValueError``) pooling, normalisation, non-invertible activations or anything else R-GAP
            cannot invert.
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise NotApplicable(f"R-GAP needs a model with a `features` Sequential before `fc`; {type(model).__name__} has none")
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    layers: list[Layer] = []
    shape = tuple(input_shape)
    mods = list(features)
    i = 0
    x = torch.zeros(1, *shape)
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Flatten):
            x = m(x)
            shape = tuple(x.shape[1:])
            i += 1
            continue
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise NotApplicable(f"R-GAP cannot invert {type(m).__name__} (conv/linear layers without pooling only)")
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros"):
            raise NotApplicable("R-GAP supports plain convolutions only (groups 1, dilation 1, zero padding)")
        act = None
        if i + 1 < len(mods) and not isinstance(mods[i + 1], (nn.Conv2d, nn.Linear, nn.Flatten)):
            act = mods[i + 1]
            _inverse(act, torch.zeros(1, dtype=torch.float64))  # raises for unsupported activations
        with torch.no_grad():
            x = m(x)
            if act is not None:
                x = act(x)
        layers.append(Layer(m, act, shape, tuple(x.shape[1:]), ids[id(m.weight)]))
        shape = tuple(x.shape[1:])
        i += 2 if act is not None else 1
    return layers


# ---------------------------------------------------------------------------------------------------------------
# Linear systems of one layer


def _conv_geometry(layer: nn.Conv2d, in_shape: tuple[int, int, int]) -> tuple[np.ndarray, int, int]:
    """Index map of a convolution: ``idx[uv, p]`` = pixel (``h·W + w``) under kernel offset ``uv`` at output
    position ``p``, or −1 in the padding. Returns ``(idx (k², P), HW, P)``."""
    _, h, w = in_shape
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    ph, pw = layer.padding
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (w + 2 * pw - kw) // sw + 1
    oh, ow = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
    u, v = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    rows = oh.reshape(1, -1) * sh - ph + u.reshape(-1, 1)
    cols = ow.reshape(1, -1) * sw - pw + v.reshape(-1, 1)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    idx = np.where(inside, rows * w + cols, -1)
    return idx, h * w, ho * wo


def conv_gradient_gram(layer: nn.Conv2d, in_shape: tuple[int, int, int], delta: np.ndarray,
                       grad_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normal-equation blocks of the gradient constraints of a convolution, per input channel.

    The map ``x_c ↦ ∇K[:, c]`` is the same for every channel ``c``, so ``AᵀA = I_C ⊗ G₀`` with
    ``G₀ = Σ_uv S_uvᵀ (δᵀδ) S_uv`` (``HW × HW``).

    Args:
        delta: ``(C_out, P)`` the gradient of the loss with respect to the layer's output (pre-activation).
        grad_w: ``(C_out, C_in, kh, kw)`` the observed weight gradient.

    Returns:
        ``G₀ (HW, HW)`` and the right-hand sides ``Aᵀ vec(∇K)`` as ``(C_in, HW)``.
    """
    idx, hw, _ = _conv_geometry(layer, in_shape)
    d = delta.T @ delta  # (P, P)
    g0 = np.zeros((hw, hw))
    c_in = grad_w.shape[1]
    rhs = np.zeros((c_in, hw))
    gw = grad_w.reshape(grad_w.shape[0], c_in, -1)  # (O, C, k²)
    for uv in range(idx.shape[0]):
        valid = np.nonzero(idx[uv] >= 0)[0]
        pix = idx[uv, valid]
        g0[np.ix_(pix, pix)] += d[np.ix_(valid, valid)]
        # Σ_o δ[o, p] ∇K[o, c, uv] for every valid p
        rhs[:, pix] += (delta[:, valid].T @ gw[:, :, uv]).T
    return g0, rhs


def conv_forward_gram(layer: nn.Conv2d, in_shape: tuple[int, int, int]) -> torch.Tensor:
    """``AᵀA`` of the convolution's forward map (no padding columns), ``(C_in·HW, C_in·HW)`` float64.

    Built patch by patch: with ``KK = KᵀK`` over output channels (``C_in k² × C_in k²``), every output position adds
    ``KK`` at the rows and columns of the pixels its patch covers — no ``|z| × |x|`` matrix is formed.
    """
    idx, hw, p = _conv_geometry(layer, in_shape)
    c_in = in_shape[0]
    k = layer.weight.detach().double().cpu().reshape(layer.weight.shape[0], -1)  # (O, C·k²)
    kk = k.T @ k
    kuv = idx.shape[0]
    # global column of patch entry (c, uv) at position p: c·HW + idx[uv, p], or −1 in the padding
    pix = torch.as_tensor(idx.T)  # (P, k²)
    cols = torch.arange(c_in).view(1, c_in, 1) * hw + pix.view(p, 1, kuv)
    n = c_in * hw
    # padding entries go to a dummy row/column n, dropped at the end (no masking in the scatter)
    cols = torch.where(pix.view(p, 1, kuv) >= 0, cols, torch.full_like(cols, n)).reshape(p, c_in * kuv)
    gram = torch.zeros((n + 1) * (n + 1), dtype=torch.float64)
    q = cols.shape[1]
    step = max(1, 4_000_000 // (q * q))
    for start in range(0, p, step):
        cp = cols[start:start + step]
        flat = (cp[:, :, None] * (n + 1) + cp[:, None, :]).reshape(-1)
        gram.index_add_(0, flat, kk.expand(cp.shape[0], q, q).reshape(-1))
    return gram.view(n + 1, n + 1)[:n, :n].contiguous()


def _solve_psd(n: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Solve ``N x = rhs`` for a symmetric PSD ``N``: Cholesky, else a minimum-norm least-squares solve."""
    chol, info = torch.linalg.cholesky_ex(n)
    if int(info) == 0:
        x = torch.cholesky_solve(rhs.view(-1, 1), chol).view(-1)
        if bool(torch.isfinite(x).all()):
            return x, True
    w, v = torch.linalg.eigh(n)
    keep = w > w.max() * 1e-12
    return v[:, keep] @ ((v[:, keep].T @ rhs) / w[keep]), False


def _conv_system(layer: Layer, delta: np.ndarray, grad_w: np.ndarray, z: np.ndarray | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal equations ``(N, rhs)`` of one convolution for one input; the gradient block is scaled so that both
    blocks have the same Frobenius norm."""
    conv = layer.module
    shape = layer.in_shape
    c_in, h, w = shape
    hw = h * w
    g0, g_rhs = conv_gradient_gram(conv, shape, delta, grad_w)
    n = conv_forward_gram(conv, shape) if z is not None else torch.zeros(c_in * hw, c_in * hw, dtype=torch.float64)
    alpha2 = float(torch.trace(n)) / max(c_in * float(np.trace(g0)), 1e-300) if z is not None else 1.0
    g0t = torch.as_tensor(g0) * alpha2
    for c in range(c_in):
        n[c * hw:(c + 1) * hw, c * hw:(c + 1) * hw] += g0t
    rhs = torch.as_tensor(g_rhs).reshape(-1) * alpha2
    if z is not None:
        zt = torch.as_tensor(z).view(1, conv.out_channels, *layer.out_shape[1:])
        rhs = rhs + torch.nn.grad.conv2d_input((1, *shape), conv.weight.detach().double().cpu(), zt,
                                               stride=conv.stride, padding=conv.padding).reshape(-1)
    return n, rhs


# ---------------------------------------------------------------------------------------------------------------
# The attack


def _classifier_top(model: nn.Module, grads: list[torch.Tensor], batch: int, labels: torch.Tensor | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Recover the classifier's inputs ``A (d, B)`` and output gradients ``K (C, B)`` (unscaled, per sample)."""
    fc = classifier_layer(model)
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    gw = grads[ids[id(fc.weight)]].detach().double().cpu().numpy()
    gb = grads[ids[id(fc.bias)]].detach().double().cpu().numpy() if fc.bias is not None else None
    w = fc.weight.detach().double().cpu().numpy()
    b = fc.bias.detach().double().cpu().numpy() if fc.bias is not None else np.zeros(w.shape[0])
    if batch == 1:
        if gb is not None and float(gb @ gb) > 0:
            a = gw.T @ gb / float(gb @ gb)
            return a[:, None], gb[:, None]
        return _classifier_top_nobias(gw, w, b)
    return _classifier_top_batch(gw, gb, w, b, batch, labels)


def _classifier_top_nobias(gw: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """B = 1 without a classifier bias: ``a = t u`` with ``t`` from the softmax log-ratios (module docstring)."""
    uu, ss, vt = np.linalg.svd(gw, full_matrices=False)
    u = vt[0]
    kt = gw @ u  # = k · t
    signs = np.sign(kt)
    if (signs > 0).sum() < (signs < 0).sum():  # the true class is the only negative entry of k (t > 0)
        u, kt = -u, -kt
    y = int(np.argmin(kt))
    others = [i for i in range(len(kt)) if i != y and kt[i] > 0]
    wu = w @ u
    if len(others) >= 2:
        t = float(np.polyfit(wu[others], np.log(kt[others]), 1)[0])
    else:
        def f(tt: float) -> float:
            z = tt * wu + b
            p = np.exp(z - z.max())
            p /= p.sum()
            return p[y] - 1 - kt[y] / tt
        t = float(scipy.optimize.brentq(f, 1e-8, 1e8))
    k = kt / t
    return (t * u)[:, None], k[:, None]


def _classifier_top_batch(gw: np.ndarray, gb: np.ndarray | None, w: np.ndarray, b: np.ndarray, batch: int,
                          labels: torch.Tensor | None, starts: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """B > 1: solve for the ``B × B`` mixing matrix ``M`` of ``A = V M`` (module docstring, step 3)."""
    uu, ss, vt = np.linalg.svd(gw, full_matrices=False)
    v = vt[:batch].T  # (d, B)
    target = batch * uu[:, :batch] * ss[:batch]  # (C, B) = Σ_j k_j m_jᵀ
    wv = torch.tensor(w @ v)
    bt = torch.tensor(b)
    y = torch.zeros(w.shape[0], batch, dtype=torch.float64)
    y[labels.long(), torch.arange(batch)] = 1.0
    tgt = torch.tensor(target)
    tb = torch.tensor(batch * gb) if gb is not None else None

    def residual(m_flat: torch.Tensor) -> torch.Tensor:
        m = m_flat.view(batch, batch)
        k = torch.softmax(wv @ m + bt[:, None], dim=0) - y
        r = [(k @ m.T - tgt).reshape(-1)]
        if tb is not None:
            r.append(k.sum(1) - tb)
        return torch.cat(r)

    def fun(m: np.ndarray) -> np.ndarray:
        return residual(torch.tensor(m)).numpy()

    def jac(m: np.ndarray) -> np.ndarray:
        return torch.autograd.functional.jacobian(residual, torch.tensor(m)).numpy()

    rng = np.random.default_rng(0)
    scale = math.sqrt(float(ss[:batch].sum()))
    best = None
    for _ in range(starts):
        m0 = rng.normal(size=batch * batch) * scale
        sol = scipy.optimize.least_squares(fun, m0, jac=jac, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15,
                                           max_nfev=2000)
        if best is None or sol.cost < best.cost:
            best = sol
        if best.cost < 1e-20 * max(1.0, float((target ** 2).sum())):
            break
    m = best.x.reshape(batch, batch)
    a = v @ m
    k = (torch.softmax(wv @ torch.tensor(m) + bt[:, None], dim=0) - y).numpy()
    return a, k


def _upstream(layer: Layer, delta: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray:
    """``W_iᵀ δ_i`` for a batch: the gradient with respect to the layer's input, ``(B, *in_shape)`` float64."""
    m = layer.module
    w = m.weight.detach().double()
    d = torch.tensor(delta)
    if isinstance(m, nn.Linear):
        return (d @ w).numpy()
    x = torch.zeros((delta.shape[0], *x_shape), dtype=torch.float64)
    out = torch.nn.grad.conv2d_input(x.shape, w, d, stride=m.stride, padding=m.padding)
    return out.numpy()


def check(model: nn.Module, task: TaskConfig) -> None:
    """Raise ``ValueError`` when R-GAP cannot attack ``model`` under the task ``task`` (before a run)."""
    layers = network_layers(model, DATASETS[task.dataset].input_shape)
    if task.batch_size > 1 and any(isinstance(l.module, nn.Conv2d) for l in layers):
        raise ValueError("R-GAP recovers mini-batches for fully-connected nets only; use batch-size=1")


def rgap(payload: AttackPayload, budget: Budget, options: AttackOptions | None = None) -> AttackResult:
    """R-GAP (see the module docstring) on a FedSGD update.

    Args:
        payload: the server-visible update (its ``batch_size`` inputs are recovered; B > 1 for fully-connected
            nets only).
        budget: only the time limit applies (the attack is closed-form; ``iterations`` counts solved layers).
        options: ``labels`` (for B > 1).

    Returns:
        Images ``(B, C, H, W)`` in normalised space and the labels (read off the recovered ``k = p − e_y``).

    Raises:
        NotApplicable: a model R-GAP cannot invert, or B > 1 with convolutions.
        BudgetExhausted: the time limit passed before the last layer was solved (a closed-form inversion has no
            partial result to return).
    """
    start = time.perf_counter()
    options = options or AttackOptions()
    # closed form in float64 NumPy: on the CPU whatever budget.device says (a GPU would only add copies)
    model = payload.build_model("cpu")
    layers = network_layers(model, payload.input_shape)
    grads = [g.detach() for g in payload.gradients(model)]
    batch = payload.batch_size
    if batch > 1 and any(isinstance(l.module, nn.Conv2d) for l in layers):
        raise NotApplicable("R-GAP recovers mini-batches for fully-connected nets only; this model has convolutions")
    labels = recover_labels(model, grads, batch, options.labels, payload.input_shape) if batch > 1 else None
    a, k = _classifier_top(model, grads, batch, labels)  # (d, B), (C, B)
    fc = classifier_layer(model)
    x_out = a.T  # (B, d): the recovered output of the last hidden layer, flattened
    upstream = k.T @ fc.weight.detach().double().cpu().numpy()  # (B, d) = W_fcᵀ k
    full_rank = []
    for layer in reversed(layers):
        out = torch.tensor(x_out).reshape(batch, *layer.out_shape)
        z, dz = _inverse(layer.act, out)
        delta = (torch.tensor(upstream).reshape(dz.shape) * dz).numpy()  # (B, *out_shape)
        z = z.numpy()
        bias = layer.module.bias
        if bias is not None:
            bshape = (-1, 1, 1) if isinstance(layer.module, nn.Conv2d) else (-1,)
            z = z - bias.detach().double().cpu().numpy().reshape(bshape)
        gw = grads[layer.weight_index].detach().double().cpu().numpy()
        if isinstance(layer.module, nn.Conv2d):
            n, rhs = _conv_system(layer, delta.reshape(layer.out_shape[0], -1), gw, z.reshape(-1))
            x, ok = _solve_psd(n, rhs)
            x = x.numpy()
        else:
            x, ok = _linear_solve(layer.module.weight.detach().double().cpu().numpy(), delta.reshape(batch, -1),
                                  gw, z.reshape(batch, -1))
        full_rank.append(ok)
        upstream = _upstream(layer, delta, layer.in_shape)
        x_out = x.reshape(batch, *layer.in_shape)
        if budget.progress is not None:
            budget.progress(len(full_rank), 0.0)
        if budget.time_limit_s and time.perf_counter() - start > budget.time_limit_s:
            raise BudgetExhausted(f"R-GAP exceeded its time limit of {budget.time_limit_s} s")
    images = torch.tensor(x_out, dtype=torch.float32).reshape(batch, *payload.input_shape)
    rec_labels = torch.tensor(np.argmin(k, axis=0), dtype=torch.long) if labels is None else labels
    # objective: relative residual of the recovered input's gradient against the observed one
    obj = _gradient_residual(model, images, rec_labels, grads)
    return AttackResult(images, rec_labels.cpu(), len(layers), time.perf_counter() - start, obj,
                        {"layers_full_rank": int(sum(full_rank)), "layers": len(layers)})


def _linear_solve(w: np.ndarray, delta: np.ndarray, grad_w: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, bool]:
    """All B inputs ``X (B, d)`` of a linear layer from ``∇W = (1/B) Δᵀ X`` and ``X Wᵀ = Z`` (least squares).

    The normal equations are the Sylvester equation ``WᵀW X̃ + X̃ (α ΔᵀΔ/B²) = WᵀZ̃ + α ∇Wᵀ Δ / B`` with ``X̃ = Xᵀ``
    (``Δ (B, out)``, ``Z (B, out)``; ``α`` balances the two blocks). ``ΔᵀΔ`` is only ``B × B``: in its eigenbasis
    the equation splits into B symmetric systems ``(WᵀW + α λ_j I) x̃_j = r̃_j``, each solved by Cholesky.

    Returns:
        ``X (B, d)`` and whether every system had full rank.
    """
    b = delta.shape[0]
    wt = torch.as_tensor(w)
    dd = torch.as_tensor(delta).T  # (out, B)
    alpha = b * float((wt ** 2).sum()) / max(wt.shape[1] * float((dd ** 2).sum()) / b ** 2, 1e-300)
    wtw = wt.T @ wt
    lam, q = torch.linalg.eigh(alpha * (dd.T @ dd) / b ** 2)
    rhs = (wt.T @ torch.as_tensor(z).T + alpha * torch.as_tensor(grad_w).T @ dd / b) @ q  # (d, B)
    cols, ok = [], True
    eye = torch.eye(wtw.shape[0], dtype=torch.float64)
    for j in range(b):
        xj, full = _solve_psd(wtw + lam[j] * eye, rhs[:, j])
        cols.append(xj)
        ok = ok and full
    return (torch.stack(cols, 1) @ q.T).T.numpy(), ok


def _gradient_residual(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grads: list[torch.Tensor]) -> float:
    params = list(model.parameters())
    trial = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    num = sum(float(((t - g) ** 2).sum()) for t, g in zip(trial, grads))
    den = sum(float((g ** 2).sum()) for g in grads) or 1.0
    return num / den


# ---------------------------------------------------------------------------------------------------------------
# Rank analysis


@dataclass
class LayerRank:
    """The constraint system of one layer (R-GAP's rank analysis).

    Attributes:
        layer: the module's name in the model (e.g. ``features.2``, ``fc``).
        kind: ``conv``, ``linear`` or ``classifier``.
        unknowns: number of unknowns (entries of the layer's input for the whole batch, padding excluded).
        gradient_rank: rank of the gradient constraints alone.
        forward_rank: rank of the forward constraints alone (0 for the classifier, whose output is not known).
        rank: rank of both stacked.
        recoverable: ``rank == unknowns`` — the layer's input is uniquely determined by its constraints.
    """

    layer: str
    kind: str
    unknowns: int
    gradient_rank: int
    forward_rank: int
    rank: int
    recoverable: bool


def _psd_rank(n: torch.Tensor, rtol: float) -> int:
    """Numerical rank of a symmetric PSD matrix: eigenvalues above ``rtol`` × the largest."""
    if n.numel() == 0:
        return 0
    w = torch.linalg.eigvalsh(n)
    return int((w > rtol * max(float(w.max()), 1e-300)).sum())


def rank_analysis(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, seed: int = 0,
                  rtol: float = 1e-10) -> list[LayerRank]:
    """R-GAP's rank analysis of ``model`` (Zhu & Blaschko, ICLR'21, §4), computed on the actual constraint matrices.

    The constraints are built at a random input (N(0, 1) in normalised space, random labels) and the model's
    weights, as the attack would build them (:func:`rgap`); a layer is recoverable when its stacked system has full
    column rank. Ranks of the normal matrices are counted with eigenvalues above ``rtol`` × the largest (so
    singular values above ``√rtol`` × the largest).

    Args:
        model: an R-GAP-attackable model (:func:`network_layers`).
        input_shape: ``(C, H, W)`` of one input.
        batch: inputs per gradient (B > 1 for fully-connected nets only).
        seed: seed of the random input and labels.
        rtol: relative eigenvalue threshold.

    Returns:
        One :class:`LayerRank` per layer, the classifier first (the order of the recursion).

    Raises:
        ValueError: as :func:`network_layers`, or B > 1 with convolutions.
    """
    layers = network_layers(model, input_shape)
    if batch > 1 and any(isinstance(l.module, nn.Conv2d) for l in layers):
        raise ValueError("the batch rank analysis covers fully-connected nets only; this model has convolutions")
    names = {id(m): n for n, m in model.named_modules()}
    gen = torch.Generator().manual_seed(seed)
    fc = classifier_layer(model)
    x = torch.randn((batch, *input_shape), generator=gen)
    y = torch.randint(0, fc.out_features, (batch,), generator=gen)
    acts: dict[int, torch.Tensor] = {}
    hooks = [l.module.register_forward_hook(lambda m, i, o: acts.__setitem__(id(m), o)) for l in layers]
    hooks.append(fc.register_forward_hook(lambda m, i, o: acts.__setitem__(id(m), o)))
    try:
        outs = model(x)
        loss = F.cross_entropy(outs, y)
        mods = [l.module for l in layers] + [fc]
        deltas = torch.autograd.grad(loss * batch, [acts[id(m)] for m in mods])  # per-sample δ (unscaled)
    finally:
        for h in hooks:
            h.remove()
    report = []
    k = deltas[-1].detach().double()  # (B, C)
    feat = fc.in_features
    report.append(LayerRank(names.get(id(fc), "fc"), "classifier", feat * batch, feat * int(
        torch.linalg.matrix_rank(k)), 0, feat * int(torch.linalg.matrix_rank(k)),
        int(torch.linalg.matrix_rank(k)) == batch))
    for layer, delta in zip(reversed(layers), reversed(deltas[:-1])):
        d = delta.detach().double()
        name = names.get(id(layer.module), "?")
        if isinstance(layer.module, nn.Conv2d):
            c_in, h, w = layer.in_shape
            g0, _ = conv_gradient_gram(layer.module, layer.in_shape, d[0].reshape(layer.out_shape[0], -1).numpy(),
                                       np.zeros(tuple(layer.module.weight.shape)))
            fwd = conv_forward_gram(layer.module, layer.in_shape)
            g_rank = c_in * _psd_rank(torch.as_tensor(g0), rtol)
            f_rank = _psd_rank(fwd, rtol)
            alpha2 = float(torch.trace(fwd)) / max(c_in * float(np.trace(g0)), 1e-300)
            n = fwd.clone()
            g0t = torch.as_tensor(g0) * alpha2
            for c in range(c_in):
                n[c * h * w:(c + 1) * h * w, c * h * w:(c + 1) * h * w] += g0t
            both = _psd_rank(n, rtol)
            unknowns = c_in * h * w
            report.append(LayerRank(name, "conv", unknowns, g_rank, f_rank, both, both == unknowns))
        else:
            wt = layer.module.weight.detach().double()
            dim = wt.shape[1]
            dd = d.reshape(batch, -1)
            d_rank = int(torch.linalg.matrix_rank(dd))
            w_rank = _psd_rank(wt.T @ wt, rtol)
            # Sylvester form: per eigen-direction of ΔᵀΔ, full rank if λ_j > 0, else rank(W)
            lam = torch.linalg.eigvalsh(dd @ dd.T)
            pos = int((lam > rtol * max(float(lam.max()), 1e-300)).sum())
            both = pos * dim + (batch - pos) * w_rank
            report.append(LayerRank(name, "linear", dim * batch, d_rank * dim, w_rank * batch, both,
                                    both == dim * batch))
    return report
