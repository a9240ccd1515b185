"""Inverting Gradients (Geiping, Bauermeister, Dröge & Moeller, NeurIPS'20; "GS" in the Soteria paper).

The reconstruction solves, for images ``x`` in the dataset's normalised space,

    min_{x ∈ [−μ/σ, (1−μ)/σ]}  1 − ⟨∇θ ℓ(F(x), y), g⟩ / (‖∇θ ℓ(F(x), y)‖ ‖g‖) + α·TV(x)

with the inner product and norms over all layers concatenated (per-layer weights from
:class:`~attacker.options.AttackOptions` scale both; see :mod:`attacker.matching`) and the anisotropic total
variation ``TV(x) = mean|x[..., :, 1:] − x[..., :, :−1]| + mean|x[..., 1:, :] − x[..., :−1, :]|``. As in
``JonasGeiping/invertinggradients`` (``inversefed/reconstruction_algorithms.py``): ``x ~ N(0, I)``; each
iteration replaces the gradient of ``x`` by its sign, takes an Adam step (lr 0.1), decays the step ×0.1 at 3/8,
5/8 and 7/8 of the iterations (MultiStepLR; both written out in :func:`adam_step` and :func:`multistep_lrs`,
the same floats as torch's), and projects ``x`` back into the box; ``R`` restarts keep the one with
the lowest final objective. Labels are the analytic ones (:mod:`attacker.labels`), as the paper does when they are
unknown.

* ``ig`` matches the update as the average gradient it is for ``fedsgd`` (:meth:`AttackPayload.gradients`).
* ``ig-fedavg`` matches multi-step updates: it unrolls the client's K local SGD steps functionally —
  ``θ_{k+1} = θ_k − lr·∇θ ℓ(F_{θ_k}(x_k), y_k)``, differentiable in every ``x_k`` — with the ``lr``, ``batch-size``,
  ``local-steps``/``local-epochs`` the server itself sent (``AttackPayload.train_config``), and matches
  ``θ_K − θ_0`` to the observed update (the paper's ``use_updates`` variant; breaching's ``_grad_fn_multi_step``).
  The step batches are new images until the client's ``num-examples`` are used up; after that the images are
  reused in the same order (the client reshuffles, which the server cannot know). Which label was used at which
  step is unknown too and matters (wrong orders stall near 9 dB on LeNet, K = 4): short pilot runs of every
  distinct label order (at most :data:`MAX_ORDERS`), pruned by successive halving, pick the order for the full run
  (``extras["pilot_iterations"]``). It declares ``ThreatModel(local_hyperparams=True)``.

Iterations and restarts come from :class:`~attacker.payload.Budget`; the time limit is checked every iteration and
the best restart so far is returned.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from attacker import chain, matching
from attacker.labels import recover_labels
from attacker.options import AttackOptions
from attacker.payload import AttackPayload, AttackResult, Budget, NotApplicable
from fl_sim.task.config import TaskConfig
from fl_sim.task.contract import TrainConfig

DEFAULT_ITERATIONS = 2000
#: Default TV weight α (images in normalised space). The paper's notebooks use 1e-6 … 1e-4 for CIFAR and 1e-1 for
#: ImageNet; 1e-2 gave the best PSNR here on the untrained ConvNet (3×32×32, 2,000 iterations: 31 dB vs 26–29 dB
#: for 1e-3 and 3e-2).
DEFAULT_TV = 1e-2
LR = 0.1
#: ``ig-fedavg`` reconstructs at most this many distinct images (one variable per image the client used).
MAX_IMAGES = 64
#: ``ig-fedavg`` ranks at most this many label-to-step assignments in its pilot runs.
MAX_ORDERS = 24
#: How ``ig`` computes the objective's gradient: ``"auto"`` pulls the cosine distance back through the network
#: with :mod:`attacker.chain` where the model is a chain (no double backward; the TV term by autograd on ``x``
#: alone) and uses autograd otherwise; ``"autograd"`` differentiates the cosine through the
#: ``create_graph=True`` trial gradient, as ``inversefed`` and breaching do. The two gradients agree to float
#: rounding; signed Adam sees only signs, so the trajectories agree until a near-zero entry's sign flips (the
#: ConvNet, chelsea: the same PSNR to 4 decimals at 200 iterations, 31.69 vs 31.17 dB at 2,000; see
#: docs/performance.md). ``ig-fedavg`` (the unrolled steps) always uses autograd.
ENGINE = "auto"
ENGINES = ("auto", "autograd")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of ``x (B, C, H, W)``: mean absolute horizontal plus mean absolute vertical difference."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def total_variation_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`total_variation` of ``x (B, C, H, W)`` and its (sub)gradient, written out (no autograd graph).

    With ``d_h = x[..., 1:] − x[..., :−1]`` (``N_h`` entries) and ``d_v`` likewise down the rows, the gradient is
    ``sign(d_h)/N_h`` added at ``[..., 1:]`` and subtracted at ``[..., :−1]``, plus the same for ``d_v`` (``sign(0)
    = 0``, as autograd's ``abs``); equal to autograd's to float rounding.
    """
    dh = x[..., :, 1:] - x[..., :, :-1]
    dv = x[..., 1:, :] - x[..., :-1, :]
    sh, sv = dh.sign() / dh.numel(), dv.sign() / dv.numel()
    g = torch.zeros_like(x)
    g[..., :, 1:] += sh
    g[..., :, :-1] -= sh
    g[..., 1:, :] += sv
    g[..., :-1, :] -= sv
    return dh.abs().mean() + dv.abs().mean(), g


