"""Attack correctness on known images: iDLG's analytic label, DLG/iDLG reconstructions, update→gradient, and the
threat-model boundary (the attacker imports nothing from clients/)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from attacker import ATTACKS, Budget, update_to_gradient
from attacker.labels import batch_labels, classifier_gradients, idlg_label
from fl_sim.audit import fedsgd_payload
from fl_sim.task.datasets import denormalize, to_tensor
from strategies.metrics import score


def make_payload(model_name, ds, idx, lr=0.1, seed=0):
    """The payload a server would hold after one FedSGD step of a client on samples ``idx``."""
    x = to_tensor(ds.x_train[idx], ds.mean, ds.std)
    y = torch.as_tensor(ds.y_train[idx])
    payload, _, _ = fedsgd_payload(model_name, x, y, ds.mean, ds.std, ds.num_classes, lr, seed)
    return payload, x, y


def test_update_to_gradient_inverts_sgd():
    g = [torch.randn(3, 4), torch.randn(4)]
    delta = [-0.05 * 4 * t for t in g]  # 4 steps at lr 0.05 with the same gradient
    for a, b in zip(update_to_gradient(delta, 0.05, 4), g):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        update_to_gradient(delta, 0.0, 1)


@pytest.mark.parametrize("model_name", ["lenet-tanh", "lenet"])
def test_idlg_label_is_exact_for_batch_of_one_over_20_seeds(fmnist, model_name):
    for seed in range(20):
        idx = np.array([seed * 37 % len(fmnist.y_train)])
        payload, _, y = make_payload(model_name, fmnist, idx, seed=seed)
        model = payload.build_model()
        w, b = classifier_gradients(model, payload.gradients(model))
        assert idlg_label(w, b) == int(y[0]), f"seed {seed}"


def test_label_rule_reads_sign_of_gradient_not_update(fmnist):
    payload, _, y = make_payload("lenet-tanh", fmnist, np.array([5]))
    model = payload.build_model()
    w_upd, b_upd = classifier_gradients(model, [payload.update[n] for n, _ in model.named_parameters()])
    # the raw update has the opposite sign: its argmin is a wrong class, its argmax the right one
    assert int(b_upd.argmax()) == int(y[0]) != idlg_label(w_upd, b_upd)


def test_batch_labels_recover_the_multiset_for_distinct_labels(fmnist):
    idx = np.array([np.flatnonzero(fmnist.y_train == c)[0] for c in (1, 4, 7)])
    payload, _, y = make_payload("lenet-tanh", fmnist, idx)
    model = payload.build_model()
    w, b = classifier_gradients(model, payload.gradients(model))
    assert batch_labels(w, b, 3).tolist() == sorted(y.tolist())


@pytest.mark.parametrize("attack,model_name", [("idlg", "lenet"), ("dlg", "lenet"), ("idlg", "lenet-tanh")])
def test_gradient_matching_recovers_a_known_image(fmnist, attack, model_name):
    payload, x, y = make_payload(model_name, fmnist, np.array([11]), seed=1)
    result = ATTACKS[attack].run(payload, Budget(iterations=300, seed=0))
    s = score(denormalize(result.images, fmnist.mean, fmnist.std).numpy(),
              denormalize(x, fmnist.mean, fmnist.std).numpy(), result.labels.numpy(), y.numpy())
    assert s["psnr"] >= 30.0 and s["label_accuracy"] == 1.0
    assert result.iterations <= 300 and result.time_s > 0


def test_random_image_scores_low(fmnist):
    """The metrics discriminate: a random image is far from the truth (guards against a vacuous PSNR test)."""
    truth = fmnist.x_train[:2].transpose(0, 3, 1, 2) / 255.0
    rand = np.random.default_rng(0).random(truth.shape)
    assert score(rand, truth)["psnr"] < 12


def test_attacker_imports_nothing_from_clients():
    code = (
        "import importlib, pkgutil, sys, attacker\n"
        "for m in pkgutil.walk_packages(attacker.__path__, 'attacker.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'clients' or n.startswith('clients.'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _autograd_objective(model, target, x, kind, labels=None, soft=None):
    """The objective and its input gradient(s) the original scripts' way: create_graph=True, then backward."""
    import torch.nn.functional as F

    x = x.detach().requires_grad_(True)
    leaves = [x]
    out = model(x)
    if soft is not None:
        soft = soft.detach().requires_grad_(True)
        leaves.append(soft)
        loss = torch.mean(torch.sum(-F.softmax(soft, -1) * F.log_softmax(out, -1), -1))
    else:
        loss = F.cross_entropy(out, labels)
    grads = torch.autograd.grad(loss, target.needed_params, create_graph=True)
    value = target.l2(grads) if kind == "l2" else target.cosine(grads)
    return value.detach(), torch.autograd.grad(value, leaves)


