"""The DP defenses through the real client pipeline (``clients.pipeline.client_update``, as the ClientApp, the audit
and the benchmarks call it): per-example clipping, the noise law, Poisson batches, the reported budget recomputed
with dp-accounting from the reported figures, the target never exceeded, Flower's own LocalDpMod on the update,
and ``summary.json``'s privacy block.

Statistical checks use fixed seeds and state their tolerances (several standard errors)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from flwr.app import RecordDict
from flwr.clientapp.mod import LocalDpMod

from clients.config import ClientSpec
from clients.defenses import DEFENSES, StepContext, dp, dp_sgd
from clients.pipeline import client_update
from fl_sim.config import resolve
from fl_sim.results import summarize
from fl_sim.task.datasets import to_tensor
from fl_sim.task.keys import ConfigError
from fl_sim.task.models import build_model
from fl_sim.task.partition import partitions

CPU = torch.device("cpu")


def setup(fmnist, pid=0, **overrides):
    cfg = resolve({"num-supernodes": 10, "lr-schedule": "constant", **overrides})
    spec = ClientSpec.from_config(cfg)
    torch.manual_seed(0)
    glob = build_model(cfg["model"], fmnist.input_shape, fmnist.num_classes).state_dict()
    part = partitions(fmnist.name, "", 10, "iid", 0.5, 0)[pid]
    return cfg, spec, glob, part


def one_round(spec, glob, fmnist, part, state, rnd=1, seed=7):
    tc = spec.task.train_config(server_round=rnd)
    return client_update(spec, glob, fmnist, part, tc, state, 11, seed + rnd, CPU), tc


def flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


def step_of(update, glob, names, lr):
    """The gradient step a one-step update took: (global − local) / lr, flat over the trainable parameters."""
    return flat([(glob[n] - update.state[n]) / lr for n in names])


def per_example_loop(model_name, glob, fmnist, idx):
    """Per-example gradients by plain autograd, one example at a time (independent of torch.func)."""
    model = build_model(model_name, fmnist.input_shape, fmnist.num_classes)
    model.load_state_dict(glob)
    model.train()
    out = []
    for i in idx:
        x = to_tensor(fmnist.x_train[[i]], fmnist.mean, fmnist.std)
        y = torch.as_tensor(fmnist.y_train[[i]])
        out.append(flat(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))))
    return torch.stack(out), [n for n, _ in model.named_parameters()]


# -- dp-sgd --------------------------------------------------------------------------------------------------------
DPSGD_STEP = {"defense": "dp-sgd", "mode": "fedavg", "local-steps": 1, "batch-size": 20, "lr": 0.1,
              "defense-dp-clip": 0.1}


def test_dp_sgd_clips_every_example_to_c_and_averages_over_the_expected_batch(fmnist):
    # one local step: (Σ_i clip_C(g_i) + N(0, σ²C²)) / B with B = 20 the *expected* batch size. The test holds the
    # client's secret round seed, so it redraws the noise (a torch.Generator seeded with it, one draw per parameter
    # in order) and checks the step exactly, with per-example gradients from plain autograd
    sigma, c, b = 1.0, 0.1, 20
    cfg, spec, glob, part = setup(fmnist, **DPSGD_STEP, **{"defense-dp-noise-multiplier": sigma,
                                                           "defense-dp-epsilon": 1e9})
    update, tc = one_round(spec, glob, fmnist, part, RecordDict(), seed=7)
    idx = update.sample_indices
    assert 5 <= len(idx) <= 40 and len(idx) != b  # a Poisson batch around B
    g, names = per_example_loop(cfg["model"], glob, fmnist, idx)
    norms = g.norm(dim=1)
    assert (norms > c).all()  # every example needs clipping at C = 0.1, so the test can tell
    clipped = g * (c / norms)[:, None]
    assert torch.allclose(clipped.norm(dim=1), torch.full((len(idx),), c, dtype=torch.float64))
    gen = torch.Generator().manual_seed(7 + 1)  # the round seed one_round passed
    noise = flat([torch.randn(glob[n].shape, generator=gen) * sigma * c for n in names])
    step = step_of(update, glob, names, tc.lr)
    torch.testing.assert_close(step, (clipped.sum(0) + noise) / b, atol=2e-6, rtol=1e-4)
    assert not torch.allclose(step, (g.sum(0) + noise) / b, atol=1e-3)  # not the unclipped sum
    assert not torch.allclose(step, (clipped.sum(0) + noise) / len(idx), atol=1e-4)  # nor the actual batch size


def test_dp_sgd_noise_std_is_sigma_c_over_b(fmnist):
    # σ = 2, C = 0.1, B = 20: per-entry std σC/B = 0.01; ~13,000 entries give a relative standard error of
    # ~0.6 %; tolerance 3 %
    cfg, spec, glob, part = setup(fmnist, **DPSGD_STEP, **{"defense-dp-noise-multiplier": 2.0,
                                                           "defense-dp-epsilon": 1e9})
    update, _ = one_round(spec, glob, fmnist, part, RecordDict())
    g, names = per_example_loop(cfg["model"], glob, fmnist, update.sample_indices)
    clipped = g * torch.clamp(0.1 / g.norm(dim=1), max=1.0)[:, None]
    residual = step_of(update, glob, names, 0.1) - clipped.sum(0) / 20
    assert abs(float(residual.std()) / 0.01 - 1) < 0.03
    assert abs(float(residual.mean())) < 4 * 0.01 / math.sqrt(residual.numel())
    assert update.metrics["dp-sigma"] == 2.0


def test_dp_sgd_batches_are_poisson_with_rate_b_over_n(fmnist):
    # n = 1000, B = 10 → q = 0.01: sizes ~ Binomial(1000, 0.01) (mean 10, variance 9.9); 4,000 steps give the mean
    # to ±0.05 (1 SE) and the variance to ±2.2 % (1 SE); each example is used in a fraction q of the steps
    _, spec, _, part = setup(fmnist, **{"defense": "dp-sgd", "mode": "fedavg", "local-steps": 4000,
                                        "batch-size": 10, "defense-dp-noise-multiplier": 50.0})
    assert len(part) == 1000
    tc = spec.task.train_config(server_round=1)
    state = RecordDict()
    batches = DEFENSES["dp-sgd"].batches(part, tc, np.random.default_rng(3), spec.params, state)
    sizes = np.array([len(b) for b in batches])
    assert len(batches) == 4000 and abs(sizes.mean() - 10) < 0.2
    assert abs(sizes.var() / 9.9 - 1) < 0.09
    assert all(np.isin(b, part).all() and len(np.unique(b)) == len(b) for b in batches)
    counts = np.bincount(np.concatenate(batches), minlength=int(part.max()) + 1)[part]
    assert abs(counts.mean() / 40 - 1) < 0.01 and counts.var() / 40 < 1.15  # ~Binomial(4000, 0.01) each
    # B = 1: a fraction (1 − 1/n)^n ≈ 0.368 of the batches is empty (1 SE over 4,000 steps: 0.0076)
    _, spec1, _, _ = setup(fmnist, **{"defense": "dp-sgd", "mode": "fedavg", "local-steps": 4000, "batch-size": 1,
                                      "defense-dp-noise-multiplier": 50.0})
    b1 = DEFENSES["dp-sgd"].batches(part, spec1.task.train_config(server_round=1), np.random.default_rng(4),
                                    spec1.params, RecordDict())
    assert abs(np.mean([len(b) == 0 for b in b1]) - (1 - 1 / 1000) ** 1000) < 0.03


def recompute(metrics, accountant="pld"):
    """ε from the reply's own figures with dp-accounting's accountant (not fl-sim's code)."""
    event = dp_accounting.PoissonSampledDpEvent(metrics["dp-q"], dp_accounting.GaussianDpEvent(metrics["dp-sigma"]))
    acc = (PLDAccountant(value_discretization_interval=dp.DISCRETIZATION) if accountant == "pld"
           else RdpAccountant())
    return acc.compose(event, int(metrics["dp-steps"])).get_epsilon(metrics["dp-delta"])


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_dp_sgd_reports_what_dp_accounting_recomputes_and_spends_exactly_its_target(fmnist, accountant):
    # 3 planned rounds of 5 steps at q = 50/1000; the calibrated σ spends the target at the last planned round,
    # never more; a 4th round is refused before it trains
    over = {"defense": "dp-sgd", "mode": "fedavg", "local-steps": 5, "batch-size": 50, "num-server-rounds": 3,
            "defense-dp-epsilon": 2.0, "defense-dp-accountant": accountant}
    _, spec, glob, part = setup(fmnist, **over)
    state, spent = RecordDict(), []
    for rnd in (1, 2, 3):
        update, _ = one_round(spec, glob, fmnist, part, state, rnd)
        m = update.metrics
        assert set(m) >= {"dp-epsilon", "dp-delta", "dp-sigma", "dp-q", "dp-steps"}
        assert (m["dp-q"], m["dp-steps"], m["dp-delta"]) == (0.05, 5 * rnd, 1e-5)
        assert m["dp-epsilon"] == pytest.approx(recompute(m, accountant), rel=1e-9)
        spent.append(m["dp-epsilon"])
        glob = update.state
    assert spent[0] < spent[1] < spent[2] <= 2.0
    assert spent[2] > 2.0 * 0.99  # calibrated for exactly these 15 steps
    with pytest.raises(dp.PrivacyBudgetExhausted, match="defense-dp-epsilon=2"):
        one_round(spec, glob, fmnist, part, state, 4)
    assert int(state["dp-sgd"]["steps"]) == 15  # the refused round released nothing


def test_dp_sgd_plans_for_num_server_rounds_or_its_own_key(fmnist):
    p = DEFENSES["dp-sgd"].configure(resolve({"defense": "dp-sgd", "num-server-rounds": 7}))
    assert p.rounds == 7
    p = DEFENSES["dp-sgd"].configure(resolve({"defense": "dp-sgd", "num-server-rounds": 7, "defense-dp-rounds": 20}))
    assert p.rounds == 20
    plan = dp_sgd.plan(p, 1000, 50, 5)
    assert (plan.q, plan.round_steps, plan.planned_steps) == (0.05, 5, 100)
    assert dp_sgd.sgd_epsilon(plan.sigma, plan.q, 100, p.delta) <= p.epsilon


def test_a_given_sigma_that_would_exceed_the_target_is_refused_before_training(fmnist):
    _, spec, glob, part = setup(fmnist, **{"defense": "dp-sgd", "batch-size": 8, "defense-dp-noise-multiplier": 0.3,
                                           "defense-dp-epsilon": 1.0})
    state = RecordDict()
    with pytest.raises(dp.PrivacyBudgetExhausted, match="would spend"):
        one_round(spec, glob, fmnist, part, state)
    assert "dp-sgd" not in state


def test_dp_sgd_refuses_batchnorm_models_before_the_run():
    with pytest.raises(ConfigError) as err:
        resolve({"defense": "dp-sgd", "model": "lenet-kl"})
    assert "model='lenet-kl'" in str(err.value) and "BatchNorm" in str(err.value) and "\n" not in str(err.value)


def test_dp_sgd_through_the_pipeline_with_empty_batches(fmnist):
    # B = 1 over n = 1000: some FedSGD rounds draw no example; the release is then noise alone, it still counts
    _, spec, glob, part = setup(fmnist, **{"defense": "dp-sgd", "defense-dp-noise-multiplier": 1.0,
                                           "defense-dp-epsilon": 1e9})
    state, empty = RecordDict(), 0
    for rnd in range(1, 9):
        update, _ = one_round(spec, glob, fmnist, part, state, rnd)
        empty += len(update.sample_indices) == 0
        assert update.metrics["dp-steps"] == rnd and update.metrics["num-examples"] == 1
        assert all(torch.isfinite(v).all() for v in update.state.values())
        if not update.sample_indices:
            assert math.isnan(update.metrics["train-loss"])
    assert 0 < empty < 8


# -- dp-gaussian ---------------------------------------------------------------------------------------------------
def test_dp_gaussian_noise_is_the_analytic_sigma_on_the_clipped_batch_gradient(fmnist):
    # ε = 10, δ = 1e-5, Δ = C = 1 → σ = 0.4999 (Balle & Wang; the classical formula would give 0.4845). On
    # ~13,000 entries × 10 draws the sample std has a relative standard error of ~0.2 %; tolerance 1 % (the two
    # formulas differ by 3 %)
    cfg = resolve({"defense": "dp-gaussian"})
    torch.manual_seed(0)
    model = build_model("lenet-tanh", fmnist.input_shape, fmnist.num_classes)
    x = to_tensor(fmnist.x_train[:2], fmnist.mean, fmnist.std)
    y = torch.as_tensor(fmnist.y_train[:2])
    grads = list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))
    ctx = StepContext(model, [n for n, _ in model.named_parameters()], x, y, F.cross_entropy,
                      DEFENSES["dp-gaussian"].configure(cfg), RecordDict(), torch.Generator().manual_seed(0))
    clipped = dp.clip(grads, 1.0)
    assert float(flat(clipped).norm()) == pytest.approx(min(1.0, float(flat(grads).norm())), rel=1e-5)
    d = torch.cat([flat(DEFENSES["dp-gaussian"].apply(grads, ctx)) - flat(clipped) for _ in range(10)])
    assert abs(float(d.std()) / 0.4999 - 1) < 0.01
    report = DEFENSES["dp-gaussian"].report(ctx.state, ctx.params)
    assert report["dp-releases"] == 10
    assert report["dp-epsilon"] == pytest.approx(dp_accounting.get_epsilon_gaussian(0.49989 / math.sqrt(10), 1e-5),
                                                 rel=1e-3)