def box(payload: AttackPayload, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[0, 1]`` pixel box in normalised space: lower and upper bounds, each ``(1, C, 1, 1)``."""
    mean = torch.tensor(payload.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(payload.std, device=device).view(1, -1, 1, 1)
    return -mean / std, (1 - mean) / std


#: Adam's defaults, as ``torch.optim.Adam`` (Kingma & Ba 2015): ``β1``, ``β2``, ``ε``.
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def multistep_lrs(lr: float, milestones: list[int], gamma: float, iterations: int) -> list[float]:
    """The learning rate of each of ``iterations`` steps under ``torch.optim.lr_scheduler.MultiStepLR``.

    As the scheduler does (stepped once after every optimiser step): the rate of step ``i`` (0-based) is the rate
    of step ``i − 1`` times ``gamma ** n``, ``n`` the number of times ``i`` appears in ``milestones`` (a milestone
    0 already applies to the first step). The same Python float products, so the same floats.
    """
    counts = {m: milestones.count(m) for m in milestones}
    out, cur = [], float(lr)
    for i in range(iterations):
        if i in counts:
            cur = cur * gamma ** counts[i]
        out.append(cur)
    return out


def adam_step(x: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
              lr: float) -> None:
    """One Adam step on ``x`` in place, with the moment buffers ``exp_avg``, ``exp_avg_sq`` (shaped like ``x``).

    The arithmetic of ``torch.optim.Adam([x], lr)`` with its defaults (:data:`ADAM_BETAS`, :data:`ADAM_EPS`, no
    weight decay, no AMSGrad): the same tensor operations in the same order, so the same floats as its
    single-tensor path (the default on CPU; its ``foreach`` path on CUDA runs the same element-wise operations).
    Written out because the optimiser object costs more than the step on an attack's one small tensor (its
    ``step`` wrapper, hooks and ``param_groups``, plus a one-off ~0.8 s import of ``torch._dynamo`` on its first
    construction in a process). ``step`` counts from 1.
    """
    beta1, beta2 = ADAM_BETAS
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_f = float(step)
    step_size = lr / (1 - beta1 ** step_f)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step_f) ** 0.5).add_(ADAM_EPS)
    x.addcdiv_(exp_avg, denom, value=-step_size)


def signed_adam(objective: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], payload: AttackPayload,
                budget: Budget, iterations: int, start: float, device: torch.device,
                restarts: int | None = None, init_std: float = 1.0,
                value_and_grad: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                ) -> tuple[torch.Tensor, float, int]:
    """Run the IG optimiser for every restart; return the best images, their objective and the iterations run.

    Args:
        objective: ``x -> scalar`` to minimise (differentiable in ``x``).
        shape: shape of the image tensor ``(N, C, H, W)``.
        payload: for the box constraint.
        budget: restarts, seed, time limit and progress callback.
        iterations: iterations per restart.
        start: ``time.perf_counter()`` at the start of the attack (the time limit counts from there).
        device: where ``x`` lives.
        restarts: overrides ``budget.restarts``.
        init_std: standard deviation of the Gaussian initialisation (normalised space).
        value_and_grad: ``x -> (objective(x), ∇x objective)`` computed without autograd on ``x`` (e.g.
            :func:`attacker.chain.value_and_grad`); ``None`` differentiates ``objective`` with autograd.
    """
    lo, hi = box(payload, device)
    gen = torch.Generator().manual_seed(int(budget.seed))
    lrs = multistep_lrs(LR, [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], 0.1, iterations)
    best_x, best_obj, total = None, math.inf, 0
    for _restart in range(max(1, budget.restarts if restarts is None else restarts)):
        x = (torch.randn(shape, generator=gen) * init_std).to(device).requires_grad_(value_and_grad is None)
        exp_avg, exp_avg_sq = torch.zeros_like(x), torch.zeros_like(x)
        value = math.inf
        for it in range(iterations):
            if value_and_grad is not None:
                loss, grad = value_and_grad(x)
            else:
                loss = objective(x)
                (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                adam_step(x, grad.sign_(), exp_avg, exp_avg_sq, it + 1, lrs[it])
                x.clamp_(lo, hi)
            total += 1
            if budget.progress is not None and it % 50 == 0:
                value = float(loss.detach())
                budget.progress(it, value)
            if budget.time_limit_s and time.perf_counter() - start > budget.time_limit_s:
                break
        with torch.no_grad():
            final = float(objective(x.detach())) if torch.isfinite(x).all() else math.inf
        if final < best_obj or best_x is None:
            best_x, best_obj = x.detach().clone(), final
        if budget.time_limit_s and time.perf_counter() - start > budget.time_limit_s:
            break
    return best_x, best_obj, total


def _ig(payload: AttackPayload, budget: Budget, options: AttackOptions | None, engine: str | None = None
        ) -> AttackResult:
    engine = ENGINE if engine is None else engine
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    start = time.perf_counter()
    options = options or AttackOptions()
    model = payload.build_model(budget.device)
    device = next(model.parameters()).device
    target = matching.prepare(payload, model, options)
    labels = recover_labels(model, target.grads, payload.batch_size, options.labels, payload.input_shape).to(device)
    tv = DEFAULT_TV if options.tv is None else options.tv
    params = target.needed_params

    def objective(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), labels)
            grads = torch.autograd.grad(loss, params, create_graph=x.requires_grad)
        return target.cosine(grads) + tv * total_variation(x)

    shape = (payload.batch_size, *payload.input_shape)
    fast = chain.compile_chain(model, target.needed, torch.zeros(shape, device=device)) if engine == "auto" else None

    def value_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value, gx, _ = chain.value_and_grad(fast, lambda g: target.value_and_weights(g, "cosine"), x, None, labels)
        reg, g_tv = total_variation_and_grad(x)
        return value + tv * reg, gx + tv * g_tv

    iterations = budget.iterations or DEFAULT_ITERATIONS
    init = 1.0 if options.init_std is None else options.init_std
    x, obj, total = signed_adam(objective, shape, payload, budget, iterations, start, device, init_std=init,
                                value_and_grad=None if fast is None else value_and_grad)
    return AttackResult(x, labels.cpu(), total, time.perf_counter() - start, obj)


def images_for(train_config: TrainConfig, num_examples: int) -> int:
    """Distinct images ``ig-fedavg`` reconstructs from an update of a client reporting ``num_examples``:
    ``min(num-examples, K × B)`` under ``fedavg`` (K = :meth:`TrainConfig.steps`), ``B`` under ``fedsgd``."""
    n = int(num_examples)
    b = max(1, min(int(train_config.batch_size), n))
    return min(n, train_config.steps(n) * b) if train_config.mode == "fedavg" else b


def unrolled_images(task: TaskConfig, num_examples: int) -> int:
    """:attr:`attacker.Attack.images` of ``ig-fedavg``: :func:`images_for` under the task's train config."""
    return images_for(task.train_config(), num_examples)


