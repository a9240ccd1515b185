"""Inverting Gradients (fedsgd and the unrolled fedavg variant): reconstructions of known images, the TV term, the
box constraint and the step plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacker import ATTACKS, AttackOptions, AttackPayload, Budget, images_in_update
from attacker.ig import adam_step, box, label_orders, multistep_lrs, step_plan, total_variation
from fl_sim.task.config import TaskConfig
from fl_sim.task.contract import TrainConfig
from fl_sim.task.datasets import denormalize, to_tensor
from fl_sim.task.models import build_model
from strategies.metrics import score


def _score(ds, result, x, y):
    return score(denormalize(result.images, ds.mean, ds.std).numpy(), denormalize(x, ds.mean, ds.std).numpy(),
                 result.labels.numpy(), y.numpy())


def local_sgd_payload(ds, idx, steps, batch, lr=0.15, model_name="lenet-tanh", seed=0):
    """What the server holds after a client ran ``steps`` SGD steps of ``batch`` images from ``idx`` (in order)."""
    torch.manual_seed(seed)
    model = build_model(model_name, ds.input_shape, ds.num_classes)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    for k in range(steps):
        sl = idx[k * batch:(k + 1) * batch]
        loss = F.cross_entropy(model(to_tensor(ds.x_train[sl], ds.mean, ds.std)), torch.as_tensor(ds.y_train[sl]))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    update = {n: p.detach() - state[n] for n, p in model.named_parameters()}
    mode = "fedsgd" if steps == 1 else "fedavg"
    train_config = TrainConfig(mode, lr, batch, local_steps=steps if steps > 1 else 0)
    payload = AttackPayload(model_name, ds.input_shape, ds.num_classes, ds.mean, ds.std, state, update,
                            batch if steps == 1 else 500, train_config)
    return payload, to_tensor(ds.x_train[idx], ds.mean, ds.std), torch.as_tensor(ds.y_train[idx])


def test_ig_recovers_a_batch_from_a_fedsgd_update(fmnist):
    idx = np.array([3, 10, 17])
    payload, x, y = local_sgd_payload(fmnist, idx, 1, 3)
    result = ATTACKS["ig"].run(payload, Budget(iterations=300, seed=0))
    s = _score(fmnist, result, x, y)
    assert s["psnr"] > 25 and s["label_accuracy"] == 1.0
    assert result.iterations == 300
    lo, hi = box(payload, result.images.device)
    assert bool((result.images >= lo - 1e-6).all() and (result.images <= hi + 1e-6).all())


@pytest.fixture(scope="module")
def three_step_update(fmnist):
    """Three local SGD steps of one image each (three different labels), and ig-fedavg's result on them."""
    idx = np.array([3, 10, 17])
    payload, x, y = local_sgd_payload(fmnist, idx, 3, 1)
    assert len(set(y.tolist())) == 3
    return payload, x, y, ATTACKS["ig-fedavg"].run(payload, Budget(iterations=300, seed=0))


def test_ig_fedavg_unrolls_local_steps_and_finds_the_label_order(fmnist, three_step_update):
    _, x, y, result = three_step_update
    s = _score(fmnist, result, x, y)
    assert result.images.shape[0] == 3 and result.extras["local_steps"] == 3
    assert result.labels.tolist() == y.tolist()  # the step order of the labels, found by the pilot runs
    assert s["psnr"] > 25


def test_single_step_matching_of_a_multistep_update_is_refused(fmnist):
    """``ig`` reconstructs one batch (1 image) but the 3-step update holds 3: a run refuses it before it starts,
    and the scores refuse to match 1 image against 3 (it would pick the nearest of the three)."""
    idx = np.array([3, 10, 17])
    payload, x, y = local_sgd_payload(fmnist, idx, 3, 1)
    task = TaskConfig.from_config({"mode": "fedavg", "local-steps": 3, "batch-size": 1})
    assert images_in_update(payload.train_config, payload.num_examples) == 3
    assert ATTACKS["ig"].images(task, payload.num_examples) == 1
    assert ATTACKS["ig-fedavg"].images(task, payload.num_examples) == 3
    plain = ATTACKS["ig"].run(payload, Budget(iterations=2, seed=0))
    with pytest.raises(ValueError, match="equal size"):
        _score(fmnist, plain, x, y)


