"""Marchenko–Pastur denoising of an update: the eigen-filter behind GradDefense's server compensation.

Wang et al. (INFOCOM'22; ``wangjunxiao/GradDefense`` ``compensate.py``) remove i.i.d. Gaussian noise from an
update by reshaping it into a ``V × W`` matrix ``C``, projecting out the eigenvectors of its column covariance whose
eigenvalues lie inside the Marchenko–Pastur bulk of pure noise, ``[σ²(1 − 1/√q)², σ²(1 + 1/√q)²]`` with
``q = V/W`` (``C ← C U Uᵀ`` over the kept eigenvectors ``U``). The server applies it to the FedAvg aggregate
(``strategies/steps/graddefense.py``); an adaptive attacker may apply it to the one update it intercepted
(``attack-denoise=mp``, :func:`denoise_gradients`), which is the reason it lives here, below both.

Reshape modes: ``pad`` (default) takes ``W = ⌊√(P/Q)⌋``, ``V = ⌈P/W⌉`` and zero-pads the flattened update to
``V·W``, so ``q ≈ Q`` for every ``P``; ``divisor`` is the public code's ``V`` = the smallest divisor of ``P`` with
``V ≥ √(Q·P)``, ``W = P/V`` — degenerate when ``P`` has no divisor near ``√(Q·P)`` (``P = 2 · 9719`` gives ``W = 2``).
``keep_below`` also keeps the eigenvectors below the bulk, as the public code does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attacker.payload import AttackPayload, NotApplicable


def matrix_shape(p: int, q: float, mode: str = "pad") -> tuple[int, int]:
    """``(V, W)`` for a ``P``-entry vector and aspect ratio ``Q`` (see the module docstring).

    Raises:
        ValueError: ``P < 1``, ``Q < 1`` or an unknown mode.
    """
    if p < 1 or q < 1:
        raise ValueError(f"cannot reshape {p} entries with Q={q}")
    if mode == "pad":
        w = max(1, int(math.floor(math.sqrt(p / q))))
        return int(math.ceil(p / w)), w
    if mode == "divisor":
        v = next(d for d in range(max(1, math.ceil(math.sqrt(q * p))), p + 1) if p % d == 0)
        return v, p // v
    raise ValueError(f"unknown reshape mode {mode!r}; allowed: pad, divisor")


def mp_filter(update: np.ndarray, noise_var: float, q: float = 6.0, mode: str = "pad",
              keep_below: bool = False) -> tuple[np.ndarray, dict]:
    """Marchenko–Pastur eigen-filtering of a flattened update (GradDefense's compensation).

    Args:
        update: ``float (P,)`` aggregated update.
        noise_var: per-entry variance ``σ²`` of the noise in ``update``.
        q: target aspect ratio ``V/W``.
        mode: reshape mode, ``"pad"`` or ``"divisor"``.
        keep_below: also keep the eigenvectors with ``λ <= λ−`` (the public code's rule).

    Returns:
        ``(filtered (P,), info)`` with ``info`` = ``V``, ``W``, ``kept`` (eigenvectors kept), ``lambda_minus``,
        ``lambda_plus``.
    """
    p = update.size
    v, w = matrix_shape(p, q, mode)
    padded = np.zeros(v * w, dtype=np.float64)
    padded[:p] = update
    c = padded.reshape(v, w)
    ratio = v / w
    lo = noise_var * (1 - 1 / math.sqrt(ratio)) ** 2
    hi = noise_var * (1 + 1 / math.sqrt(ratio)) ** 2
    if w < 2:
        return update.copy(), {"V": v, "W": w, "kept": w, "lambda_minus": lo, "lambda_plus": hi}
    # np.cov(c, rowvar=False) and np.linalg.eigh, in torch: it honours torch.set_num_threads, whereas numpy's BLAS
    # threads oversubscribe a loaded machine (40 ms instead of 1 ms for a 286×47 matrix here)
    ct = torch.from_numpy(c)
    centred = ct - ct.mean(dim=0)
    evals, evecs = torch.linalg.eigh(centred.T @ centred / (v - 1))
    keep = (evals >= hi) | ((evals <= lo) if keep_below else torch.zeros_like(evals, dtype=torch.bool))
    u = evecs[:, keep]
    out = (ct @ u @ u.T).reshape(-1)[:p].numpy()
    return out, {"V": v, "W": w, "kept": int(keep.sum()), "lambda_minus": lo, "lambda_plus": hi}


def update_noise_variance(sigma: float, lr: float, steps: int) -> float:
    """Variance ``lr² · K · σ²`` that ``K`` local steps with ``N(0, σ²)`` on a gradient entry leave on ``Δ``."""
    return lr**2 * steps * sigma**2


def slice_noise_variance(params: object, lr: float, steps: int) -> float:
    """Per-entry noise variance of one update under GradDefense-style slice noise, from public parameters.

    Each of the ``steps`` local steps adds ``N(0, σ²)`` to a random ``M/S`` share of the gradient's entries and
    ``Δ = −lr Σ ĝ``, so an entry of ``Δ`` carries variance ``(M/S) · lr² · K · σ²`` on average.

    Args:
        params: the defense's public parameters with ``sigma``, ``slices`` and ``perturb_slices`` attributes.
        lr: the local learning rate the server sent.
        steps: the local steps behind the update.

    Raises:
        NotApplicable: (a ``ValueError``) ``params`` is not of a slice-noise defense (no ``sigma``/``slices``/
            ``perturb_slices``).
    """
    try:
        sigma, frac = float(params.sigma), int(params.perturb_slices) / int(params.slices)  # type: ignore[attr-defined]
    except AttributeError:
        raise NotApplicable("attack-denoise=mp needs a defense with Gaussian slice noise (sigma, slices, "
                         "perturb-slices: graddefense)") from None
    return frac * update_noise_variance(sigma, lr, steps)


def denoise_gradients(payload: AttackPayload, grads: list[torch.Tensor], q: float = 6.0) -> list[torch.Tensor]:
    """The observed average gradients after Marchenko–Pastur filtering of the single update they come from.

    Args:
        payload: the payload (``defense``, ``train_config`` and ``num_examples`` granted).
        grads: the observed average gradients (``update_to_gradient``), ``model.parameters()`` order.
        q: the aspect ratio ``V/W`` of the filtered matrix.

    Returns:
        The filtered gradients, same shapes.

    Raises:
        NotApplicable: the defense has no public slice-noise parameters.
        ThreatModelError: ``defense_params`` not granted.
    """
    info = payload._need(payload.defense, "the defense's public parameters (defense_params)")
    steps = payload.local_steps
    lr = float(payload.train_config.lr)
    var_delta = slice_noise_variance(info.params, lr, steps)
    var_grad = var_delta / (lr * steps) ** 2  # ĝ = −Δ / (lr·K)
    flat = torch.cat([g.detach().reshape(-1).double().cpu() for g in grads]).numpy()
    filtered, _ = mp_filter(flat, var_grad, q)
    out, pos = [], 0
    for g in grads:
        out.append(torch.from_numpy(filtered[pos:pos + g.numel()].copy()).view_as(g).to(g.device, g.dtype))
        pos += g.numel()
    return out