# -- local-dp: Flower's LocalDpMod ---------------------------------------------------------------------------------
def test_local_dp_runs_flowers_mod_on_the_round_update(fmnist, monkeypatch):
    # LocalDpMod(clipping_norm=1, sensitivity=1, ε=1, δ=1e-5): σ = 4.844805 on every entry (dp.md §4.1). The
    # reply minus the global model minus Flower's FlatClip of the update is the noise: its std on ~13,000 entries
    # has a relative standard error of ~0.6 %; tolerance 3 %
    calls = []
    original = LocalDpMod.__call__

    def spy(self, msg, ctxt, call_next):
        calls.append((self.clipping_norm, self.sensitivity, self.epsilon, self.delta))
        return original(self, msg, ctxt, call_next)

    monkeypatch.setattr(LocalDpMod, "__call__", spy)
    over = {"mode": "fedavg", "local-steps": 3, "batch-size": 4, "lr": 0.5}
    _, plain, glob, part = setup(fmnist, **over)
    raw, _ = one_round(plain, glob, fmnist, part, RecordDict())  # the same batches and steps, no defense
    _, spec, _, _ = setup(fmnist, **over, **{"defense": "local-dp", "defense-dp-clip": 1.0,
                                             "defense-dp-sensitivity": 1.0, "defense-dp-epsilon": 1.0})
    state = RecordDict()
    update, _ = one_round(spec, glob, fmnist, part, state)
    assert calls == [(1.0, 1.0, 1.0, 1e-5)]
    assert update.sample_indices == raw.sample_indices
    keys = list(glob)
    delta = flat([raw.state[k] - glob[k] for k in keys])
    clipped = delta * min(1.0, 1.0 / float(delta.norm()))
    noise = flat([update.state[k] - glob[k] for k in keys]) - clipped
    assert abs(float(noise.std()) / 4.844805 - 1) < 0.03
    m = update.metrics
    assert (m["dp-releases"], m["dp-epsilon-claimed"], m["dp-delta"]) == (1, 1.0, 1e-5)
    assert m["dp-sigma"] == pytest.approx(4.844805, abs=1e-6) and m["dp-epsilon"] == pytest.approx(0.7510, abs=1e-4)
    update2, _ = one_round(spec, glob, fmnist, part, state, 2)
    assert update2.metrics["dp-releases"] == 2 and update2.metrics["dp-epsilon"] > m["dp-epsilon"]