@pytest.mark.parametrize("model_name,kind,options", [
    ("lenet", "l2", {}), ("lenet-tanh", "l2", {"infer_mask": True}), ("convnet", "cosine", {}),
    ("cnn6", "cosine", {}), ("fcn3", "l2", {}), ("convnet", "l2", {"clip_bound": 0.5}),
])
def test_chain_gradient_equals_double_backward(model_name, kind, options):
    """attacker.chain's J_gᵀw pass gives autograd's double-backward gradient, on every chain model and layer type."""
    from attacker import AttackOptions, chain, matching

    torch.manual_seed(0)
    shape = (2, 3, 32, 32) if model_name != "fcn3" else (2, 1, 28, 28)
    x, y = torch.rand(shape), torch.tensor([1, 4])
    payload, _, _ = fedsgd_payload(model_name, x, y, (0.5,) * shape[1], (0.25,) * shape[1], 10, 0.1, 0)
    model = payload.build_model()
    target = matching.prepare(payload, model, AttackOptions(**options))
    fast = chain.compile_chain(model, target.needed, torch.zeros(shape))
    assert fast is not None, f"{model_name} should read as a chain"
    trial = torch.randn(shape) * 0.5
    ref_value, (ref_grad,) = _autograd_objective(model, target, trial, kind, labels=y)
    value, grad, _ = chain.value_and_grad(fast, lambda g: target.value_and_weights(g, kind), trial, None, y)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6 * float(ref_grad.abs().max()))
    # DLG's joint optimisation: the gradient in the soft label logits too
    soft = torch.randn(shape[0], 10)
    ref_value, (ref_gx, ref_gs) = _autograd_objective(model, target, trial, kind, soft=soft)
    value, gx, gs = chain.value_and_grad(fast, lambda g: target.value_and_weights(g, kind), trial, soft)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-6 * float(ref_gx.abs().max()))
    torch.testing.assert_close(gs, ref_gs, rtol=1e-4, atol=1e-6 * float(ref_gs.abs().max()))


def test_models_that_are_not_chains_fall_back_to_autograd():
    from attacker import chain
    from fl_sim.task.models import build_model

    model = build_model("resnet20-kl", (3, 32, 32), 10)  # residual blocks and batch norm
    assert chain.compile_chain(model, list(range(len(list(model.parameters())))), torch.zeros(1, 3, 32, 32)) is None


@pytest.mark.parametrize("attack", ["idlg", "dlg"])
def test_same_seed_gives_the_same_psnr_and_engines_agree(attack):
    """Same seed → the same reconstruction (bit for bit) with the default engine; the chain engine and autograd's
    double backward follow the same trajectory up to float rounding (LeNet, 3×32×32, B = 1)."""
    from attacker import dlg
    from strategies.metrics import psnr

    u = torch.linspace(0, 1, 32)
    x = torch.stack([torch.outer(u, u), torch.outer(1 - u, u), 0.5 + 0.4 * torch.sin(6 * torch.outer(u, 1 - u))])[None]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    xn = to_tensor((x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), mean, std)
    payload, _, _ = fedsgd_payload("lenet", xn, torch.tensor([3]), mean, std, 10, 0.1, 0)
    truth = denormalize(xn, mean, std).numpy()[0]
    fn = getattr(dlg, attack)
    runs = {eng: fn(payload, Budget(iterations=6, seed=5), engine=eng) for eng in ("auto", "autograd")}
    again = fn(payload, Budget(iterations=6, seed=5))
    value = {k: psnr(denormalize(r.images, mean, std).numpy()[0], truth) for k, r in runs.items()}
    assert torch.equal(again.images, runs["auto"].images)
    assert psnr(denormalize(again.images, mean, std).numpy()[0], truth) == value["auto"]
    assert value["auto"] > 15, value  # it did reconstruct something
    assert abs(value["auto"] - value["autograd"]) < 0.25, value  # rounding drift of L-BFGS, not a bias
    assert runs["auto"].extras["closures"] > 40
