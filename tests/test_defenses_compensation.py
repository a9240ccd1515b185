"""GradDefense's server-side compensation: Marchenko–Pastur filtering reduces the error to the clean aggregate on a
synthetic low-rank signal plus noise, uses only public parameters, and runs inside the strategy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from attacker.denoise import matrix_shape, mp_filter
from clients.defenses import DEFENSES
from fl_sim.config import resolve, specs
from fl_sim.results import RunRecorder
from fl_sim.task.contract import TrainConfig
from strategies.rounds import sent_round
from strategies.steps import SERVER_STEPS
from strategies.steps.graddefense import compensate, noise_variance
from strategies.strategy import CuriousFedAvg
from test_strategy import FakeGrid, reply


def gd_params(**overrides):
    """GradDefense's parameter object for the run config ``overrides``."""
    return DEFENSES["graddefense"].configure(resolve({"defense": "graddefense", **overrides}))


def low_rank_plus_noise(p=13426, q=6.0, rank=3, sigma=0.05, seed=0):
    rng = np.random.default_rng(seed)
    v, w = matrix_shape(p, q)
    signal = (rng.normal(size=(v, rank)) @ rng.normal(size=(rank, w)) * 0.2).reshape(-1)[:p]
    return signal, signal + rng.normal(scale=sigma, size=p), sigma**2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filter_reduces_error_to_clean_signal(seed):
    clean, noisy, var = low_rank_plus_noise(seed=seed)
    out, info = mp_filter(noisy, var, 6.0)
    err_before = np.linalg.norm(noisy - clean)
    err_after = np.linalg.norm(out - clean)
    assert err_after < 0.6 * err_before, (err_after, err_before)
    assert 3 <= info["kept"] < info["W"] / 2  # the signal directions survive, most of the bulk goes


def test_pure_noise_is_mostly_removed_and_zero_noise_changes_nothing():
    rng = np.random.default_rng(3)
    noise = rng.normal(scale=0.1, size=20000)
    out, info = mp_filter(noise, 0.01, 6.0)
    assert np.linalg.norm(out) < 0.35 * np.linalg.norm(noise)
    clean, _, _ = low_rank_plus_noise()
    same, info = mp_filter(clean, 0.0, 6.0)
    np.testing.assert_allclose(same, clean, atol=1e-10)


def test_public_codes_keep_below_rule_keeps_noise_when_variance_is_overestimated():
    clean, noisy, var = low_rank_plus_noise(seed=4)
    correct, _ = mp_filter(noisy, var, 6.0)
    quirky, _ = mp_filter(noisy, 10 * var, 6.0, keep_below=True)
    assert np.linalg.norm(quirky - clean) > 2 * np.linalg.norm(correct - clean)


def test_reshape_modes():
    assert matrix_shape(19438, 6.0, "divisor") == (9719, 2)  # the public code's degenerate case (P = 2·9719)
    v, w = matrix_shape(19438, 6.0, "pad")
    assert w == 56 and v * w >= 19438 and v * w - 19438 < w and 5.5 < v / w < 6.5
    assert matrix_shape(15826, 6.0, "divisor") == (386, 41)  # GradDefense walkthrough LeNet


def test_noise_variance_mean_vs_sum():
    params = gd_params(**{"defense-gd-sigma": 0.1})
    sent = TrainConfig(mode="fedsgd", lr=0.5, batch_size=1)
    mean = noise_variance(params, sent, [1] * 10)
    # each client: lr²σ² on M/S = 1/2 of the entries; the mean of 10 equal-weight clients divides by 10
    assert mean == pytest.approx(0.5 * 0.25 * 0.01 / 10)
    summed = noise_variance(gd_params(**{"defense-gd-sigma": 0.1, "defense-gd-noise-variance": "sum"}),
                            sent, [1] * 10)
    assert summed == pytest.approx(100 * mean)
    fedavg = TrainConfig(mode="fedavg", lr=0.5, batch_size=10, local_steps=0, local_epochs=2)
    assert noise_variance(params, fedavg, [100]) == pytest.approx(0.5 * 0.25 * 0.01 * 20)


@pytest.mark.parametrize("on", [True, False])
def test_strategy_applies_compensation_to_the_aggregate(tmp_path, fmnist, on):
    cfg = resolve({"defense": "graddefense", "defense-gd-compensation": on, "num-supernodes": 3,
                   "attack-every": 0, "out-dir": str(tmp_path), "run-name": "r", "defense-gd-sigma": 1.0,
                   "mode": "fedsgd", "lr": 0.1, "lr-schedule": "constant", "batch-size": 1})
    strat = CuriousFedAvg(specs(cfg).server, fmnist, RunRecorder(tmp_path / "r", cfg))
    assert strat.spec.step is SERVER_STEPS["graddefense"]
    assert strat.spec.defense.params == DEFENSES["graddefense"].configure(cfg)
    glob = strat.eval_model.state_dict()
    strat.configure_train(1, ArrayRecord(glob), ConfigRecord({"mode": "fedsgd", "lr": 0.1, "batch-size": 1}),
                          FakeGrid(3))
    g = torch.Generator().manual_seed(0)
    # per-client noise of the variance the server assumes for σ = 1, lr = 0.1, M/S = 1/2: 0.005 per entry
    states = [{k: v + 0.005**0.5 * torch.randn(v.shape, generator=g) for k, v in glob.items()} for _ in range(3)]
    replies = [reply(s, 1, i) for i, s in enumerate(states)]
    arrays, _ = strat.aggregate_train(1, replies)
    out = arrays.to_torch_state_dict()
    mean = {k: sum(s[k] for s in states) / 3 for k in glob}
    # the strategy's server step is the step called directly on the FedAvg mean, with what the server sent
    sent = sent_round(1, ArrayRecord(glob), TrainConfig("fedsgd", 0.1, 1, server_round=1), {1: 0, 2: 1, 3: 2})
    direct = compensate(ArrayRecord(mean), replies, sent, DEFENSES["graddefense"].configure(cfg))
    for k, v in direct.to_torch_state_dict().items():
        torch.testing.assert_close(out[k], v, rtol=1e-5, atol=1e-6)
    dist = sum(float(((out[k] - mean[k]) ** 2).sum()) for k in glob)
    noise = sum(float(((mean[k] - glob[k]) ** 2).sum()) for k in glob)
    if on:  # pure noise around the global model: most of it is filtered out
        assert dist > 0.8 * noise
    else:
        assert dist < 1e-10
