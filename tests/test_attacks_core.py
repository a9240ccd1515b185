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