def step_plan(payload: AttackPayload) -> tuple[int, int, list[list[int]]]:
    """The client's local steps as the server can reconstruct them from its own train config.

    Returns:
        ``(num_images, batch, steps)``: the number of distinct images to reconstruct, the batch size, and for each
        local step the indices (into the reconstructed images) of its batch.

    Raises:
        NotApplicable: more than :data:`MAX_IMAGES` distinct images would be needed.
    """
    b, k, n = payload.batch_size, payload.local_steps, int(payload.num_examples)
    num = images_for(payload.train_config, n)
    if num > MAX_IMAGES:
        raise NotApplicable(f"ig-fedavg would reconstruct {num} images (local steps {k} × batch {b}, "
                         f"num-examples {n}); at most {MAX_IMAGES} are supported — use local-steps")
    steps, pos = [], 0
    for _ in range(k):
        if pos + b > num:
            pos = 0
        steps.append(list(range(pos, min(pos + b, num))))
        pos += b
    return num, b, steps


def label_orders(labels: list[int], steps: list[list[int]], limit: int, seed: int) -> list[list[int]]:
    """Distinct assignments of the recovered label multiset to the image slots, up to the order within a step.

    The sorted assignment comes first; when there are more than ``limit`` assignments, ``limit − 1`` random ones
    follow it.
    """
    def canon(order: list[int]) -> tuple[int, ...]:
        out = list(order)
        for s in steps:
            vals = sorted(out[i] for i in s)
            for i, v in zip(s, vals):
                out[i] = v
        return tuple(out)

    first = canon(sorted(labels))
    if len(set(labels)) <= 1 or len(steps) <= 1:
        return [list(first)]
    seen = {first: None}
    if math.factorial(len(labels)) <= 4 * limit:
        for perm in itertools.permutations(labels):
            seen.setdefault(canon(list(perm)), None)
    else:
        rng = random.Random(seed)
        for _ in range(50 * limit):
            seen.setdefault(canon(rng.sample(labels, len(labels))), None)
            if len(seen) >= limit:
                break
    orders = list(seen)
    if len(orders) > limit:
        rng = random.Random(seed)
        orders = [orders[0], *rng.sample(orders[1:], limit - 1)]
    return [list(o) for o in orders]