def test_total_variation_is_the_anisotropic_mean():
    x = torch.zeros(1, 1, 4, 4)
    x[..., :, 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal differences are 1
    assert float(total_variation(x)) == pytest.approx(4 / 12)
    assert float(total_variation(torch.ones(2, 3, 5, 5))) == 0.0


def test_step_plan_and_label_orders():
    p = AttackPayload("lenet", (1, 28, 28), 10, (0.5,), (0.5,), {}, {}, 4, TrainConfig("fedavg", 0.1, 2, 3))
    num, b, steps = step_plan(p)
    assert (num, b) == (4, 2) and steps == [[0, 1], [2, 3], [0, 1]]  # 6 slots over 4 images: reused
    orders = label_orders([1, 1, 2, 5], steps, 24, 0)
    assert orders[0] == [1, 1, 2, 5]
    # within-step order does not count: the first step's pair is {1,1}, {1,2}, {1,5} or {2,5}
    assert len(orders) == len({tuple(o) for o in orders}) == 4
    assert label_orders([3, 3], [[0], [1]], 24, 0) == [[3, 3]]


def test_tv_option_changes_the_objective(fmnist):
    payload, x, y = local_sgd_payload(fmnist, np.array([3]), 1, 1)
    a = ATTACKS["ig"].run(payload, Budget(iterations=5, seed=1), AttackOptions(tv=0.0))
    b = ATTACKS["ig"].run(payload, Budget(iterations=5, seed=1), AttackOptions(tv=1.0))
    assert b.objective > a.objective


def test_ig_chain_engine_reproduces_autograd_and_is_deterministic():
    """IG's chain engine (J_gᵀw, no double backward) gives autograd's reconstruction on the ReLU ConvNet: signed
    Adam only sees the sign of the gradient, so the rounding difference does not show (same PSNR to 4 decimals)."""
    from attacker import ig as ig_module
    from fl_sim.audit import fedsgd_payload
    from strategies.metrics import psnr

    u = torch.linspace(0, 1, 32)
    x = torch.stack([torch.outer(u, u), torch.outer(1 - u, u), 0.5 + 0.4 * torch.sin(6 * torch.outer(u, 1 - u))])[None]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    payload, _, _ = fedsgd_payload("convnet", xn, torch.tensor([2]), mean, std, 10, 0.1, 0)
    truth = x.numpy()[0]
    runs = [ig_module.ig(payload, Budget(iterations=60, seed=1), engine=e) for e in ("auto", "autograd", "auto")]
    values = [round(psnr(denormalize(r.images, mean, std).numpy()[0], truth), 4) for r in runs]
    assert torch.equal(runs[0].images, runs[2].images)
    assert values[0] == values[1] and values[0] > 10, values
    assert abs(runs[0].objective - runs[1].objective) <= 1e-5 * abs(runs[1].objective)
    with pytest.raises(ValueError, match="engine"):
        ig_module.ig(payload, Budget(iterations=1), engine="jit")


def test_total_variation_gradient_matches_autograd():
    from attacker.ig import total_variation_and_grad

    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    x[0, 0, 0, :2] = 0.25  # a tie: sign(0) = 0 on both sides
    leaf = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(total_variation(leaf), leaf)
    value, grad = total_variation_and_grad(x)
    torch.testing.assert_close(value, total_variation(x))
    torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("iterations", [1, 2, 3, 8, 40])
def test_written_out_adam_is_torch_adam_with_multistep_lr_to_the_bit(iterations):
    """IG's Adam step and learning-rate schedule reproduce torch.optim.Adam + MultiStepLR float for float, milestones
    at 0 and repeated milestones (short budgets) included, on sign gradients as IG feeds them and on raw ones."""
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    gen = torch.Generator().manual_seed(iterations)
    x0 = torch.randn(2, 3, 5, 5, generator=gen)
    grads = [torch.randn(2, 3, 5, 5, generator=gen) * 10 ** float(k % 5 - 2) for k in range(iterations)]
    for signed in (True, False):
        ref = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([ref], lr=0.1)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        ours, m, v = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
        lrs = multistep_lrs(0.1, milestones, 0.1, iterations)
        for it, g in enumerate(grads):
            g = g.sign() if signed else g
            assert lrs[it] == opt.param_groups[0]["lr"]
            ref.grad = g.clone()
            opt.step()
            sched.step()
            adam_step(ours, g.clone(), m, v, it + 1, lrs[it])
            assert torch.equal(ours, ref.detach()), (signed, it)
