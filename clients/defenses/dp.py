"""Local differential privacy on every local step's gradient: clip, then add Gaussian or Laplace noise.

* ``dp-gaussian``: flat L2 clip of the step's gradient to ``C`` (``g · min(1, C / ‖g‖₂)`` over all tensors
  together), then i.i.d. ``N(0, σ²)`` on every entry. With ``σ`` derived from ``(ε, δ)`` this is the Gaussian
  mechanism as Flower's ``LocalDpMod`` applies it (Dwork & Roth 2014, Thm. A.1):
  ``σ = Δ · √(2 ln(1.25/δ)) / ε`` with sensitivity ``Δ`` (Flower leaves ``Δ`` to the user; here it defaults to
  ``C``).
* ``dp-laplace``: flat **L1** clip to ``C`` (the Laplace mechanism's sensitivity is an L1 bound), then i.i.d.
  ``Laplace(0, b)`` with ``b = Δ / ε`` (Dwork, McSherry, Nissim & Smith 2006).

These are the "DP-G" / "DP-L" baselines of the GradDefense talk (seed 001) and of DLG's Sec. 5 noise experiment
(which used noise without clipping: set ``defense-dp-clip`` very large and ``defense-dp-noise`` directly). The
noise is drawn from the step's client-, round- and step-seeded ``torch.Generator``; the seed never leaves the
client.

Parameters (run-config keys, defaults):
    ``defense-dp-clip`` (1.0): clipping norm ``C`` (L2 for Gaussian, L1 for Laplace).
    ``defense-dp-epsilon`` (10.0): ε of one release (one local step).
    ``defense-dp-delta`` (1e-5): δ of one Gaussian release; also the δ at which the spent budget is reported.
    ``defense-dp-sensitivity`` (0.0): ``Δ``; 0 means ``Δ = C``.
    ``defense-dp-noise`` (0.0): the noise scale given directly (Gaussian std ``σ`` / Laplace ``b``); 0 means
    derive it from ``(ε, δ, Δ)``.

Privacy budget: each client counts its noised releases (local steps) in its ``Context.state`` and reports, with
every reply, ``dp-releases`` and ``dp-epsilon`` = the ε at ``defense-dp-delta`` of that many adaptive
compositions, from the Rényi-DP accountant of Google's ``dp-accounting`` (``RdpAccountant`` with
``GaussianDpEvent(σ/Δ)`` or ``LaplaceDpEvent(b/Δ)``, no sampling amplification: a client knows when it is
sampled). The guarantee is for the step gradient (the batch's whole contribution) with sensitivity ``Δ``; it holds
only if ``Δ`` bounds how much that gradient can change (``Δ = 2C`` for replace-one adjacency of a clipped vector).

What the server must know: nothing (plain FedAvg); the noise is not removed. Central DP (Flower's
``DifferentialPrivacy*FixedClipping``) adds noise only to the aggregate, so a curious server still sees raw
updates: not a defense in this threat model.

Known breaks: small noise (DLG: variance ≤ 1e-3) leaves images recoverable; noise large enough to stop DLG
(variance ≥ 1e-2) costs most of the accuracy (seed 001: ~10 % accuracy). Clipping alone does not stop inversion
(the update's direction is kept). Bayesian/denoising attacks (Balunović et al., ICLR'22) use the known noise law.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import dp_accounting
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord, RecordDict

from clients.defenses.base import Defense, StepContext
from fl_sim.task.keys import Key

STATE_KEY = "dp"

#: The keys of both DP defenses (the same objects in both declarations).
KEYS = {
    "defense-dp-clip": Key(1.0, "dp-*: clipping norm C of each step's gradient (L2 for gaussian, L1 for laplace)",
                           low=0, low_open=True),
    "defense-dp-epsilon": Key(10.0, "dp-*: epsilon of one noised release (one local step)", low=0, low_open=True),
    "defense-dp-delta": Key(1e-5, "dp-*: delta of one Gaussian release; also the delta of the reported budget",
                            low=0, low_open=True, high=0.5),
    "defense-dp-sensitivity": Key(0.0, "dp-*: sensitivity of one release (0 = the clipping norm)", low=0),
    "defense-dp-noise": Key(0.0, "dp-*: noise scale given directly (Gaussian std / Laplace b; 0 = from epsilon, "
                                 "delta)", low=0),
}


@dataclass(frozen=True)
class Params:
    """The DP defenses' parameters (see the module docstring): ``clip`` C, ``epsilon``, ``delta``,
    ``sensitivity`` Δ (0 = C) and ``noise`` (a noise scale given directly; 0 = from ε, δ, Δ)."""

    clip: float
    epsilon: float
    delta: float
    sensitivity: float
    noise: float


def sensitivity(p: Params) -> float:
    """``defense-dp-sensitivity``, or the clipping norm when it is 0."""
    return p.sensitivity or p.clip


def gaussian_sigma(sens: float, epsilon: float, delta: float) -> float:
    """The Gaussian mechanism's noise std ``σ = Δ · √(2 ln(1.25/δ)) / ε`` (as Flower's ``LocalDpMod``).

    Raises:
        ValueError: ``ε <= 0``, ``δ`` not in (0, 1) or ``Δ < 0``.
    """
    if epsilon <= 0 or not 0 < delta < 1 or sens < 0:
        raise ValueError(f"Gaussian mechanism needs ε > 0, 0 < δ < 1, Δ >= 0 (got {epsilon}, {delta}, {sens})")
    return sens * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def laplace_scale(sens: float, epsilon: float) -> float:
    """The Laplace mechanism's scale ``b = Δ / ε``.

    Raises:
        ValueError: ``ε <= 0`` or ``Δ < 0``.
    """
    if epsilon <= 0 or sens < 0:
        raise ValueError(f"Laplace mechanism needs ε > 0 and Δ >= 0 (got {epsilon}, {sens})")
    return sens / epsilon


def noise_scale(mechanism: str, p: Params) -> float:
    """The per-entry noise scale of ``mechanism`` (``"gaussian"``: std; ``"laplace"``: b) under ``p``."""
    if p.noise > 0:
        return p.noise
    if mechanism == "gaussian":
        return gaussian_sigma(sensitivity(p), p.epsilon, p.delta)
    return laplace_scale(sensitivity(p), p.epsilon)


def clip(grads: list[torch.Tensor], bound: float, p: int = 2) -> list[torch.Tensor]:
    """Flat clip: scale all tensors together so that their joint Lp norm (p = 1 or 2) is at most ``bound``."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, ord=p) for g in grads]), ord=p)
    factor = torch.clamp(bound / (norm + 1e-12), max=1.0)
    return [g * factor for g in grads]