def unrolled_gradient(model: nn.Module, theta0: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                      names: list[str], needed: list[int], x: torch.Tensor, labels: torch.Tensor,
                      steps: list[torch.Tensor], lr: float, step_clip: float = 0.0) -> list[torch.Tensor]:
    """The client's local SGD steps re-simulated on trial images, differentiably, as an average gradient.

    From the parameters ``theta0`` (the global model, ``requires_grad``), each step takes the cross-entropy gradient
    on ``x[idx], labels[idx]`` for the next index tensor of ``steps`` (with ``create_graph=True``), clips it to L2
    norm ``step_clip`` over all parameters when ``step_clip > 0``, and moves by ``lr``. Returns the update as an
    average gradient, ``−Δ / (lr·K)`` with K = ``len(steps)``, for the parameters at positions ``needed`` of
    ``names`` (so that it lines up with :attr:`attacker.matching.Target.grads`). Shared by ``ig-fedavg`` and
    ``dimitrov``.
    """
    theta = dict(theta0)
    for idx in steps:
        out = functional_call(model, {**theta, **buffers}, (x[idx],))
        loss = F.cross_entropy(out, labels[idx])
        grads = torch.autograd.grad(loss, [theta[n] for n in names], create_graph=True)
        if step_clip > 0:
            norm = torch.sqrt(sum((g * g).sum() for g in grads))
            grads = [g * torch.clamp(step_clip / (norm + 1e-12), max=1.0) for g in grads]
        theta = {**theta, **{n: theta[n] - lr * g for n, g in zip(names, grads)}}
    return [(theta0[names[i]] - theta[names[i]]) / (lr * len(steps)) for i in needed]


