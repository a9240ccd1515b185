"""Gradient compression ("GC"): per-tensor magnitude pruning of every local step's gradient.

Paper: the pruning defense of DLG (Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS'19, Sec. 5), coded as
in Soteria's and GradDefense's comparisons (``np.percentile`` per tensor), Plato's ``GC`` and GradAttack's
``GradPruneDefense``: for every parameter tensor ``g_l``, ``τ_l`` = the ``rate``-th percentile of ``|g_l|``
(linear interpolation, numpy's default) and ``g_l[|g_l| < τ_l] = 0``. It is not a global top-k.

Parameters (run-config keys):
    ``defense-prune-rate`` (80.0): percent of each tensor's entries to zero, in [0, 100]. Plato uses 80; the
    Soteria figure sweeps 40–80; DLG reports that more than ~20 % stops DLG on its LeNet.

What the server must know: nothing (plain FedAvg).

Known breaks: the GS / Inverting-Gradients attack still recovers images at 40–50 % (Soteria, Fig. "GS_defense");
GGL's adaptive attack estimates the rate from the fraction of exact zeros and prunes its trial gradients the same
way; learned inversion ("Learning to invert", ICLR'23) breaks compression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clients.defenses.base import Defense, StepContext
from fl_sim.task.keys import Key

KEYS = {
    "defense-prune-rate": Key(80.0, "prune: percent of each gradient tensor's entries zeroed (smallest magnitudes)",
                              low=0, high=100),
}


@dataclass(frozen=True)
class Params:
    """``prune``'s parameters: ``rate`` (percent of each tensor's entries zeroed)."""

    rate: float


def percentile(values: torch.Tensor, rate: float) -> torch.Tensor:
    """The ``rate``-th percentile (0–100) of ``values`` with linear interpolation, as ``numpy.percentile``.

    Works on any size (``torch.quantile`` refuses more than 2**24 entries). Returns a 0-d tensor on
    ``values.device``.
    """
    v = values.flatten()
    pos = (v.numel() - 1) * float(rate) / 100.0
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    below = v.kthvalue(lo + 1).values  # order statistics by selection, not a full sort
    above = v.kthvalue(hi + 1).values if hi != lo else below
    return below + (pos - lo) * (above - below)


def prune(grads: list[torch.Tensor], rate: float) -> list[torch.Tensor]:
    """Zero the entries of each tensor whose magnitude is below that tensor's ``rate``-th percentile.

    Args:
        grads: gradient tensors (any shapes, floating point).
        rate: percent in [0, 100]; 0 returns the tensors unchanged.

    Returns:
        New tensors, same shapes: about ``rate`` % of each tensor's entries are 0 (exactly
        ``⌊rate/100 · (n−1)⌋ + 1`` of ``n`` distinct magnitudes, fewer when the threshold falls on a tie).

    Raises:
        ValueError: ``rate`` outside [0, 100].
    """
    if not 0.0 <= rate <= 100.0:
        raise ValueError(f"pruning rate {rate} is not a percentage in [0, 100]")
    if rate == 0.0:
        return grads
    out = []
    for g in grads:
        mag = g.abs()
        out.append(torch.where(mag < percentile(mag, rate), torch.zeros_like(g), g))
    return out


def apply(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """Prune each step's gradient at ``defense-prune-rate`` percent (see :func:`prune`)."""
    return prune(grads, ctx.params.rate)


DEFENSE = Defense("gradient compression: per-tensor magnitude pruning (DLG, NeurIPS'19)", apply, KEYS, Params,
                  "defense-prune-")