def _noise(shape: torch.Size, mechanism: str, scale: float, gen: torch.Generator) -> torch.Tensor:
    if mechanism == "gaussian":
        return torch.randn(shape, generator=gen) * scale
    # Laplace by inverse CDF from a generator-seeded uniform in (-1/2, 1/2)
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12) - 0.5
    return (-scale * torch.sign(u) * torch.log1p(-2.0 * u.abs())).float()


def perturb(grads: list[torch.Tensor], mechanism: str, clip_norm: float, scale: float,
            gen: torch.Generator) -> list[torch.Tensor]:
    """Clip (L2 for ``"gaussian"``, L1 for ``"laplace"``) and add i.i.d. noise of ``scale`` to every entry.

    Args:
        grads: gradient tensors (any shapes and device).
        mechanism: ``"gaussian"`` or ``"laplace"``.
        clip_norm: ``C`` > 0.
        scale: Gaussian std or Laplace ``b`` (>= 0).
        gen: CPU ``torch.Generator`` the noise is drawn from (then moved to each tensor's device).

    Returns:
        New tensors, same shapes and devices.
    """
    clipped = clip(grads, clip_norm, p=2 if mechanism == "gaussian" else 1)
    return [g + _noise(g.shape, mechanism, scale, gen).to(g.device, g.dtype) for g in clipped]


@functools.lru_cache(maxsize=256)
def epsilon_spent(mechanism: str, multiplier: float, releases: int, delta: float) -> float:
    """ε at ``delta`` after ``releases`` compositions of one mechanism (Rényi-DP accountant of ``dp-accounting``).

    Args:
        mechanism: ``"gaussian"`` or ``"laplace"``.
        multiplier: noise scale divided by the sensitivity (σ/Δ or b/Δ).
        releases: number of noised releases (>= 0).
        delta: target δ.

    Returns:
        ε (``inf`` when the multiplier is 0). For Laplace, the smaller of the RDP bound and basic composition
        ``releases · Δ/b`` (pure DP).
    """
    if releases == 0:
        return 0.0
    if multiplier <= 0:
        return math.inf
    event = (dp_accounting.GaussianDpEvent(multiplier) if mechanism == "gaussian"
             else dp_accounting.LaplaceDpEvent(multiplier))
    acc = RdpAccountant()
    acc.compose(event, int(releases))
    eps = float(acc.get_epsilon(delta))
    if mechanism == "laplace":  # pure ε-DP composes linearly (δ = 0); report the tighter of the two
        eps = min(eps, releases / multiplier)
    return eps


def _apply(mechanism: str, grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    p: Params = ctx.params
    out = perturb(grads, mechanism, p.clip, noise_scale(mechanism, p), ctx.generator)
    rec = ctx.state[STATE_KEY] if STATE_KEY in ctx.state else ConfigRecord({"releases": 0})
    rec["releases"] = int(rec["releases"]) + 1
    ctx.state[STATE_KEY] = rec
    return out


def _report(mechanism: str, state: RecordDict, p: Params) -> dict[str, float]:
    releases = int(state[STATE_KEY]["releases"]) if STATE_KEY in state else 0
    sens = sensitivity(p)
    multiplier = noise_scale(mechanism, p) / sens if sens > 0 else math.inf
    eps = epsilon_spent(mechanism, multiplier, releases, p.delta)
    return {"dp-releases": releases, "dp-epsilon": eps if math.isfinite(eps) else -1.0}


def apply_gaussian(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """``dp-gaussian``: L2-clip the step's gradient to ``C`` and add ``N(0, σ²)`` to every entry."""
    return _apply("gaussian", grads, ctx)


def apply_laplace(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """``dp-laplace``: L1-clip the step's gradient to ``C`` and add ``Laplace(0, b)`` to every entry."""
    return _apply("laplace", grads, ctx)


def report_gaussian(state: RecordDict, p: Params) -> dict[str, float]:
    """``dp-releases`` and ``dp-epsilon`` (ε at ``defense-dp-delta``; -1 = unbounded) for ``dp-gaussian``."""
    return _report("gaussian", state, p)


def report_laplace(state: RecordDict, p: Params) -> dict[str, float]:
    """``dp-releases`` and ``dp-epsilon`` (ε at ``defense-dp-delta``; -1 = unbounded) for ``dp-laplace``."""
    return _report("laplace", state, p)


METRICS = ("dp-releases", "dp-epsilon")
GAUSSIAN = Defense("clip + Gaussian noise, (ε, δ) as Flower's LocalDpMod; RDP accountant", apply_gaussian, KEYS,
                   Params, "defense-dp-", metrics=METRICS, report=report_gaussian)
LAPLACE = Defense("L1 clip + Laplace noise (b = Δ/ε); RDP accountant", apply_laplace, KEYS, Params, "defense-dp-",
                  metrics=METRICS, report=report_laplace)