def _unrolled(payload: AttackPayload, budget: Budget, options: AttackOptions | None) -> AttackResult:
    start = time.perf_counter()
    options = options or AttackOptions()
    model = payload.build_model(budget.device)
    device = next(model.parameters()).device
    target = matching.prepare(payload, model, options)
    step_clip = target.clip if options.clip_scope == "gradient" else 0.0
    if options.clip_scope == "gradient":
        target.clip = 0.0  # the per-step clip happens inside the unrolled steps
    num, _b, steps = step_plan(payload)
    recovered = recover_labels(model, target.grads, num, options.labels, payload.input_shape).tolist()
    lr = float(payload.train_config.lr)
    k = len(steps)
    names = target.names
    theta0 = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    tv = DEFAULT_TV if options.tv is None else options.tv
    index = [torch.tensor(s, device=device) for s in steps]

    def make_objective(labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def objective(x: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                avg = unrolled_gradient(model, theta0, buffers, names, target.needed, x, labels, index, lr,
                                        step_clip)
            return target.cosine(avg) + tv * total_variation(x)
        return objective

    shape = (num, *payload.input_shape)
    iterations = budget.iterations or DEFAULT_ITERATIONS
    # Which image (and label) was used at which step is unknown; short pilot runs rank the label orders
    # (successive halving), and the full run uses the best one.
    init = 1.0 if options.init_std is None else options.init_std
    orders = label_orders(recovered, steps, MAX_ORDERS, int(budget.seed))
    pilot_its, total = max(20, iterations // 40), 0
    while len(orders) > 1:
        scored = []
        for order in orders:
            lab = torch.tensor(order, device=device)
            _, obj, its = signed_adam(make_objective(lab), shape, payload, budget, pilot_its, start, device, 1,
                                      init_std=init)
            scored.append((obj, order))
            total += its
        scored.sort(key=lambda t: t[0])
        orders = [o for _, o in scored[: max(1, len(scored) // 6)]] if len(scored) > 3 else [scored[0][1]]
        pilot_its *= 4
    labels = torch.tensor(orders[0], device=device)
    x, obj, its = signed_adam(make_objective(labels), shape, payload, budget, iterations, start, device,
                              init_std=init)
    return AttackResult(x, labels.cpu(), total + its, time.perf_counter() - start, obj,
                        {"local_steps": k, "pilot_iterations": total})


def check_fedavg(model: nn.Module, task: TaskConfig) -> None:
    """Raise ``ValueError`` when ``ig-fedavg`` would need more than :data:`MAX_IMAGES` images under ``cfg``.

    In ``fedavg`` mode with ``local-steps = 0`` the client walks its whole partition, so the images to reconstruct
    are the partition; a run should set ``local-steps`` (K) so that ``K × batch-size <= MAX_IMAGES``.
    """
    if task.mode != "fedavg":
        return
    k, b = task.local_steps, task.batch_size
    if k == 0:
        raise ValueError(f"ig-fedavg needs local-steps > 0 (with local-steps=0 the client uses its whole partition, "
                         f"more than the {MAX_IMAGES} images the attack reconstructs)")
    if k * b > MAX_IMAGES:
        raise ValueError(f"ig-fedavg reconstructs at most {MAX_IMAGES} images; local-steps={k} × batch-size={b} "
                         f"= {k * b}")


def ig(payload: AttackPayload, budget: Budget, options: AttackOptions | None = None,
       engine: str | None = None) -> AttackResult:
    """Inverting Gradients on a FedSGD update (see the module docstring).

    Args:
        payload: the server-visible update; ``batch_size`` images are reconstructed.
        budget: iterations per restart (default :data:`DEFAULT_ITERATIONS`), restarts, time limit, seed, progress.
        options: ``tv`` (default :data:`DEFAULT_TV`), ``labels``, and the adaptive knobs.
        engine: one of :data:`ENGINES` (default :data:`ENGINE`): how the objective's gradient is computed.

    Returns:
        Images ``(B, C, H, W)`` in normalised space and the analytic labels.
    """
    return _ig(payload, budget, options, engine)


def ig_fedavg(payload: AttackPayload, budget: Budget, options: AttackOptions | None = None) -> AttackResult:
    """Inverting Gradients on a multi-step (FedAvg) update, unrolling the local SGD steps (module docstring).

    Returns:
        ``min(num-examples, K·B)`` images ``(N, C, H, W)`` in normalised space and their labels.

    Raises:
        NotApplicable: the update would need more than :data:`MAX_IMAGES` images.
    """
    return _unrolled(payload, budget, options)