def test_local_dp_clips_with_flowers_flatclip_reproducibly_and_keeps_integer_buffers(fmnist):
    over = {"mode": "fedavg", "local-steps": 3, "batch-size": 4, "lr": 0.5, "model": "lenet-kl"}
    _, plain, glob, part = setup(fmnist, **over)
    raw, _ = one_round(plain, glob, fmnist, part, RecordDict())
    _, spec, _, _ = setup(fmnist, **over, **{"defense": "local-dp", "defense-dp-clip": 0.05,
                                             "defense-dp-noise": 1e-9})
    before = np.random.get_state()[1].copy()
    update, _ = one_round(spec, glob, fmnist, part, RecordDict())
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global generator is left as it was
    floats = [k for k in glob if torch.is_floating_point(glob[k])]
    ints = [k for k in glob if not torch.is_floating_point(glob[k])]
    assert ints, "lenet-kl has BatchNorm's integer counters"
    delta = flat([raw.state[k] - glob[k] for k in floats])
    assert float(delta.norm()) > 0.05  # the update needs clipping at C = 0.05
    sent = flat([update.state[k] - glob[k] for k in floats])
    torch.testing.assert_close(sent, delta * (0.05 / float(delta.norm())), atol=1e-6, rtol=1e-4)
    assert all(torch.equal(update.state[k], raw.state[k]) for k in ints)
    again, _ = one_round(spec, glob, fmnist, part, RecordDict())
    assert all(torch.equal(update.state[k], again.state[k]) for k in glob)


