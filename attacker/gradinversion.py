"""GradInversion: gradient matching with a BatchNorm-statistics prior, image priors and group consistency.

Paper: Yin, Mallya, Vahdat, Alvarez, Kautz & Molchanov, "See Through Gradients: Image Batch Recovery via
GradInversion", CVPR 2021 (arXiv:2104.07586). There is no official code; the public reference for the defaults is
breaching's ``seethroughgradients`` attack (``JonasGeiping/breaching``, ``config/attack/seethroughgradients.yaml``,
``attacks/auxiliaries/regularizers.py:DeepInversion``, ``attacks/optimization_based_attack.py``).

For ``G`` = ``attack-restarts`` members ``x_g`` (each a batch ``(B, C, H, W)`` in the dataset's normalised space)
the attack minimises ``Σ_g L(x_g)`` with

    L(x) = s_grad · ½ Σ_l w_l ‖∇θ_l ℓ(F(x), ŷ) − g_l‖² / ‖g‖²           (gradient matching, relative L2)
         + s_bn · Σ_k f_k (‖μ_k(x) − μ̂_k‖₂ + ‖σ²_k(x) − σ̂²_k‖₂)        (BatchNorm statistics; f_1 = 10, else 1)
         + s_tv · TV(x) + s_l2 · ½ mean(x²)                               (image fidelity priors)
         + α_group · mean((x − x̄)²)                                       (group consistency, G > 1)

* ``μ_k(x)``, ``σ²_k(x)``: per-channel mean and biased variance of the input of the k-th BatchNorm layer (in
  forward order) for the candidate batch, the model in train mode as the client ran it.
* ``μ̂_k``, ``σ̂²_k``: the targets (:func:`batch_statistics`). When the update's buffers travel
  (``send-buffers=true``; the attack declares ``bn_statistics``), they are the client's batch statistics recovered
  from its BatchNorm running statistics: after ``T`` local steps with momentum ``m``,
  ``rm_T = (1−m)^T rm_0 + Σ_t m(1−m)^{T−t} μ_t``, so ``μ̂ = (rm_T − (1−m)^T rm_0) / (1 − (1−m)^T)`` — exact for
  one step, a weighted mean of the step batches' means for ``T > 1`` — and likewise for the variance, which PyTorch
  stores unbiased over ``n = B·H·W`` values and is converted back to the biased one (× (n−1)/n). Otherwise (the
  buffers did not travel or did not move) the global model's running statistics stand in, as breaching does with
  public buffers, with ``s_bn`` divided by :data:`GLOBAL_BN_DIVISOR` (breaching's config: "reduce this value if
  user.provide_buffers=False"). ``T`` is read off ``num_batches_tracked``.
* ``ŷ``: the labels, by Yin et al.'s rule (:func:`attacker.labels.yin_labels`: the ``B`` classes with the most
  negative row minimum of the last layer's weight gradient; distinct labels, exact for non-negative features such
  as the ResNets' ReLU + average pool) when ``attack-labels=auto``, else the method named there; B = 1 always uses
  iDLG's exact rule.
* ``x̄``: the members' per-pixel mean, recomputed at every iteration and held fixed within it.

Optimiser as breaching: Adam (lr 0.1), 50 warm-up iterations, then cosine decay to 0; ``x`` projected back into
the ``[0, 1]`` pixel box after every step; ``x ~ N(0, I)`` at the start; optional Langevin noise
``LANGEVIN · lr_t · N(0, I)`` on the gradient of ``x``. The result is the candidate — a member or the group mean —
with the smallest gradient-matching distance (breaching scores restarts the same way).

Defaults and where they deviate from breaching's config, and why. breaching's weights were set for ResNet-50 on
ImageNet; on a CIFAR ResNet-20 (4 photos, one step, random start) they leave the gradient term and TV with no say:
the mean per-pixel gradient of each weighted term is 6e-4 (BatchNorm, 0.1), 1e-5 (gradient, 1e-4 on ½‖Δg‖²) and
2e-8 (TV, 1e-4), while the Langevin noise (0.01·lr) is 1e-3 — the images stay noise. Measured on four other
skimage photos (hubble_deep_field, immunohistochemistry, retina, colorwheel; ``resnet20``, 1,000 iterations, one
member; ``ig`` there: 7.6 dB), breaching's defaults gave 8.3 dB; the defaults below 9.5 dB:

* ``s_grad = 10`` on the *relative* distance ``½‖Δg‖²/‖g‖²`` (breaching: 1e-4 on ``½‖Δg‖²``), so the weight does
  not depend on the model's gradient scale (1 gave 9.3 dB with ``s_tv = 1``, 9.0 with 0.1);
* ``s_tv = 3`` (``attack-tv``; breaching: 1e-4); TV is a mean over pixels here as in breaching;
* ``s_bn = 0.1`` (``attack-bn-weight``) as breaching (1 gave 8.5 dB against 9.0 at 0.1, with ``s_grad = 1``;
  on the README's evaluation photos, seed 0, 0.01 gave 13.6 dB against 11.7 at 0.1 and 13.0 at 0: not tuned on);
  ``s_l2 = 1e-6`` as breaching;
* Langevin noise off (breaching 0.01, the paper 0.2): 9.0 dB without, 8.6 dB with breaching's 0.01;
* ``α_group = 1`` (``attack-group-weight``; the paper gives no value, breaching's commented one is 0.01, which is
  ~1e-3 of the other terms here);
* 2,000 iterations by default (breaching: 20,000) so that an attack fits the default ``attack-time-limit``.
* **Group consistency without registration:** the paper registers every member to the group mean with
  RANSAC-flow before averaging (to undo shifts of ImageNet objects); breaching implements no group term at all. At
  32×32 the members are averaged pixel by pixel, unregistered.
* **Variance targets:** the candidate's biased variance is matched with the client's *biased* batch variance
  (recovered as above); breaching compares it with the unbiased stored value.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from attacker import matching
from attacker.ig import box, total_variation
from attacker.labels import classifier_gradients, recover_labels, yin_labels
from attacker.options import AttackOptions
from attacker.payload import AttackPayload, AttackResult, Budget

DEFAULT_ITERATIONS = 2000
LR = 0.1
WARMUP = 50
#: Weight of the relative gradient distance ``½‖Δg‖²/‖g‖²`` (breaching: 1e-4 on ``½‖Δg‖²``; module docstring).
GRAD_WEIGHT = 10.0
#: TV weight (``attack-tv`` overrides it; breaching: 1e-4).
DEFAULT_TV = 3.0
#: breaching ``regularization.norm.scale`` (p = 2).
L2_SCALE = 1e-6
#: breaching ``regularization.deep_inversion.scale`` (``attack-bn-weight`` overrides it).
DEFAULT_BN = 0.1
#: The BatchNorm weight is divided by this when the targets are the global running statistics.
GLOBAL_BN_DIVISOR = 10.0
#: DeepInversion's weight of the first BatchNorm layer (``first_bn_multiplier``).
FIRST_BN = 10.0
#: Langevin noise on the image gradient, × lr (breaching ``optim.langevin_noise`` 0.01, the paper 0.2; off here).
LANGEVIN = 0.0
#: Group-consistency weight α_group (``attack-group-weight`` overrides it).
DEFAULT_GROUP = 1.0
PROGRESS_EVERY = 50


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The model's BatchNorm layers ``(name, module)`` in ``named_modules`` (definition) order, which is the
    forward order of fl-sim's models (the stem's BatchNorm first)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_input_sizes(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """Spatial size ``H·W`` of the input of every BatchNorm layer for one input of ``input_shape`` (1 for
    BatchNorm1d), probed with one zero input in eval mode (no buffer moves); the model is left in train mode."""
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: sizes.__setitem__(
        name, int(inp[0][0, 0].numel()))) for name, m in bn_layers(model)]
    was_training = model.training
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sizes


def batch_statistics(payload: AttackPayload, model: nn.Module
                     ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str, int]:
    """The BatchNorm targets ``{layer: (mean (C,), biased variance (C,))}`` the prior matches (module docstring).

    Args:
        payload: the update; its ``buffers`` (granted by ``bn_statistics``) and ``global_state`` are read.
        model: the attacker's copy of the global model (for the layers, their momentum and input sizes).

    Returns:
        ``(targets, source, steps)``: ``source`` is ``"buffers"`` (the client's batch statistics), ``"global"``
        (the global running statistics) or ``"none"`` (no BatchNorm layer); ``steps`` is the ``T`` read off
        ``num_batches_tracked`` (0 unless ``source == "buffers"``). Tensors are float32 on the model's device.
    """
    layers = bn_layers(model)
    if not layers:
        return {}, "none", 0
    device = next(model.parameters()).device
    gs, buf = payload.global_state, payload.buffers or {}
    steps = 0
    if all(f"{n}.running_mean" in buf and f"{n}.num_batches_tracked" in buf for n, _ in layers):
        deltas = {int(buf[f"{n}.num_batches_tracked"]) - int(gs[f"{n}.num_batches_tracked"]) for n, _ in layers}
        steps = deltas.pop() if len(deltas) == 1 else 0
    if steps <= 0:
        return ({n: (gs[f"{n}.running_mean"].float().to(device), gs[f"{n}.running_var"].float().to(device))
                 for n, _ in layers}, "global", 0)
    sizes = bn_input_sizes(model, payload.input_shape)
    batch = payload.batch_size
    out = {}
    for n, m in layers:
        rm0, rv0 = gs[f"{n}.running_mean"].double(), gs[f"{n}.running_var"].double()
        rm1, rv1 = buf[f"{n}.running_mean"].double(), buf[f"{n}.running_var"].double()
        if m.momentum is None:  # cumulative average: rm_T = (t0·rm_0 + Σ_t μ_t) / (t0 + T)
            t0 = int(gs[f"{n}.num_batches_tracked"])
            mean = ((t0 + steps) * rm1 - t0 * rm0) / steps
            var = ((t0 + steps) * rv1 - t0 * rv0) / steps
        else:
            keep = (1.0 - float(m.momentum)) ** steps
            mean = (rm1 - keep * rm0) / (1.0 - keep)
            var = (rv1 - keep * rv0) / (1.0 - keep)
        count = batch * sizes[n]
        var = var * (count - 1) / count if count > 1 else var
        out[n] = (mean.float().to(device), var.clamp(min=0).float().to(device))
    return out, "buffers", steps


def _cosine_lr(iterations: int):
    def factor(t: int) -> float:
        if t < WARMUP:
            return (t + 1) / WARMUP
        span = max(1, iterations - WARMUP)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - WARMUP) / span)))
    return factor


def gradinversion(payload: AttackPayload, budget: Budget, options: AttackOptions | None = None) -> AttackResult:
    """GradInversion on a FedSGD update (see the module docstring).

    Args:
        payload: the server-visible update (``num_examples``, ``train_config`` and, when buffers travel,
            ``buffers``); ``batch_size`` images are reconstructed.
        budget: iterations per member (default :data:`DEFAULT_ITERATIONS`), ``restarts`` = group size ``G``
            (members optimised jointly), time limit, seed, progress.
        options: ``tv``, ``bn_weight``, ``group_weight``, ``labels``, ``init_std`` and the adaptive knobs
            (ignored/weighted layers, mask inference, clipping replication) of the matching term.

    Returns:
        Images ``float32 (B, C, H, W)`` in normalised space and the labels; ``extras``: ``bn_source``
        (``buffers``/``global``/``none``), ``bn_steps``, ``group`` (G) and ``chosen`` (``mean`` or ``member i``).
    """
    start = time.perf_counter()
    options = options or AttackOptions()
    model = payload.build_model(budget.device)
    device = next(model.parameters()).device
    target = matching.prepare(payload, model, options)
    batch = payload.batch_size
    if options.labels == "auto" and batch > 1:
        labels = yin_labels(*classifier_gradients(model, target.grads), batch).to(device)
    else:
        labels = recover_labels(model, target.grads, batch, options.labels, payload.input_shape).to(device)
    targets, source, steps = batch_statistics(payload, model)
    tv = DEFAULT_TV if options.tv is None else options.tv
    bn_w = DEFAULT_BN if options.bn_weight is None else options.bn_weight
    if source == "global":
        bn_w /= GLOBAL_BN_DIVISOR
    group_w = DEFAULT_GROUP if options.group_weight is None else options.group_weight
    init = 1.0 if options.init_std is None else options.init_std
    iterations = budget.iterations or DEFAULT_ITERATIONS
    members = max(1, budget.restarts)
    params = target.needed_params

    layers = [(n, m) for n, m in bn_layers(model) if n in targets]
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(name: str):
        def hook(mod, inp, out):
            x = inp[0]
            dims = [0, *range(2, x.dim())]
            stats[name] = (x.mean(dim=dims), x.var(dim=dims, unbiased=False))
        return hook

    hooks = [m.register_forward_hook(capture(n)) for n, m in layers] if bn_w > 0 else []

    def fidelity(x: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(½‖Δg‖² weighted, prior terms)`` for one member ``x (B, C, H, W)``."""
        stats.clear()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), labels)
            grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        dist = 0.5 * target.l2(grads) / max(target.norm_sq, 1e-30)
        prior = tv * total_variation(x) + L2_SCALE * 0.5 * x.pow(2).mean()
        if bn_w > 0 and layers:
            bn = sum((FIRST_BN if i == 0 else 1.0) * ((stats[n][0] - targets[n][0]).norm()
                                                        + (stats[n][1] - targets[n][1]).norm())
                     for i, (n, _) in enumerate(layers))
            prior = prior + bn_w * bn
        return dist, prior

    lo, hi = box(payload, device)
    gen = torch.Generator().manual_seed(int(budget.seed))
    shape = (batch, *payload.input_shape)
    xs = (torch.randn((members, *shape), generator=gen) * init).to(device).requires_grad_(True)
    opt = torch.optim.Adam([xs], lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_lr(iterations))
    noise_gen = torch.Generator().manual_seed(int(budget.seed) + 1)
    done = 0
    try:
        for it in range(iterations):
            opt.zero_grad(set_to_none=True)
            mean = xs.detach().mean(0) if members > 1 else None
            total = xs.new_zeros(())
            for g in range(members):
                dist, prior = fidelity(xs[g], create_graph=True)
                total = total + GRAD_WEIGHT * dist + prior
                if mean is not None and group_w > 0:
                    total = total + group_w * (xs[g] - mean).pow(2).mean()
            (grad,) = torch.autograd.grad(total, xs)
            if LANGEVIN > 0:
                grad = grad + LANGEVIN * sched.get_last_lr()[0] * torch.randn(
                    grad.shape, generator=noise_gen).to(device)
            xs.grad = grad
            opt.step()
            sched.step()
            with torch.no_grad():
                xs.copy_(torch.maximum(torch.minimum(xs, hi), lo))
            done += 1
            if budget.progress is not None and it % PROGRESS_EVERY == 0:
                budget.progress(it, float(total.detach()))
            if budget.time_limit_s and time.perf_counter() - start > budget.time_limit_s:
                break
        candidates = [(f"member {g}", xs[g].detach()) for g in range(members)]
        if members > 1:
            candidates.append(("mean", xs.detach().mean(0)))
        scored = []
        for name, x in candidates:
            dist, _ = fidelity(x, create_graph=False)
            value = float(dist.detach())
            scored.append((value if math.isfinite(value) else math.inf, name, x))
    finally:
        for h in hooks:
            h.remove()
    best, chosen, x = min(scored, key=lambda t: t[0])
    extras = {"bn_source": source, "bn_steps": steps, "group": members, "chosen": chosen}
    return AttackResult(x.clone(), labels.cpu(), done * members, time.perf_counter() - start, best, extras)

