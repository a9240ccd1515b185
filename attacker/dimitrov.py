"""Data leakage in federated averaging: a whole multi-epoch FedAvg update attacked at once.

Dimitrov, Balunović, Konstantinov & Vechev, "Data Leakage in Federated Averaging", TMLR 10/2022 (arXiv 2206.12395);
official code ``eth-sri/fedavg_leakage`` (JAX; ``fedavg/utils/flax_losses.py``, ``fedavg/attacks/grad_attack.py``),
its ``full_many`` simulation with the epoch-order-invariant prior.

The client ran ``E`` passes over its ``N`` images in batches of ``B``, reshuffling before every pass (fl-sim's
:func:`clients.training.batch_schedule`), and sent ``θ_T − θ_0`` after ``T`` plain SGD steps. The server knows
``lr``, ``B``, ``E`` or ``K`` (it sent them) and ``N`` (``num-examples``), not the order. The attack

1. restores the label counts of the ``N`` images from the mean gradient ``−Δ/(lr·T)`` (:mod:`attacker.labels`;
   to first order in ``lr`` its last-layer bias is ``p̄ − n/N``, whatever the batching);
2. gives every pass its **own** image variables ``X_e (N, C, H, W)`` (``E·N`` in all), each pass's labels the
   restored multiset in a seeded random arrangement, and re-simulates the ``T`` steps functionally
   (``θ_{t+1} = θ_t − lr·∇θ ℓ(F_{θ_t}(X_e[batch j]), y)``, differentiable in every image) — so the unknown order of
   each pass costs nothing: the variables of a pass are free to take its images in whatever order. Which labels
   share a batch is unknown too, and at fl-sim's learning rates it matters (LeNet-tanh, lr 0.15, 8 images, E = 2,
   B = 4: even the true images placed by a random label arrangement leave ``1 − cos = 0.09`` between the simulated
   and the true update; the best of 24 arrangements 0.009): short pilot runs of up to :data:`MAX_ARRANGEMENTS` seeded
   arrangements, pruned by successive halving (as ``ig-fedavg`` ranks its label orders), pick the one for the
   full run;
3. minimises ``1 − cos(Δ̂, Δ)`` (all layers concatenated, as Inverting Gradients) ``+ α·TV(X) + λ·L_inv(X)``,
   where the **epoch-order-invariant prior** ``L_inv`` says that every pass saw the same set of images: with a
   fixed random 3×3 convolution ``φ`` (96 filters), ``L_inv = mean_{e≠e'} mean((mean_n φ(X_e)_n −
   mean_n φ(X_e')_n)²)`` (the paper's ``l2_mean_conv``; all ordered pairs, as the code);
4. matches each pass's reconstructions to pass 0's by a Hungarian assignment (only between images of the same
   label) and **averages the copies**, giving ``N`` images to score one-to-one against the client's ``N``.

The optimiser is fl-sim's Inverting Gradients loop (:func:`attacker.ig.signed_adam`: signed Adam, lr 0.1,
×0.1 at 3/8, 5/8, 7/8, the ``[0, 1]`` box), one variable tensor for all passes.

Deviations from the public code, and why:

* The distance is IG's cosine rather than the paper's exponentially layer-weighted L2 with an annealed factor
  (``att_fac_start → att_total_var``): the cosine is scale-free, so the weights of TV and the prior need no
  per-dataset retuning, and it is what fl-sim's ``ig``/``ig-fedavg`` use; the box projection replaces the paper's
  clip prior (both keep pixels in ``[0, 1]``). Adam is signed, with IG's step decay (the paper: plain Adam with
  exponential decay, 400 steps).
* Labels: the official code assigns the restored counts sorted by class to every epoch (at its lr of 0.004 the
  arrangement hardly matters); here each pass gets a seeded random arrangement, as the client's batches mix
  classes, and the pilot runs choose among several.
* ``local-steps = K`` (rather than epochs) is handled as passes of ``⌊N/B⌋`` steps (fl-sim's schedule drops the
  remainder of a pass); a last partial pass has its own variables and joins the averaging but not the prior.
  When ``K·B ≤ N`` there is one partial pass: the ``K·B`` images the client used (no prior, nothing to average).

Threat model: the train config and ``num-examples`` (:data:`attacker.payload.SERVER_CONFIG`). Known limits:
the re-simulated steps hold the graph of all ``T`` steps, so time and memory grow with ``E·N`` (at most
:data:`MAX_VARIABLES` image variables).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from attacker import matching
from attacker.dlg import MKLDNN, mkldnn
from attacker.ig import DEFAULT_TV, signed_adam, total_variation, unrolled_gradient
from attacker.labels import recover_labels
from attacker.options import AttackOptions
from attacker.payload import AttackPayload, AttackResult, Budget, NotApplicable, images_in_update
from fl_sim.task.config import TaskConfig

DEFAULT_ITERATIONS = 2000
#: Weight λ of the epoch-order-invariant prior against the cosine distance (in [0, 2]). On LeNet-tanh, Fashion-MNIST,
#: 8 images, E = 2, B = 4, lr 0.15, 300 iterations (one seed): λ = 0 / 0.3 / 1 / 10 gave 18.3 / 18.2 / 18.2 / 11.5 dB,
#: and the copies of an image in the two epochs agreed better with the prior (MSE 0.25 / 0.20 / 0.20 / 1.05, the last
#: a collapse). With two epochs the prior barely matters; the paper's gains are at E = 10 and lr 0.004.
DEFAULT_PRIOR = 1.0
#: Label arrangements ranked by the pilot runs: ``min(MAX_ARRANGEMENTS, iterations // 60)`` (one when the update is
#: a single step), so that the pilots cost at most about 60% of the full run.
MAX_ARRANGEMENTS = 16
#: Under a time limit, the pilot runs stop after this share of it (the best arrangement so far is kept).
PILOT_SHARE = 0.4
#: Filters of the prior's fixed random projection (the paper's ``nn.Conv(features=96, kernel_size=(3, 3))``).
PRIOR_FILTERS = 96
#: At most this many image variables (``E·N``).
MAX_VARIABLES = 2048


@dataclass(frozen=True)
class Plan:
    """The client's local training as the server reconstructs it from its own train config.

    Attributes:
        num_images: ``N``, the distinct images the reconstruction returns.
        batch_size: ``B``.
        passes: for each pass, the number of images it used (``N`` for a full pass).
        steps: for each local step, ``(pass, start, stop)``: it used variables ``start:stop`` of that pass.
    """

    num_images: int
    batch_size: int
    passes: tuple[int, ...]
    steps: tuple[tuple[int, int, int], ...]

    @property
    def full_passes(self) -> list[int]:
        """Indices of the passes over all ``N`` images (those the invariant prior ties together)."""
        return [p for p, s in enumerate(self.passes) if s == self.num_images]

    @property
    def offsets(self) -> list[int]:
        """Index of each pass's first variable in the stacked variable tensor."""
        return [int(v) for v in np.cumsum((0, *self.passes[:-1]))]


