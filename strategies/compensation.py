"""Server-side steps of client defenses, applied to the FedAvg aggregate.

Registry :data:`SERVER_STEPS`: defense name → ``(aggregated ArrayRecord, train replies, sent, cfg) -> ArrayRecord``.
``sent`` holds what the server sent this round (``state``: the global state dict, ``config``: the train config).
A step may use only public parameters (the run config) and what the server received.

GradDefense's global update compensation (Wang et al., INFOCOM'22; ``wangjunxiao/GradDefense`` ``compensate.py``)
is :func:`graddefense_compensation`: the aggregated update of the trainable parameters is reshaped into a
``V × W`` matrix ``C``, the eigenvectors of its column covariance whose eigenvalues lie inside the
Marchenko–Pastur bulk of pure noise, ``[σ²(1 − 1/√q)², σ²(1 + 1/√q)²]`` with ``q = V/W``, are projected out
(``C ← C U Uᵀ`` over the kept eigenvectors ``U``), and the result is added back to the global model.

Three quirks of the public code are options (defaults: the corrected form):

* ``defense-gd-noise-variance``: ``mean`` (default) uses the noise variance of what is filtered — the
  example-weighted *mean* of the clients' updates: ``σ_agg² = (M/S) · σ_Δ² · Σ_k w_k²`` with ``w_k = n_k/Σn`` and
  ``σ_Δ² = lr² · K_k · σ²`` for ``K_k`` local steps (each step adds ``N(0, σ²)`` to a random ``M/S`` share of the
  entries, and ``Δ = −lr Σ ĝ``). ``sum`` is the code's ``K · (M/S) · σ²`` — the variance of the *sum* of ``K``
  clients' perturbations, applied to the mean (``K²`` times too large for equal weights; here in the same ``Δ``
  units), which can project signal directions out as noise.
* ``defense-gd-reshape``: ``pad`` (default) takes ``W = ⌊√(P/Q)⌋``, ``V = ⌈P/W⌉`` and zero-pads the flattened
  update to ``V·W`` (fewer than ``W`` padded zeros, dropped afterwards), so ``q ≈ Q`` for every ``P``. ``divisor``
  is the code's: ``V`` = the smallest divisor of ``P`` with ``V ≥ √(Q·P)``, ``W = P/V`` — degenerate when ``P`` has
  no divisor near ``√(Q·P)`` (e.g. ``P = 2 · 9719`` gives ``W = 2``: a 2×2 covariance, nothing to filter).
* ``defense-gd-keep-below``: the code keeps the eigenvectors *below* the bulk (``λ <= λ−``) as well as above it.
  Signal spikes only push eigenvalues above ``λ+``; below-bulk directions are noise (finite-sample fluctuation), and
  when ``σ_agg²`` is overestimated (the ``sum`` variance) ``λ−`` rises into the actual noise bulk, so keeping them
  keeps most of the noise. Default: keep only ``λ >= λ+``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

ServerStep = Callable[[ArrayRecord, list[Message], Mapping[str, Any], Mapping[str, Any]], ArrayRecord]


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


def _local_steps(train_config: Mapping[str, Any], num_examples: int) -> int:
    """Local SGD steps behind one client's update, from the train config the server sent (as the attacker does)."""
    if train_config.get("mode", "fedsgd") == "fedsgd":
        return 1
    if int(train_config.get("local-steps", 0)) > 0:
        return int(train_config["local-steps"])
    bs = max(1, int(train_config.get("batch-size", 1)))
    return int(train_config.get("local-epochs", 1)) * math.ceil(num_examples / bs)


def graddefense_noise_variance(cfg: Mapping[str, Any], train_config: Mapping[str, Any],
                               num_examples: list[int]) -> float:
    """Per-entry noise variance of the aggregated update under GradDefense, from public parameters only.

    Args:
        cfg: run config (``defense-gd-sigma``, ``-slices``, ``-perturb-slices``, ``-noise-variance``).
        train_config: what the server sent (``lr``, ``mode``, ``batch-size``, ``local-steps``, ``local-epochs``).
        num_examples: each aggregated client's ``num-examples`` (its FedAvg weight).

    Returns:
        ``σ_agg²`` in update (``Δ``) units; see the module docstring for ``mean`` vs ``sum``.
    """
    sigma = float(cfg["defense-gd-sigma"])
    frac = int(cfg["defense-gd-perturb-slices"]) / int(cfg["defense-gd-slices"])
    lr = float(train_config["lr"])
    total = float(sum(num_examples))
    var_delta = [lr**2 * _local_steps(train_config, n) * sigma**2 for n in num_examples]
    if cfg["defense-gd-noise-variance"] == "sum":
        return len(num_examples) * frac * float(np.mean(var_delta))
    return frac * sum((n / total) ** 2 * v for n, v in zip(num_examples, var_delta))


def graddefense_compensation(arrays: ArrayRecord, replies: list[Message], sent: Mapping[str, Any],
                             cfg: Mapping[str, Any]) -> ArrayRecord:
    """Compensate the FedAvg aggregate of GradDefense-perturbed updates (``defense-gd-compensation``).

    Only floating-point keys that the server sent are filtered (all of a model's tensors that GradDefense perturbs
    are parameters; BatchNorm counters are left alone). Returns ``arrays`` unchanged when compensation is off.
    """
    if not bool(cfg["defense-gd-compensation"]) or not replies:
        return arrays
    from strategies.strategy import reply_metrics

    state = arrays.to_torch_state_dict()
    glob = sent["state"]
    keys = [k for k in state if k in glob and state[k].is_floating_point()
            and not k.endswith(("running_mean", "running_var"))]
    delta = np.concatenate([(state[k].double() - glob[k].double()).reshape(-1).numpy() for k in keys])
    weights = [int(reply_metrics(m)["num-examples"]) for m in replies]
    var = graddefense_noise_variance(cfg, sent["config"], weights)
    filtered, _ = mp_filter(delta, var, float(cfg["defense-gd-q"]), str(cfg["defense-gd-reshape"]),
                            bool(cfg["defense-gd-keep-below"]))
    out, pos = dict(state), 0
    for k in keys:
        n = glob[k].numel()
        out[k] = (glob[k].double() + torch.from_numpy(filtered[pos : pos + n]).view(glob[k].shape)).to(state[k].dtype)
        pos += n
    return ArrayRecord(out)


#: Server-side defense steps by defense name (defenses without one are absent).
SERVER_STEPS: dict[str, ServerStep] = {
    "graddefense": graddefense_compensation,
}
