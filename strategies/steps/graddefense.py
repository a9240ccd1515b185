"""GradDefense's server step: global update compensation of the FedAvg aggregate.

GradDefense's global update compensation (Wang et al., INFOCOM'22; ``wangjunxiao/GradDefense`` ``compensate.py``)
is :func:`compensate`: the aggregated update of the trainable parameters is reshaped into a
``V × W`` matrix ``C``, the eigenvectors of its column covariance whose eigenvalues lie inside the
Marchenko–Pastur bulk of pure noise, ``[σ²(1 − 1/√q)², σ²(1 + 1/√q)²]`` with ``q = V/W``, are projected out
(``C ← C U Uᵀ`` over the kept eigenvectors ``U``; :func:`attacker.denoise.mp_filter`), and the result is added
back to the global model. Its parameters are GradDefense's own (the ``defense-gd-*`` keys, all public), which the
step receives as the defense's parameter object.

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

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from attacker.denoise import mp_filter, update_noise_variance
from fl_sim.task.arrays import to_array_record, to_state_dict
from fl_sim.task.contract import NUM_EXAMPLES, TrainConfig, reply_metrics
from strategies.rounds import SentRound

#: GradDefense's parameter object as this step reads it (``sigma``, ``slices``, ``perturb_slices``,
#: ``noise_variance``, ``compensation``, ``q``, ``reshape``, ``keep_below``): duck-typed, the server never imports
#: client code.
Params = object


def noise_variance(params: Params, train_config: TrainConfig, num_examples: list[int]) -> float:
    """Per-entry noise variance of the aggregated update under GradDefense, from public parameters only.

    Args:
        params: GradDefense's public parameters (``sigma``, ``slices``, ``perturb_slices``, ``noise_variance``).
        train_config: what the server sent.
        num_examples: each aggregated client's ``num-examples`` (its FedAvg weight).

    Returns:
        ``σ_agg²`` in update (``Δ``) units; see the module docstring for ``mean`` vs ``sum``.
    """
    frac = params.perturb_slices / params.slices
    total = float(sum(num_examples))
    var_delta = [update_noise_variance(params.sigma, train_config.lr, train_config.steps(n)) for n in num_examples]
    if params.noise_variance == "sum":
        return len(num_examples) * frac * float(np.mean(var_delta))
    return frac * sum((n / total) ** 2 * v for n, v in zip(num_examples, var_delta))


def compensate(arrays: ArrayRecord, replies: list[Message], sent: SentRound, params: Params) -> ArrayRecord:
    """Compensate the FedAvg aggregate of GradDefense-perturbed updates (``defense-gd-compensation``).

    Only floating-point keys that the server sent are filtered (all of a model's tensors that GradDefense perturbs
    are parameters; BatchNorm counters are left alone). Returns ``arrays`` unchanged when compensation is off.
    """
    if not params.compensation or not replies:
        return arrays
    state = to_state_dict(arrays)  # arrays.to_torch_state_dict(), without np.load per array (fl_sim.task.arrays)
    glob = sent.state
    keys = [k for k in state if k in glob and state[k].is_floating_point()
            and not k.endswith(("running_mean", "running_var"))]
    delta = np.concatenate([(state[k].double() - glob[k].double()).reshape(-1).numpy() for k in keys])
    weights = [int(reply_metrics(m)[NUM_EXAMPLES]) for m in replies]
    var = noise_variance(params, sent.train_config, weights)
    filtered, _ = mp_filter(delta, var, params.q, params.reshape, params.keep_below)
    out, pos = dict(state), 0
    for k in keys:
        n = glob[k].numel()
        out[k] = (glob[k].double() + torch.from_numpy(filtered[pos : pos + n]).view(glob[k].shape)).to(state[k].dtype)
        pos += n
    return to_array_record(out)  # ArrayRecord(out), byte for byte
