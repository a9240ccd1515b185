"""DLG and iDLG: gradient matching with L-BFGS.

* ``dlg`` — Deep Leakage from Gradients (Zhu, Liu & Han, NeurIPS'19; ``mit-han-lab/dlg`` ``main.py``): dummy images
  ``x'`` and dummy label logits ``y'`` drawn from N(0, 1) are optimised jointly with L-BFGS (lr 1) to minimise
  ``Σ_l ‖∇θ_l ℓ(F(x'), softmax(y')) − g_l‖²``, where ``ℓ`` is cross-entropy against the soft label. No prior, no box.
* ``idlg`` — Improved DLG (Zhao, Mopuri & Bilen 2020, ``iDLG.py``): the label is first read off the last layer's
  gradient (:mod:`attacker.labels`), then only ``x'`` is optimised against hard-label cross-entropy.

Both consume the observed update as an average gradient (:meth:`AttackPayload.gradients`), so on a ``fedsgd``
update they match exactly what the client computed. The optimiser is :func:`attacker.lbfgs.minimize` (long
compact history, one evaluation per iteration, Armijo backtracking) rather than ``torch.optim.LBFGS``; one
"iteration" of the budget is one L-BFGS *step* of :data:`INNER` = 20 inner iterations, as ``optimizer.step`` with
``max_iter=20`` in the original scripts. ``extras`` counts the inner iterations and objective evaluations
(``closures``). A restart stops early when the matching distance falls below :data:`REL_TOL` of ``‖g‖²``, or when
it stalls (no 1% progress in :data:`STALL` inner iterations — typical of trained models, where more iterations
buy nothing); further restarts then start from new random points.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from attacker import chain, lbfgs, matching
from attacker.labels import recover_labels
from attacker.options import AttackOptions
from attacker.payload import AttackPayload, AttackResult, Budget

#: Default number of L-BFGS steps (each up to :data:`INNER` iterations, as ``torch.optim.LBFGS(max_iter=20)``).
DEFAULT_ITERATIONS = 200
#: Default std of the Gaussian initialisation of the dummy images (normalised space). The original scripts use 1;
#: starting nearer the dataset mean halves the evaluations iDLG needs to reach 40 dB on LeNet (3 seeds: 400–520
#: instead of 845–1,165 evaluations). ``attack-init-std=1`` restores the original.
DEFAULT_INIT_STD = 0.1
#: Inner L-BFGS iterations per step (one objective evaluation each when the unit step is accepted).
INNER = 20
#: Curvature pairs kept by :func:`attacker.lbfgs.minimize`.
HISTORY = 300
#: Early stop when ``distance / ‖g‖² < REL_TOL`` (about 80–90 dB on LeNet; float32 bottoms out near 1e-13).
REL_TOL = 1e-10
#: Below this relative objective, repeated long line searches mean float32's floor was reached: stop.
PRECISION_REL = 1e-7
#: Stop a restart whose best objective has not dropped by 1% in this many inner iterations.
STALL = 400
#: After the requested restarts, start again from a new random point while the best relative objective is above
#: this (a stalled or diverged run) and budget is left.
RESTART_ABOVE = 1e-4
#: A restart whose objective is still above ``GIVE_UP_REL · ‖g‖²`` after ``GIVE_UP_AFTER`` inner iterations is
#: abandoned (e.g. a start in a saturated region of a trained model, far from any match).
GIVE_UP_AFTER = 200
GIVE_UP_REL = 1e3
#: Progress callback every this many inner iterations.
PROGRESS_EVERY = 50
#: Whether to use oneDNN (mkldnn) convolutions inside the attack (slower on the small inputs of these attacks).
MKLDNN = False
#: How the objective's gradient is computed (the default of the ``engine`` argument): ``"auto"`` uses
#: :mod:`attacker.chain` where the model is a chain (no double backward; the same gradient to float rounding) and
#: autograd otherwise; ``"autograd"`` always builds the trial gradient with ``create_graph=True`` and
#: back-propagates the distance through it, as the original scripts do. Same seed → same result with either; the
#: two engines' L-BFGS trajectories drift apart by rounding (iDLG on LeNet, 25 steps: 41.83 vs 41.91 dB), so
#: ``"auto"`` is a change of the numbers (not of the algorithm) against fl-sim before it; ``"autograd"`` restores
#: them (docs/performance.md).
ENGINE = "auto"
ENGINES = ("auto", "autograd")


@contextlib.contextmanager
def mkldnn(enabled: bool) -> Iterator[None]:
    """Temporarily enable or disable oneDNN (mkldnn) kernels (without touching the TF32 flags).

    ``torch.backends.mkldnn.flags`` would also reset oneDNN's TF32 flag, which warns on every call on CPU builds.
    """
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(enabled)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


def _soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``Σ_c −softmax(target)_c · log softmax(logits)_c``."""
    return torch.mean(torch.sum(-F.softmax(target_logits, dim=-1) * F.log_softmax(logits, dim=-1), dim=-1))