# -- summary.json ----------------------------------------------------------------------------------------------------
def test_summary_privacy_block_keeps_each_clients_last_report():
    def client(pid, eps, steps):
        return {"partition_id": str(pid), "num_examples": 1, "dp_epsilon": eps, "dp_delta": 1e-5, "dp_sigma": 0.9,
                "dp_q": 0.01, "dp_steps": steps}

    records = [{"round": 1, "clients": [client(0, 1.0, 1), client(1, 1.0, 1)]},
               {"round": 2, "clients": [client(1, 1.5, 2)]},
               {"round": 3, "clients": [client(10, 0.5, 1)]}]
    cfg = {"defense": "dp-sgd", "defense-dp-accountant": "pld", "defense-dp-delta": 1e-5}
    block = summarize(records, cfg, 1.0, "completed")["privacy"]
    assert list(block["clients"]) == ["0", "1", "10"]
    assert block["clients"]["0"] == {"epsilon": 1.0, "delta": 1e-5, "sigma": 0.9, "q": 0.01, "steps": 1, "round": 1}
    assert block["clients"]["1"]["epsilon"] == 1.5 and block["clients"]["1"]["round"] == 2
    assert block["max_epsilon"] == 1.5 and block["defense"] == "dp-sgd" and block["accountant"] == "pld"
    assert "privacy" not in summarize([{"round": 1, "clients": [{"partition_id": "0"}]}], cfg, 1.0, "completed")


