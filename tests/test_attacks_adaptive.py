"""Adaptive attack knobs: ignoring/weighting layers (the PLD-muted attack), mask inference, clipping replication.

The Soteria update is the one the real defense sends through the real client pipeline (``fl_sim.audit``); the
clipped update is a global L2 clip of a plain FedSGD update. Each test checks that the plain attack fails on it and
that the adaptive option restores the reconstruction."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from attacker import ATTACKS, AttackOptions, Budget, matching
from attacker.options import parse_layer_weights
from fl_sim.audit import audit_dataset, audit_round
from fl_sim.audit import fedsgd_payload as reference_payload
from fl_sim.config import ConfigError, check_feasible, resolve
from fl_sim.task.datasets import denormalize, to_tensor
from strategies.metrics import score

LR = 0.1


def fedsgd_payload(ds, idx, model_name="lenet", seed=1):
    x = to_tensor(ds.x_train[idx], ds.mean, ds.std)
    y = torch.as_tensor(ds.y_train[idx])
    payload, _, _ = reference_payload(model_name, x, y, ds.mean, ds.std, ds.num_classes, LR, seed)
    return payload, x, y


def psnr_of(ds, result, x, y):
    return score(denormalize(result.images, ds.mean, ds.std).numpy(), denormalize(x, ds.mean, ds.std).numpy(),
                 result.labels.numpy(), y.numpy())


@pytest.fixture(scope="module")
def soteria_like(fmnist):
    """The update the real Soteria client sends for image 11 (``lenet``, 70 % of the FC input features pruned),
    through the real client pipeline and server side (:func:`fl_sim.audit.audit_round`), as the attack receives
    it; and the undefended update of the same client."""
    idx = np.array([11])
    data = audit_dataset("fashion-mnist", fmnist.x_train[idx], fmnist.y_train[idx])

    def payload_for(defense):
        cfg = resolve({"attack": "idlg", "model": "lenet", "defense": defense, "attack-iterations": 1, "lr": LR,
                       "batch-size": 1})
        strategy, reply, _ = audit_round(cfg, data)
        return strategy.attack_payload(reply)

    x = to_tensor(fmnist.x_train[idx], fmnist.mean, fmnist.std)
    return payload_for("none"), payload_for("soteria"), x, torch.as_tensor(fmnist.y_train[idx])


def test_the_soteria_update_is_the_clean_one_with_fc_columns_zeroed(soteria_like):
    clean, defended, _, _ = soteria_like
    for k in clean.update:
        if k != "fc.weight":
            assert torch.equal(defended.update[k], clean.update[k]), k
    w, w0 = defended.update["fc.weight"], clean.update["fc.weight"]
    zero = (w == 0).all(dim=0)
    assert abs(float(zero.float().mean()) - 0.7) < 0.01
    torch.testing.assert_close(w[:, ~zero], w0[:, ~zero])


def test_muting_the_defended_layer_restores_the_leak(fmnist, soteria_like):
    # measured (60 steps): plain 5.4 dB, muted 85.5 dB
    _, defended, x, y = soteria_like
    plain = psnr_of(fmnist, ATTACKS["idlg"].run(defended, Budget(iterations=30)), x, y)
    muted = psnr_of(fmnist, ATTACKS["idlg"].run(defended, Budget(iterations=30),
                                                AttackOptions(ignore_layers=("fc",))), x, y)
    assert plain["psnr"] < 15 < 30 < muted["psnr"]
    assert muted["label_accuracy"] == 1.0


def test_weight_zero_is_the_same_as_ignoring(fmnist, soteria_like):
    _, defended, x, y = soteria_like
    a = ATTACKS["idlg"].run(defended, Budget(iterations=5), AttackOptions(ignore_layers=("fc.weight",)))
    b = ATTACKS["idlg"].run(defended, Budget(iterations=5), AttackOptions(layer_weights=(("fc.weight", 0.0),)))
    torch.testing.assert_close(a.images, b.images)


def test_inferred_mask_restores_the_leak(fmnist, soteria_like):
    _, defended, x, y = soteria_like
    masked = psnr_of(fmnist, ATTACKS["idlg"].run(defended, Budget(iterations=60), AttackOptions(infer_mask=True)),
                     x, y)
    assert masked["psnr"] > 30


@pytest.mark.parametrize("scope", ["gradient", "update"])
def test_replicated_clipping_restores_l2_matching(fmnist, scope):
    payload, x, y = fedsgd_payload(fmnist, np.array([11]))
    norm = float(torch.sqrt(sum((u / LR).pow(2).sum() for u in payload.update.values())))
    bound = 0.2 * norm  # the client clipped its gradient to a fifth of its norm
    clipped = replace(payload, update={k: v * bound / norm for k, v in payload.update.items()})
    plain = psnr_of(fmnist, ATTACKS["idlg"].run(clipped, Budget(iterations=40)), x, y)
    c = bound if scope == "gradient" else bound * LR
    adaptive = psnr_of(fmnist, ATTACKS["idlg"].run(clipped, Budget(iterations=40),
                                                   AttackOptions(clip_bound=c, clip_scope=scope)), x, y)
    assert plain["psnr"] < 20 and adaptive["psnr"] > 30


def test_target_l2_matches_the_weighted_masked_sum(fmnist, soteria_like):
    _, defended, _, _ = soteria_like
    model = defended.build_model()
    opts = AttackOptions(layer_weights=(("features.0", 4.0),), ignore_layers=("fc.bias",), infer_mask=True)
    target = matching.prepare(defended, model, opts)
    trial = [torch.randn_like(p) for p in target.needed_params]
    names = [target.names[i] for i in target.needed]
    expected = 0.0
    for n, t, g in zip(names, trial, [target.grads[i] for i in target.needed]):
        w = 4.0 if n.startswith("features.0.") else (0.0 if n == "fc.bias" else 1.0)
        mask = (defended.update[n] != 0).float()
        expected += w * float(((t * mask - g) ** 2).sum())
    assert "fc.bias" not in names
    assert float(target.l2(trial)) == pytest.approx(expected, rel=1e-5)


def test_bad_patterns_are_config_errors():
    with pytest.raises(ConfigError, match="attack-layer-weights"):
        resolve({"attack-layer-weights": "fc:minus"})
    with pytest.raises(ConfigError, match="attack-ignore-layers='fcc'.*matches no parameter"):
        check_feasible(resolve({"attack-ignore-layers": "fcc"}))
    with pytest.raises(ConfigError, match="every layer"):
        check_feasible(resolve({"attack-ignore-layers": "*"}))
    assert parse_layer_weights("fc:0.5, features.*:2") == (("fc", 0.5), ("features.*", 2.0))
