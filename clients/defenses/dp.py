"""Differential privacy on each local step's *batch* gradient (``dp-gaussian``, ``dp-laplace``), and the privacy
accounting and keys that every DP defense of fl-sim shares (``dp-sgd`` in :mod:`clients.defenses.dp_sgd`,
``local-dp`` in :mod:`clients.defenses.local_dp`).

* ``dp-gaussian`` — **a Gaussian mechanism on each step's clipped batch gradient**: the gradient of the step's
  mean loss is flat-L2-clipped to ``C`` (``g · min(1, C / ‖g‖₂)`` over all tensors together), then i.i.d.
  ``N(0, σ²)`` is added to every entry. ``σ = Δ · σ₁(ε, δ)`` with ``σ₁`` the **analytic Gaussian mechanism**
  (Balle & Wang, "Improving the Gaussian Mechanism for Differential Privacy", ICML 2018, Thm. 8; dp-accounting's
  ``get_sigma_gaussian``): the smallest σ for which one release is (ε, δ)-DP, valid for every ε > 0. The classical
  ``σ = Δ√(2 ln(1.25/δ))/ε`` (Dwork & Roth 2014, Thm. A.1; what Flower's ``LocalDpMod`` uses) holds only for
  ε < 1: at ε = 10, δ = 1e-5 it gives σ = 0.4845 where (ε, δ) needs 0.4999 (:func:`classical_gaussian_sigma`).
* ``dp-laplace`` — the Laplace mechanism on each step's **L1**-clipped batch gradient: ``Laplace(0, b)`` with
  ``b = Δ / ε`` (Dwork, McSherry, Nissim & Smith 2006), ε-DP per release.

Unit protected and neighbouring relation: one **local batch** (the step's whole batch; for B > 1 one example
gets no better guarantee, since clipping the batch *mean* does not bound one example's share). With ``Δ = C`` (the
default) two neighbouring inputs are "the batch contributes its clipped gradient" and "it contributes nothing"
(add/remove of the batch's contribution); for replace-one (any batch against any other) set
``defense-dp-sensitivity`` to ``2C``. No sampling amplification is claimed (the batches are the pipeline's
ordinary ones).

Privacy budget: every client counts its noised releases (local steps) in its ``Context.state`` and reports with
every reply ``dp-releases`` and ``dp-epsilon`` = the ε at ``defense-dp-delta`` of that many adaptive compositions
(``defense-dp-accountant``): ``pld`` composes the privacy-loss distributions — for the Gaussian mechanism
exactly: R releases with multiplier z = σ/Δ are together a Gaussian mechanism with multiplier z/√R (the Gaussian
PLD is closed under composition: μ-GDP composes as √(Σμ²); Dong, Roth & Su, "Gaussian Differential Privacy",
JRSS-B 2022), evaluated with dp-accounting's ``get_epsilon_gaussian`` (what its ``PLDAccountant`` computes up to
its discretisation; a test checks); for Laplace dp-accounting's ``PLDAccountant`` (pessimistic, value
discretisation :data:`DISCRETIZATION`); ``rdp`` is dp-accounting's Rényi accountant (looser). For Laplace the
reported ε is also capped by basic composition ``R · Δ/b`` (pure DP).

What the server must know: nothing (plain FedAvg); the noise is not removed. Central DP (Flower's
``DifferentialPrivacy*FixedClipping``) adds noise only to the aggregate, so a curious server still sees raw
updates: not a defense in this threat model.

Not covered by the guarantee: the reply's ``train-loss`` (an un-noised mean of the batch losses, a standard metric
of every reply) and its timings; a strict reading must drop them.

Known breaks: small noise (DLG: variance ≤ 1e-3) leaves images recoverable; noise large enough to stop DLG
(variance ≥ 1e-2) costs most of the accuracy (seed 001: ~10 % accuracy). Clipping alone does not stop inversion
(the update's direction is kept). Bayesian/denoising attacks (Balunović et al., ICLR'22) use the known noise law.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, RecordDict

from clients.defenses.base import Defense, StepContext
from fl_sim.task.keys import Key

STATE_KEY = "dp"


def dp_accounting_lib():
    """The ``dp_accounting`` package with its ``pld`` and ``rdp`` accountants, imported on first use.

    It pulls in SciPy (~1.4 s of a ClientApp's import on this machine), which every ClientApp process — Flower's
    deployment engine starts one per message — and every simulated node would otherwise pay, with any defense.
    """
    import dp_accounting
    import dp_accounting.pld
    import dp_accounting.rdp

    return dp_accounting

#: Value discretisation of dp-accounting's PLD accountant here: 1e-3 instead of its default 1e-4 (10× faster;
#: the estimate stays pessimistic, i.e. an upper bound on ε; on dp.md's reference rows it is at most +0.011 above
#: the 1e-4 value).
DISCRETIZATION = 1e-3

ACCOUNTANTS = ("pld", "rdp")

#: The keys of every DP defense (the same objects in each declaration; each declares the ones it uses).
KEYS = {
    "defense-dp-clip": Key(1.0, "dp-*: clipping norm C: dp-gaussian: L2 bound of each step's batch gradient; "
                                "dp-laplace: its L1 bound; dp-sgd: L2 bound of each example's gradient; local-dp: "
                                "L2 bound of the round's model update", low=0, low_open=True),
    "defense-dp-epsilon": Key(10.0, "dp-*: dp-gaussian, dp-laplace: epsilon of one release (one local step); "
                                    "local-dp: the epsilon Flower's LocalDpMod is given for one round; dp-sgd: the "
                                    "target epsilon of the client's whole run (never exceeded)", low=0,
                              low_open=True),
    "defense-dp-delta": Key(1e-5, "dp-*: delta of one Gaussian release (dp-gaussian, local-dp), dp-sgd's target "
                                  "delta, and the delta of every reported budget", low=0, low_open=True, high=0.5),
    "defense-dp-sensitivity": Key(0.0, "dp-gaussian, dp-laplace, local-dp: sensitivity of one release (0 = the "
                                       "clipping norm; 2C for replace-one neighbours)", low=0),
    "defense-dp-noise": Key(0.0, "dp-gaussian, dp-laplace, local-dp: noise scale given directly (Gaussian std / "
                                 "Laplace b; 0 = from epsilon, delta)", low=0),
    "defense-dp-noise-multiplier": Key(0.0, "dp-sgd: noise std divided by the clipping norm (0 = calibrated so that "
                                            "the planned steps reach the target epsilon, delta)", low=0),
    "defense-dp-rounds": Key(0, "dp-sgd: rounds the budget is planned for (0 = num-server-rounds)", low=0),
    "defense-dp-accountant": Key("pld", "dp-*: privacy accountant of the reported (and dp-sgd's calibrated) "
                                        "epsilon: pld (privacy-loss distributions, tight) or rdp (Renyi DP)",
                                 choices=ACCOUNTANTS),
}

#: The keys ``dp-gaussian`` and ``dp-laplace`` use.
STEP_KEYS = {k: KEYS[k] for k in ("defense-dp-clip", "defense-dp-epsilon", "defense-dp-delta",
                                  "defense-dp-sensitivity", "defense-dp-noise", "defense-dp-accountant")}


@dataclass(frozen=True)
class Params:
    """The parameters of ``dp-gaussian``, ``dp-laplace`` and ``local-dp`` (see the module docstrings): ``clip`` C,
    ``epsilon`` and ``delta`` of one release, ``sensitivity`` Δ (0 = C), ``noise`` (a noise scale given directly;
    0 = from ε, δ, Δ) and the ``accountant`` of the reported budget."""

    clip: float
    epsilon: float
    delta: float
    sensitivity: float
    noise: float
    accountant: str


class PrivacyBudgetExhausted(ValueError):
    """A release would take a client's spent ε past its target (dp-sgd refuses to train that round)."""


def sensitivity(p: Params) -> float:
    """``defense-dp-sensitivity``, or the clipping norm when it is 0."""
    return p.sensitivity or p.clip


# -- calibration ---------------------------------------------------------------------------------------------------
def gaussian_sigma(sens: float, epsilon: float, delta: float) -> float:
    """The analytic Gaussian mechanism's noise std: the smallest σ for which one release of a function with L2
    sensitivity ``sens`` is (ε, δ)-DP (Balle & Wang, ICML 2018, Thm. 8; dp-accounting's ``get_sigma_gaussian``,
    tolerance 1e-12, multiplied by Δ). Valid for every ε > 0.

    Raises:
        ValueError: ``ε <= 0``, ``δ`` not in (0, 1) or ``Δ < 0``.
    """
    if epsilon <= 0 or not 0 < delta < 1 or sens < 0:
        raise ValueError(f"Gaussian mechanism needs ε > 0, 0 < δ < 1, Δ >= 0 (got {epsilon}, {delta}, {sens})")
    return sens * _sigma_one(float(epsilon), float(delta))


@functools.lru_cache(maxsize=256)
def _sigma_one(epsilon: float, delta: float) -> float:
    return float(dp_accounting_lib().get_sigma_gaussian(epsilon, delta))


def classical_gaussian_sigma(sens: float, epsilon: float, delta: float) -> float:
    """The classical calibration ``σ = Δ · √(2 ln(1.25/δ)) / ε`` (Dwork & Roth 2014, Thm. A.1; Flower's
    ``LocalDpMod``). It gives (ε, δ)-DP only for ε < 1; for ε ≳ 8 it is *below* the analytic σ (not private
    enough). Kept to report what ``LocalDpMod`` claims and for comparisons.

    Raises:
        ValueError: ``ε <= 0``, ``δ`` not in (0, 1) or ``Δ < 0``.
    """
    if epsilon <= 0 or not 0 < delta < 1 or sens < 0:
        raise ValueError(f"Gaussian mechanism needs ε > 0, 0 < δ < 1, Δ >= 0 (got {epsilon}, {delta}, {sens})")
    return sens * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def laplace_scale(sens: float, epsilon: float) -> float:
    """The Laplace mechanism's scale ``b = Δ / ε`` (ε-DP for L1 sensitivity Δ).

    Raises:
        ValueError: ``ε <= 0`` or ``Δ < 0``.
    """
    if epsilon <= 0 or sens < 0:
        raise ValueError(f"Laplace mechanism needs ε > 0 and Δ >= 0 (got {epsilon}, {sens})")
    return sens / epsilon


def noise_scale(mechanism: str, p: Params) -> float:
    """The per-entry noise scale of ``mechanism`` (``"gaussian"``: std σ; ``"laplace"``: b) under ``p``."""
    if p.noise > 0:
        return p.noise
    if mechanism == "gaussian":
        return gaussian_sigma(sensitivity(p), p.epsilon, p.delta)
    return laplace_scale(sensitivity(p), p.epsilon)


# -- accounting ----------------------------------------------------------------------------------------------------
def check_accountant(accountant: str) -> None:
    """Raise ``ValueError`` unless ``accountant`` is one of :data:`ACCOUNTANTS`."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")


@functools.lru_cache(maxsize=1024)
def epsilon_spent(mechanism: str, multiplier: float, releases: int, delta: float, accountant: str = "pld") -> float:
    """ε at ``delta`` after ``releases`` adaptive compositions of one mechanism without sampling amplification.

    Args:
        mechanism: ``"gaussian"`` or ``"laplace"``.
        multiplier: noise scale divided by the sensitivity (σ/Δ for L2, b/Δ for L1).
        releases: number of noised releases (>= 0).
        delta: target δ.
        accountant: ``"pld"``: Gaussian exactly (R releases of multiplier z = one of z/√R, dp-accounting's
            ``get_epsilon_gaussian``), Laplace by dp-accounting's ``PLDAccountant`` (value discretisation
            :data:`DISCRETIZATION`); ``"rdp"``: dp-accounting's ``RdpAccountant`` (default orders).

    Returns:
        ε (``inf`` when the multiplier is 0). For Laplace, at most basic composition ``releases / multiplier``.

    Raises:
        ValueError: an unknown mechanism or accountant.
    """
    check_accountant(accountant)
    if mechanism not in ("gaussian", "laplace"):
        raise ValueError(f"mechanism={mechanism!r}; allowed: gaussian, laplace")
    if releases == 0:
        return 0.0
    if multiplier <= 0:
        return math.inf
    dpa = dp_accounting_lib()
    if mechanism == "gaussian":
        if accountant == "pld":
            return float(dpa.get_epsilon_gaussian(multiplier / math.sqrt(releases), delta))
        return float(dpa.rdp.RdpAccountant().compose(dpa.GaussianDpEvent(multiplier), int(releases))
                     .get_epsilon(delta))
    if accountant == "pld":
        # what dp-accounting's PLDAccountant(value_discretization_interval=DISCRETIZATION) computes for
        # compose(LaplaceDpEvent(multiplier), releases).get_epsilon(delta), step for step, with the one-release PLD
        # built once per multiplier: building it is about half of the accountant's time (~30 ms at b/Δ = 0.1)
        pld = dpa.pld.privacy_loss_distribution
        composed = pld.identity(value_discretization_interval=DISCRETIZATION).compose(
            _laplace_pld(multiplier).self_compose(int(releases)))
        eps = float(composed.get_epsilon_for_delta(delta))
    else:
        eps = float(dpa.rdp.RdpAccountant().compose(dpa.LaplaceDpEvent(multiplier), int(releases)).get_epsilon(delta))
    return min(eps, releases / multiplier)  # pure ε-DP composes linearly (δ = 0)


@functools.lru_cache(maxsize=64)
def _laplace_pld(multiplier: float):
    """dp-accounting's PLD of one Laplace release of noise multiplier ``multiplier`` (b/Δ), discretised as
    :func:`epsilon_spent` does (pessimistic, interval :data:`DISCRETIZATION`); never modified (``self_compose`` and
    ``compose`` return new objects)."""
    return dp_accounting_lib().pld.privacy_loss_distribution.from_laplace_mechanism(
        parameter=multiplier, value_discretization_interval=DISCRETIZATION)


# -- the mechanisms ------------------------------------------------------------------------------------------------
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


def count_release(state: RecordDict, key: str = STATE_KEY) -> int:
    """Add one to the release counter kept in ``state[key]`` and return the new count."""
    rec = state[key] if key in state else ConfigRecord({"releases": 0})
    rec["releases"] = int(rec["releases"]) + 1
    state[key] = rec
    return int(rec["releases"])


def releases(state: RecordDict, key: str = STATE_KEY) -> int:
    """The release counter kept in ``state[key]`` (0 when none yet)."""
    return int(state[key]["releases"]) if key in state else 0


def _apply(mechanism: str, grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    p: Params = ctx.params
    out = perturb(grads, mechanism, p.clip, noise_scale(mechanism, p), ctx.generator)
    count_release(ctx.state)
    return out


def _report(mechanism: str, state: RecordDict, p: Params) -> dict[str, float]:
    n = releases(state)
    sens = sensitivity(p)
    multiplier = noise_scale(mechanism, p) / sens if sens > 0 else math.inf
    eps = epsilon_spent(mechanism, multiplier, n, p.delta, p.accountant)
    return {"dp-releases": n, "dp-epsilon": eps if math.isfinite(eps) else -1.0}


def apply_gaussian(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """``dp-gaussian``: L2-clip the step's batch gradient to ``C`` and add ``N(0, σ²)`` to every entry."""
    return _apply("gaussian", grads, ctx)