def test_dp_sgd_refuses_a_plan_that_changes_mid_run(fmnist):
    # σ is calibrated for the planned rounds: a client resumed under another num-server-rounds would compose steps
    # of two different σ as if they were one
    over = {"defense": "dp-sgd", "mode": "fedavg", "local-steps": 5, "batch-size": 50, "defense-dp-epsilon": 2.0}
    _, spec, glob, part = setup(fmnist, **over, **{"num-server-rounds": 3})
    state = RecordDict()
    one_round(spec, glob, fmnist, part, state, 1)
    _, longer, _, _ = setup(fmnist, **over, **{"num-server-rounds": 6})
    with pytest.raises(ValueError, match="plan changed after 5 steps"):
        one_round(longer, glob, fmnist, part, state, 2)


def test_the_client_app_imports_neither_dp_accounting_nor_scipy():
    """dp-accounting pulls in SciPy (~1.4 s); every ClientApp process (one per message under Flower's deployment
    engine) and simulated node imports the ClientApp, so the DP defenses import it on first use only."""
    code = ("import sys, clients.client_app; "
            "print(sorted(m for m in ('dp_accounting', 'scipy', 'skimage', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
    # and the accountants still work once a DP defense asks for them
    from clients.defenses.dp import epsilon_spent

    assert epsilon_spent("gaussian", 1.0, 1, 1e-5) > 0