def update_images(task: TaskConfig, num_examples: int) -> int:
    """:attr:`attacker.Attack.images` of ``dimitrov``: every distinct image the update holds
    (:func:`attacker.payload.images_in_update`), which is what :func:`plan` reconstructs."""
    return images_in_update(task.train_config(), num_examples)


def plan(payload: AttackPayload) -> Plan:
    """The :class:`Plan` of the update in ``payload`` (fedsgd: one step; fedavg: passes, see the module docstring).

    Raises:
        NotApplicable: more than :data:`MAX_VARIABLES` image variables, or several ``local-steps`` passes over a
            partition that ``batch-size`` does not divide (the passes would then use different subsets).
    """
    tc, b, n = payload.train_config, payload.batch_size, int(payload.num_examples)
    if tc.mode == "fedsgd":
        out = Plan(b, b, (b,), ((0, 0, b),))
    elif tc.local_steps == 0:
        per = math.ceil(n / b)
        steps = tuple((e, j * b, min((j + 1) * b, n)) for e in range(tc.local_epochs) for j in range(per))
        out = Plan(n, b, (n,) * tc.local_epochs, steps)
    else:
        k, per = tc.local_steps, n // b
        if k * b <= n:
            out = Plan(k * b, b, (k * b,), tuple((0, j * b, (j + 1) * b) for j in range(k)))
        else:
            if n % b:
                raise NotApplicable(f"dimitrov: local-steps={k} makes several passes over {n} images, which batch-size="
                                 f"{b} does not divide (each pass would drop different images); use local-epochs")
            passes = [per] * (k // per) + ([k % per] if k % per else [])
            steps = tuple((p, j * b, (j + 1) * b) for p, m in enumerate(passes) for j in range(m))
            out = Plan(n, b, tuple(m * b for m in passes), steps)
    if sum(out.passes) > MAX_VARIABLES:
        raise NotApplicable(f"dimitrov would optimise {sum(out.passes)} image variables (passes {list(out.passes)}); "
                         f"at most {MAX_VARIABLES} are supported")
    return out


def pass_labels(labels: list[int], plan_: Plan, seed: int) -> torch.Tensor:
    """The label of every image variable: each pass gets the restored multiset (``N`` sorted labels) in its own
    seeded random arrangement; a partial pass of ``s`` images gets ``s`` evenly spaced entries of the sorted list.

    Returns:
        ``int64 (Σ passes,)``, pass after pass.
    """
    rng = np.random.default_rng(seed)
    sorted_labels = np.sort(np.asarray(labels, np.int64))
    out = []
    for s in plan_.passes:
        pick = sorted_labels if s == len(sorted_labels) else sorted_labels[
            np.linspace(0, len(sorted_labels) - 1, s).round().astype(int)]
        out.append(rng.permutation(pick))
    return torch.as_tensor(np.concatenate(out))


def distinct_arrangements(labels: list[int], plan_: Plan, limit: int, seed: int) -> list[torch.Tensor]:
    """Up to ``limit`` :func:`pass_labels` arrangements that differ in which labels share a batch (the order within
    a batch does not change the update). Draws ``4·limit`` seeded arrangements at most.
    """
    seen: dict[tuple[tuple[int, ...], ...], torch.Tensor] = {}
    off = plan_.offsets
    for a in range(4 * limit):
        lab = pass_labels(labels, plan_, seed * 1009 + a)
        key = tuple(tuple(sorted(lab[off[p] + i:off[p] + j].tolist())) for p, i, j in plan_.steps)
        seen.setdefault(key, lab)
        if len(seen) >= limit:
            break
    return list(seen.values())


def invariant_prior(features: torch.Tensor, plan_: Plan) -> torch.Tensor:
    """The epoch-order-invariant prior on projected images ``features (Σ passes, F, H, W)``.

    ``mean over ordered pairs (e, e') of full passes, e ≠ e', of mean((mean_n f_e,n − mean_n f_e',n)²)``; 0 with
    fewer than two full passes.
    """
    full = plan_.full_passes
    if len(full) < 2:
        return features.sum() * 0.0
    off = plan_.offsets
    means = torch.stack([features[off[p]:off[p] + plan_.passes[p]].mean(0) for p in full])
    diff = means[:, None] - means[None]
    e = len(full)
    return diff.pow(2).flatten(2).mean(-1).sum() / (e * (e - 1))


def average_passes(x: torch.Tensor, labels: torch.Tensor, plan_: Plan) -> tuple[torch.Tensor, float]:
    """Match every pass's reconstructions to pass 0's (Hungarian on MSE, same-label pairs only) and average the
    copies of each pass-0 image.

    Args:
        x: ``(Σ passes, C, H, W)`` the variables, pass after pass.
        labels: ``(Σ passes,)`` their labels.

    Returns:
        ``(images, copy_mse)``: ``(passes[0], C, H, W)`` the mean of each pass-0 image and the copies matched to
        it, and the mean MSE between a copy and the pass-0 image it was matched to (0 with one pass).
    """
    off, n0 = plan_.offsets, plan_.passes[0]
    ref, ref_lab = x[:n0], labels[:n0]
    total, count, errors = ref.clone(), torch.ones(n0, device=x.device), []
    for p in range(1, len(plan_.passes)):
        other = x[off[p]:off[p] + plan_.passes[p]]
        lab = labels[off[p]:off[p] + plan_.passes[p]]
        mse = (other[:, None] - ref[None]).pow(2).flatten(2).mean(-1)
        cost = mse + 1e6 * (lab[:, None] != ref_lab[None]).to(mse.dtype)
        rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
        for r, c in zip(rows, cols):
            total[c] += other[r]
            count[c] += 1
            errors.append(float(mse[r, c]))
    return total / count.view(-1, 1, 1, 1), float(np.mean(errors)) if errors else 0.0


def dimitrov(payload: AttackPayload, budget: Budget, options: AttackOptions | None = None) -> AttackResult:
    """The whole multi-step FedAvg update attacked at once (see the module docstring).

    Args:
        payload: the update; needs the train config and ``num-examples``.
        budget: iterations (default :data:`DEFAULT_ITERATIONS`), restarts (best final objective kept), time limit,
            seed, progress.
        options: ``tv`` (default :data:`attacker.ig.DEFAULT_TV`), ``labels``, ``init_std``, and the adaptive
            matching knobs (``clip_scope=gradient`` clips every re-simulated step).

    Returns:
        ``N`` images ``float32 (N, C, H, W)`` in normalised space (the passes' copies averaged) and their labels;
        ``extras``: ``passes``, ``local_steps``, ``variables``, ``prior`` (final ``L_inv``), ``copy_mse`` (mean MSE
        between a pass-0 image and its matched copies, normalised space; 0 with one pass), ``pilot_iterations``
        (spent ranking label arrangements, included in ``iterations``).

    Raises:
        NotApplicable: as :func:`plan`.
    """
    start = time.perf_counter()
    options = options or AttackOptions()
    model = payload.build_model(budget.device)
    device = next(model.parameters()).device
    target = matching.prepare(payload, model, options)
    step_clip = target.clip if options.clip_scope == "gradient" else 0.0
    if options.clip_scope == "gradient":
        target.clip = 0.0  # the per-step clip happens inside the re-simulated steps
    pl = plan(payload)
    recovered = recover_labels(model, target.grads, pl.num_images, options.labels, payload.input_shape).tolist()
    lr, names = float(payload.train_config.lr), target.names
    theta0 = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    tv = DEFAULT_TV if options.tv is None else options.tv
    off = pl.offsets
    steps = [(torch.arange(off[p] + a, off[p] + z, device=device)) for p, a, z in pl.steps]
    gen = torch.Generator().manual_seed(int(budget.seed) + 17)
    proj = (torch.randn(PRIOR_FILTERS, payload.input_shape[0], 3, 3, generator=gen)
            / math.sqrt(9 * payload.input_shape[0])).to(device)
    k = len(steps)

    def simulate(x: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        return unrolled_gradient(model, theta0, buffers, names, target.needed, x, labels, steps, lr, step_clip)

    def prior(x: torch.Tensor) -> torch.Tensor:
        return invariant_prior(F.conv2d(x, proj, padding=1), pl)

    def make_objective(labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def objective(x: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                value = target.cosine(simulate(x, labels)) + tv * total_variation(x)
                return value + DEFAULT_PRIOR * prior(x) if DEFAULT_PRIOR else value
        return objective

    init = 1.0 if options.init_std is None else options.init_std
    shape = (sum(pl.passes), *payload.input_shape)
    iterations = budget.iterations or DEFAULT_ITERATIONS
    # Which labels were in which batch of a pass is unknown and matters at fl-sim's learning rates; short pilot
    # runs of several seeded arrangements, pruned by successive halving, pick the one for the full run.
    breadth = min(MAX_ARRANGEMENTS, max(1, iterations // 60)) if k > 1 else 1
    arrangements = distinct_arrangements(recovered, pl, breadth, int(budget.seed))
    arrangements = [a.to(device) for a in arrangements]
    pilot_its, pilots = max(20, iterations // 40), 0
    with mkldnn(MKLDNN):  # im2col convolutions: half the time of oneDNN's on these small batches
        limit = PILOT_SHARE * budget.time_limit_s if budget.time_limit_s else math.inf
        while len(arrangements) > 1:
            scored = []
            for lab in arrangements:
                _, obj, its = signed_adam(make_objective(lab), shape, payload, budget, pilot_its, start, device, 1,
                                          init_std=init)
                scored.append((obj, lab))
                pilots += its
                if time.perf_counter() - start > limit:  # keep the rest of the time for the full run
                    break
            scored.sort(key=lambda t: t[0])
            if time.perf_counter() - start > limit:
                arrangements = [scored[0][1]]
                break
            arrangements = [a for _, a in scored[: max(1, len(scored) // 6)]] if len(scored) > 3 else [scored[0][1]]
            pilot_its *= 4
        labels = arrangements[0]
        x, obj, its = signed_adam(make_objective(labels), shape, payload, budget, iterations, start, device,
                                  init_std=init)
    with torch.no_grad():
        images, copy_mse = average_passes(x, labels, pl)
        final_prior = float(prior(x))
    n0 = pl.passes[0]
    extras: dict[str, float | int] = {"passes": len(pl.passes), "local_steps": k, "variables": int(shape[0]),
                                      "prior": final_prior, "copy_mse": copy_mse, "pilot_iterations": pilots}
    return AttackResult(images.cpu(), labels[:n0].cpu(), pilots + its, time.perf_counter() - start, obj, extras)