def apply_laplace(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """``dp-laplace``: L1-clip the step's batch gradient to ``C`` and add ``Laplace(0, b)`` to every entry."""
    return _apply("laplace", grads, ctx)


def report_gaussian(state: RecordDict, p: Params) -> dict[str, float]:
    """``dp-releases`` and ``dp-epsilon`` (ε at ``defense-dp-delta``; -1 = unbounded) for ``dp-gaussian``."""
    return _report("gaussian", state, p)


def report_laplace(state: RecordDict, p: Params) -> dict[str, float]:
    """``dp-releases`` and ``dp-epsilon`` (ε at ``defense-dp-delta``; -1 = unbounded) for ``dp-laplace``."""
    return _report("laplace", state, p)


METRICS = ("dp-releases", "dp-epsilon")
GAUSSIAN = Defense("Gaussian mechanism on each step's clipped batch gradient, analytic σ (Balle & Wang, ICML'18); "
                   "PLD accountant", apply_gaussian, STEP_KEYS, Params, "defense-dp-", metrics=METRICS,
                   report=report_gaussian)
LAPLACE = Defense("Laplace mechanism on each step's L1-clipped batch gradient (b = Δ/ε); PLD accountant",
                  apply_laplace, STEP_KEYS, Params, "defense-dp-", metrics=METRICS, report=report_laplace)
