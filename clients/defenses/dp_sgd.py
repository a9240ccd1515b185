"""``dp-sgd``: DP-SGD on every local step — Poisson-sampled batches, per-example clipping, Gaussian noise on the sum.

Paper: Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar & Zhang, "Deep Learning with Differential Privacy",
CCS 2016 (arXiv 1607.00133), Algorithm 1, with the Poisson sampling its moments accountant assumes.

One local step of a client holding ``n`` examples, with the run's ``batch-size`` ``B``:

1. **Sampling** (:func:`batches`, the defense's own batch hook): every example of the partition joins the step's
   batch independently with probability ``q = B / n`` (Poisson sampling; batches have ``B`` examples on average,
   may be empty, and are drawn from the client's secret round generator). A round has the number of steps the
   train config implies (:meth:`fl_sim.task.contract.TrainConfig.steps`: 1 for FedSGD, ``local-steps``, or
   ``local-epochs · ⌈n/B⌉``).
2. **Per-example gradients** (:func:`clients.defenses.base.per_sample_gradients`, ``torch.func.vmap(grad)``) and
   flat L2 clipping of each to ``C`` (``g_i · min(1, C / ‖g_i‖₂)`` over all parameters together).
3. **Noise**: ``N(0, σ²C²)`` i.i.d. on every entry of the clipped *sum*; the step's gradient is that noisy sum
   divided by the expected batch size ``B`` (a fixed, public divisor, as Opacus' ``DPOptimizer`` does with
   ``expected_batch_size``: dividing by the actual batch size would make the noise scale depend on the sample).

Guarantee: **example-level** (ε, δ)-DP for the client's partition under the **add/remove-one** neighbouring
relation (one example more or less in this client's data), against everyone who sees the client's updates (the
curious server, over all rounds). Accountant: dp-accounting's ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``
composed once per local step (``defense-dp-accountant``: ``pld``, its ``PLDAccountant`` with value discretisation
:data:`clients.defenses.dp.DISCRETIZATION`, pessimistic; or ``rdp``, its ``RdpAccountant``); the server sees only
each round's final model, which is post-processing. ``dp-epsilon`` in every reply is the ε at
``defense-dp-delta`` spent by this client so far.

σ: ``defense-dp-noise-multiplier`` when given, else **calibrated** (:func:`calibrate_sigma`) so that the client's
*planned* steps — its steps per round × ``defense-dp-rounds`` (0 = ``num-server-rounds``: every round it could be
sampled in; both public) — spend exactly the target ``defense-dp-epsilon`` at ``defense-dp-delta``. A client never
exceeds the target: before a round it checks the ε it would reach after the round's steps and, if that is above
``defense-dp-epsilon``, refuses to train (:class:`~clients.defenses.dp.PrivacyBudgetExhausted`: an error reply,
dropped by the server like any other; as Flower's central-DP ``max_epsilon``).

Every reply reports ``dp-epsilon`` (spent), ``dp-delta``, ``dp-sigma`` (the noise multiplier σ: std / C),
``dp-q`` and ``dp-steps`` (steps so far); ``summary.json``'s ``privacy`` block keeps each client's last values.

Deviations: models with BatchNorm are refused before the run (their batch statistics mix examples and travel
un-noised in the update's buffers; Opacus refuses them too). Not covered by the guarantee: the reply's
``train-loss`` (an un-noised mean loss of the sampled examples, a standard metric of every reply) and timings.
The pipeline's ``num-examples`` is ``B`` (FedSGD) or ``n`` (FedAvg), never the size of a Poisson batch.

What the server must know: nothing (plain FedAvg). Known breaks: none for the guarantee itself; at ε ≈ 10 an
update still carries signal (the noise std per entry is ``σC/B``), so inversion of one step's gradient at large B
or small σ is possible in principle; see the README for measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn

from clients.defenses.base import Defense, StepContext, per_sample_gradients
from clients.defenses.dp import (
    DISCRETIZATION,
    KEYS,
    PrivacyBudgetExhausted,
    check_accountant,
    dp_accounting_lib,
)
from fl_sim.task.config import TaskConfig
from fl_sim.task.contract import TrainConfig
from fl_sim.task.datasets import DATASETS
from fl_sim.task.keys import ConfigError
from fl_sim.task.models import build_model

STATE_KEY = "dp-sgd"

#: The keys ``dp-sgd`` uses (shared objects with the other DP defenses).
SGD_KEYS = {k: KEYS[k] for k in ("defense-dp-clip", "defense-dp-epsilon", "defense-dp-delta",
                                 "defense-dp-noise-multiplier", "defense-dp-rounds", "defense-dp-accountant")}

#: Relative tolerance of the calibrated σ (the returned σ is within this of the smallest σ that meets the target).
CALIBRATION_RTOL = 1e-4

#: The smallest noise multiplier the ``pld`` accountant takes: the PLD of a subsampled Gaussian grows as 1/σ²
#: (at σ = 0.2 about 60,000 points, seconds to build; at 0.05, 400,000). Calibration with ``pld`` never goes
#: below it (a run whose target allows less noise spends less than its target); ``rdp`` has no such floor.
PLD_MIN_SIGMA = 0.2


@dataclass(frozen=True)
class Params:
    """``dp-sgd``'s parameters: ``clip`` C (per example, L2), target ``epsilon`` and ``delta`` of the client's
    whole run, ``noise_multiplier`` σ (0 = calibrate), the planned ``rounds`` (0 in the key = the run's
    ``num-server-rounds``, filled in by :func:`derive`) and the ``accountant``."""

    clip: float
    epsilon: float
    delta: float
    noise_multiplier: float
    rounds: int
    accountant: str


@dataclass(frozen=True)
class Plan:
    """One client's DP-SGD plan: sampling rate ``q = B/n``, ``round_steps`` per round, ``planned_steps`` over the
    planned rounds, and the noise multiplier ``sigma`` (given or calibrated)."""

    q: float
    round_steps: int
    planned_steps: int
    sigma: float


def derive(p: Params, cfg: Mapping[str, Any]) -> Params:
    """Fill in the planned rounds from the run config's public ``num-server-rounds`` when ``defense-dp-rounds``
    is 0 (left at 0 when the config lacks it)."""
    if p.rounds > 0:
        return p
    rounds = cfg.get("num-server-rounds", 0)
    ok = isinstance(rounds, int) and not isinstance(rounds, bool) and rounds > 0
    return dataclasses.replace(p, rounds=int(rounds)) if ok else p


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check(p: Params, task: TaskConfig) -> None:
    """Refuse what cannot give the guarantee: a model with BatchNorm, or a σ to calibrate without planned rounds.

    Raises:
        ConfigError: one line naming the key.
    """
    spec = DATASETS[task.dataset]
    if _has_batchnorm(build_model(task.model, spec.input_shape, spec.num_classes)):
        raise ConfigError(f"model={task.model!r} is not allowed with defense='dp-sgd': it has BatchNorm layers, whose "
                          "batch statistics mix examples and are sent un-noised; use a model without BatchNorm")
    if p.accountant == "pld" and 0 < p.noise_multiplier < PLD_MIN_SIGMA:
        raise ConfigError(f"defense-dp-noise-multiplier={p.noise_multiplier!r} is not allowed with "
                          f"defense-dp-accountant='pld': it must be >= {PLD_MIN_SIGMA} (the PLD of less noise is too "
                          "large to compute), or use defense-dp-accountant=rdp")
    if p.noise_multiplier == 0 and p.rounds == 0:
        raise ConfigError("defense-dp-rounds=0 is not allowed here: the run config has no num-server-rounds to plan "
                          "the budget for; set defense-dp-rounds (or defense-dp-noise-multiplier)")


# -- accounting ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def sgd_epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str = "pld",
                discretization: float = DISCRETIZATION) -> float:
    """ε at ``delta`` of ``steps`` Poisson-subsampled Gaussian releases (DP-SGD steps), add/remove-one neighbours.

    Args:
        sigma: noise multiplier (noise std / clipping norm), > 0.
        q: Poisson sampling rate in (0, 1].
        steps: number of steps (>= 0).
        delta: target δ.
        accountant: ``"pld"``: what dp-accounting's ``PLDAccountant`` computes for ``PoissonSampledDpEvent(q,
            GaussianDpEvent(σ))`` composed ``steps`` times (the one-step PLD, built as the accountant builds it, is
            cached and self-composed; equal to the accountant's ε to ~1e-11 relative), and for ``q = 1`` the exact
            Gaussian composition ``get_epsilon_gaussian(σ/√steps)``; ``"rdp"``: dp-accounting's
            ``RdpAccountant`` (default orders).
        discretization: the PLD accountant's value discretisation interval.

    Returns:
        ε (``inf`` for σ = 0).

    Raises:
        ValueError: an unknown accountant or q outside (0, 1].
    """
    check_accountant(accountant)
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate q={q} must be in (0, 1]")
    if steps == 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    dpa = dp_accounting_lib()
    if accountant == "rdp":
        event = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
        return float(dpa.rdp.RdpAccountant().compose(event, int(steps)).get_epsilon(delta))
    if q == 1:
        return float(dpa.get_epsilon_gaussian(sigma / math.sqrt(steps), delta))
    return float(_subsampled_gaussian_pld(sigma, q, discretization).self_compose(int(steps))
                 .get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=64)
def _subsampled_gaussian_pld(sigma: float, q: float, discretization: float) -> Any:
    """The PLD of one Poisson-subsampled Gaussian step (a ``dp_accounting.pld.privacy_loss_distribution.
    PrivacyLossDistribution``), built exactly as dp-accounting's ``PLDAccountant`` builds it for
    ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` (add/remove-one), kept so that the per-round reports only pay
    for the composition."""
    dpa = dp_accounting_lib()
    return dpa.pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=discretization, sampling_prob=q,
        neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)


@functools.lru_cache(maxsize=256)
def calibrate_sigma(epsilon: float, delta: float, q: float, steps: int, accountant: str = "pld") -> float:
    """The smallest noise multiplier σ (to :data:`CALIBRATION_RTOL`) for which :func:`sgd_epsilon` of ``steps``
    steps at rate ``q`` is at most ``epsilon`` at ``delta``.

    As dp-accounting's ``calibrate_dp_mechanism``: a bracket by doubling, Brent's method on
    ``ε(σ) − target``, then the returned σ is checked to meet the target (never above it). With ``pld`` the σ is
    at least :data:`PLD_MIN_SIGMA` (a target that allows less noise is then not fully spent).

    Raises:
        ValueError: ``steps < 1`` or a target that no σ <= 1e6 meets.
    """
    if steps < 1:
        raise ValueError(f"cannot calibrate σ for {steps} planned steps")

    def gap(s: float) -> float:
        return sgd_epsilon(s, q, steps, delta, accountant) - epsilon

    floor = PLD_MIN_SIGMA if accountant == "pld" else 1e-3
    lo, hi = 0.5, 1.0
    while gap(hi) > 0:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no σ <= 1e6 reaches ε={epsilon} at δ={delta} over {steps} steps at q={q}")
    while gap(lo) <= 0:
        if lo <= floor:
            return float(lo)
        lo, hi = max(lo / 2, floor), lo
    # SciPy on first use, as dp-accounting (clients.defenses.dp.dp_accounting_lib)
    from scipy import optimize

    root = optimize.brentq(gap, lo, hi, xtol=CALIBRATION_RTOL * lo, rtol=CALIBRATION_RTOL)
    for cand in (root, root * (1 + CALIBRATION_RTOL), hi):  # Brent's root is within tol, on either side
        if gap(cand) <= 0:
            return float(cand)
    return float(hi)  # unreachable: gap(hi) <= 0 holds by the bracket


@functools.lru_cache(maxsize=256)
def plan(p: Params, n: int, batch_size: int, round_steps: int) -> Plan:
    """The DP-SGD plan of a client with ``n`` examples, batch size ``B`` and ``round_steps`` steps per round.

    Raises:
        ValueError: ``B > n``, or σ to calibrate without planned rounds.
    """
    if not 0 < batch_size <= n:
        raise ValueError(f"batch-size={batch_size} exceeds this client's {n} samples")
    q = batch_size / n
    planned = p.rounds * round_steps
    if p.noise_multiplier > 0:
        return Plan(q, round_steps, planned, float(p.noise_multiplier))
    if planned < 1:
        raise ValueError("dp-sgd cannot calibrate σ without planned rounds (defense-dp-rounds / num-server-rounds)")
    return Plan(q, round_steps, planned, calibrate_sigma(p.epsilon, p.delta, q, planned, p.accountant))


# -- the hooks -----------------------------------------------------------------------------------------------------
def _record(state: RecordDict) -> ConfigRecord | None:
    return state[STATE_KEY] if STATE_KEY in state else None


def batches(partition: np.ndarray, train_config: TrainConfig, rng: np.random.Generator, p: Params,
            state: RecordDict) -> list[np.ndarray]:
    """This round's Poisson batches: each of the round's steps keeps every example of ``partition`` with
    probability ``q = B/n``, independently (``rng`` is the client's secret round generator).

    Before drawing, checks that the round's steps keep the client within its target ε and stores the plan's inputs
    (``n``, ``B``, steps per round, planned rounds; integers) in ``state``; a plan that changes between rounds
    (e.g. a resumed run with another ``num-server-rounds``, which would change σ) is refused.

    Returns:
        One ``int64`` array of training-split indices per step (partition order; possibly empty).

    Raises:
        PrivacyBudgetExhausted: the round would take the spent ε past ``defense-dp-epsilon``.
        ValueError: ``B > n``, or the plan changed since the client's first round.
    """
    n, bs = len(partition), train_config.batch_size
    steps = train_config.steps(n)
    pl = plan(p, n, bs, steps)
    rec = _record(state)
    done = int(rec["steps"]) if rec is not None else 0
    now = {"n": n, "batch": bs, "round-steps": steps, "rounds": p.rounds}
    before = {k: int(rec[k]) for k in now if k in rec} if rec is not None else now
    if before != now:
        raise ValueError(f"dp-sgd: the plan changed after {done} steps ({before} → {now}): the accountant composes "
                         "the steps of one σ and q")
    after = sgd_epsilon(pl.sigma, pl.q, done + steps, p.delta, p.accountant)
    if after > p.epsilon:
        raise PrivacyBudgetExhausted(
            f"dp-sgd: round {train_config.server_round} would spend ε={after:.4g} > defense-dp-epsilon={p.epsilon:g} "
            f"(δ={p.delta:g}, σ={pl.sigma:.4g}, q={pl.q:.4g}, {done} + {steps} steps); this client stops training")
    state[STATE_KEY] = ConfigRecord({"steps": done, **now})
    part = np.asarray(partition, dtype=np.int64)
    return [part[rng.random(n) < pl.q] for _ in range(steps)]


def clipped_sum(per_sample: list[torch.Tensor], bound: float) -> list[torch.Tensor]:
    """Clip every example's gradient to L2 norm ``bound`` (flat over all tensors) and sum over the examples.

    Args:
        per_sample: one tensor per parameter, ``(b, *param.shape)`` (b >= 1).
        bound: C > 0.

    Returns:
        One tensor per parameter, ``param.shape``: ``Σ_i g_i · min(1, C / ‖g_i‖₂)``.
    """
    b = per_sample[0].shape[0]
    norms = torch.sqrt(sum((g.reshape(b, -1).double() ** 2).sum(1) for g in per_sample))
    factor = torch.clamp(bound / (norms + 1e-12), max=1.0)
    return [(g * factor.to(g.dtype).view(b, *([1] * (g.dim() - 1)))).sum(0) for g in per_sample]


def apply(grads: list[torch.Tensor], ctx: StepContext) -> list[torch.Tensor]:
    """One DP-SGD step: ``(Σ_i clip_C(g_i) + N(0, σ²C²)) / B`` (``grads``, the batch gradient, is not used).

    The plan (``n``, ``B``, steps per round) is the one :func:`batches` stored for this round; a step context used
    on its own (no :func:`batches` before it) is taken as a round of one step with ``B = len(ctx.x)`` and ``n`` the
    size of ``ctx.partition`` (or ``B``).
    """
    p: Params = ctx.params
    rec = _record(ctx.state)
    if rec is None:
        bs = max(1, len(ctx.x))
        n = max(bs, len(ctx.partition) if ctx.partition is not None else bs)
        rec = ConfigRecord({"steps": 0, "n": n, "batch": bs, "round-steps": 1, "rounds": p.rounds})
    n, bs, steps = int(rec["n"]), int(rec["batch"]), int(rec["round-steps"])
    pl = plan(p, n, bs, steps)
    if len(ctx.x):
        summed = clipped_sum(per_sample_gradients(ctx), p.clip)
    else:  # an empty Poisson batch: the release is the noise alone
        summed = [torch.zeros_like(g) for g in grads]
    std = pl.sigma * p.clip
    out = [(s + (torch.randn(s.shape, generator=ctx.generator) * std).to(s.device, s.dtype)) / bs for s in summed]
    rec["steps"] = int(rec["steps"]) + 1
    ctx.state[STATE_KEY] = rec
    return out


def report(state: RecordDict, p: Params) -> dict[str, float]:
    """``dp-epsilon`` (spent so far, at ``dp-delta``), ``dp-delta``, ``dp-sigma``, ``dp-q``, ``dp-steps``."""
    rec = _record(state)
    if rec is None:
        return {"dp-epsilon": 0.0, "dp-delta": p.delta, "dp-sigma": float(p.noise_multiplier), "dp-q": 0.0,
                "dp-steps": 0}
    pl = plan(p, int(rec["n"]), int(rec["batch"]), int(rec["round-steps"]))
    steps = int(rec["steps"])
    return {"dp-epsilon": sgd_epsilon(pl.sigma, pl.q, steps, p.delta, p.accountant), "dp-delta": float(p.delta),
            "dp-sigma": pl.sigma, "dp-q": pl.q, "dp-steps": steps}


METRICS = ("dp-epsilon", "dp-delta", "dp-sigma", "dp-q", "dp-steps")
DEFENSE = Defense("DP-SGD (Abadi et al., CCS'16): Poisson batches, per-example clipping, σ calibrated to the target "
                  "(ε, δ); PLD accountant", apply, SGD_KEYS, Params, "defense-dp-", check=check, metrics=METRICS,
                  report=report, batches=batches, derive=derive)