def _match(payload: AttackPayload, budget: Budget, joint_labels: bool, options: AttackOptions | None,
           engine: str | None = None) -> AttackResult:
    engine = ENGINE if engine is None else engine
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    start = time.perf_counter()
    options = options or AttackOptions()
    model = payload.build_model(budget.device)
    target = matching.prepare(payload, model, options)
    params = target.needed_params
    b = payload.batch_size
    shape = (b, *payload.input_shape)
    nx = math.prod(shape)
    target_sq = target.norm_sq or 1.0
    steps = budget.iterations or DEFAULT_ITERATIONS
    gen = torch.Generator().manual_seed(int(budget.seed))
    device = params[0].device
    fixed_labels = None if joint_labels else recover_labels(model, target.grads, b, options.labels,
                                                            payload.input_shape).to(device)
    init_std = DEFAULT_INIT_STD if options.init_std is None else options.init_std
    counter = {"evals": 0, "inner": 0}
    fast = chain.compile_chain(model, target.needed, torch.zeros(shape, device=device)) if engine == "auto" else None

    def weights(grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        return target.value_and_weights(grads, "l2")

    def fun(v: torch.Tensor) -> tuple[float, torch.Tensor]:
        counter["evals"] += 1
        if fast is not None:
            value, gx, gs = chain.value_and_grad(fast, weights, v[:nx].view(shape),
                                                 v[nx:].view(b, -1) if joint_labels else None, fixed_labels)
            return float(value), gx.reshape(-1) if gs is None else torch.cat((gx.reshape(-1), gs.reshape(-1)))
        v = v.detach().requires_grad_(True)
        x = v[:nx].view(shape)
        out = model(x)
        loss = _soft_cross_entropy(out, v[nx:].view(b, -1)) if joint_labels else F.cross_entropy(out, fixed_labels)
        dist = target.l2(torch.autograd.grad(loss, params, create_graph=True))
        (grad,) = torch.autograd.grad(dist, v)
        return float(dist.detach()), grad

    flags = {"out_of_budget": False}

    def callback(it: int, f: float) -> bool:
        counter["inner"] += 1
        if budget.progress is not None and it % PROGRESS_EVERY == 0:
            budget.progress(counter["inner"] // INNER, f)
        if budget.time_limit_s and time.perf_counter() - start > budget.time_limit_s:
            flags["out_of_budget"] = True
            return True
        if counter["evals"] >= max_evals:  # long line searches count against the budget too
            flags["out_of_budget"] = True
            return True
        # hopeless start: still far above ‖g‖² (the zero gradient's distance) after GIVE_UP_AFTER iterations
        return it == GIVE_UP_AFTER and f > GIVE_UP_REL * target_sq

    best: AttackResult | None = None
    reasons = []
    total = steps * INNER
    max_evals = int(total * 1.25)  # as torch.optim.LBFGS's max_eval default
    per_restart = total // max(1, budget.restarts)
    # the im2col convolution has less per-call overhead than oneDNN's on the small inputs these attacks use
    with mkldnn(MKLDNN):
        while counter["inner"] < total:
            # restarts alternate the initial scale: near the mean image first, then the original N(0, 1)
            scale = init_std if len(reasons) % 2 == 0 else 1.0
            parts = [torch.randn(shape, generator=gen) * scale]
            if joint_labels:
                parts.append(torch.randn((b, payload.num_classes), generator=gen))
            v0 = torch.cat([t.reshape(-1) for t in parts]).to(device)
            left = total - counter["inner"]
            res = lbfgs.minimize(fun, v0, max_iter=min(left, per_restart) if len(reasons) + 1 < budget.restarts
                                 else left, history=HISTORY, ftarget=REL_TOL * target_sq, stall=STALL,
                                 callback=callback, precision_floor=PRECISION_REL * target_sq)
            reasons.append(res.reason if res.reason != "callback" else "budget" if flags["out_of_budget"] else "gave up")
            x = res.x[:nx].view(shape)
            labels = res.x[nx:].view(b, -1).argmax(-1) if joint_labels else fixed_labels
            if best is None or res.f < best.objective:
                best = AttackResult(x.detach().clone(), labels.detach().cpu().clone(), 0, 0.0, res.f)
            if res.reason == "target" or flags["out_of_budget"]:
                break
            # more restarts: the ones asked for, then new starts while a stalled or diverged run left budget
            if len(reasons) >= budget.restarts and best.objective <= RESTART_ABOVE * target_sq:
                break
    assert best is not None
    best.iterations = math.ceil(counter["inner"] / INNER)
    best.time_s = time.perf_counter() - start
    best.extras = {"closures": counter["evals"], "inner_iterations": counter["inner"],
                   "relative_objective": best.objective / target_sq, "stop": reasons[-1], "restarts": len(reasons)}
    return best


def dlg(payload: AttackPayload, budget: Budget, options: AttackOptions | None = None,
        engine: str | None = None) -> AttackResult:
    """DLG: joint optimisation of images and soft labels (see the module docstring).

    Args:
        payload: the server-visible update; its ``batch_size`` sets the number of dummy images.
        budget: iterations (L-BFGS steps, default 200), restarts, time limit, seed.
        options: adaptive knobs (ignored/weighted layers, mask inference, clipping replication).
        engine: one of :data:`ENGINES` (default :data:`ENGINE`): how the objective's gradient is computed.

    Returns:
        Images ``(B, C, H, W)`` in normalised space and the argmax of the optimised label logits.
    """
    return _match(payload, budget, True, options, engine)


def idlg(payload: AttackPayload, budget: Budget, options: AttackOptions | None = None,
         engine: str | None = None) -> AttackResult:
    """iDLG: analytic labels from the last layer, then L2 gradient matching on the images only.

    Args:
        payload: the server-visible update.
        budget: iterations (L-BFGS steps, default 200), restarts, time limit, seed.
        options: adaptive knobs (ignored/weighted layers, mask inference, clipping replication).
        engine: one of :data:`ENGINES` (default :data:`ENGINE`): how the objective's gradient is computed.

    Returns:
        Images ``(B, C, H, W)`` in normalised space and the analytic labels.
    """
    return _match(payload, budget, False, options, engine)
