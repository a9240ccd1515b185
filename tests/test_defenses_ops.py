"""What each defense does to a gradient: pruned fractions, noise scales against their formulas (statistical tests,
fixed seeds, stated tolerances), Soteria's batched Jacobian norms against the per-feature loop, GradDefense's
slicing. The DP calibrations and accountants are tested against published values in ``tests/test_dp*.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import RecordDict

from clients.defenses import DEFENSES, StepContext, dp, graddefense, per_sample_gradients, prune, quantize, soteria
from fl_sim.config import resolve
from fl_sim.task.datasets import to_tensor
from fl_sim.task.models import build_model


def params_of(defense, **overrides):
    """The parameter object of ``defense`` for the run config ``overrides`` (checked as a run would be)."""
    return DEFENSES[defense].configure(resolve({"defense": defense, **overrides}))


def step_context(fmnist, model_name="lenet-tanh", batch=2, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model(model_name, fmnist.input_shape, fmnist.num_classes)
    x = to_tensor(fmnist.x_train[:batch], fmnist.mean, fmnist.std)
    y = torch.as_tensor(fmnist.y_train[:batch])
    grads = list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))
    cfg = resolve({"model": model_name, **overrides})
    params = DEFENSES[cfg["defense"]].configure(cfg)
    ctx = StepContext(model, [n for n, _ in model.named_parameters()], x, y, F.cross_entropy, params, RecordDict(),
                      torch.Generator().manual_seed(seed), data=fmnist, partition=np.arange(500))
    return grads, ctx


@pytest.mark.parametrize("rate", [30.0, 70.0, 90.0])
def test_prune_zeroes_the_expected_fraction_per_tensor(rate):
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=g) for s in [(12, 1, 5, 5), (12,), (10, 588), (1000,)]]
    out = prune.prune(grads, rate)
    for a, b in zip(grads, out):
        n = a.numel()
        zeros = int((b == 0).sum())
        assert zeros == math.floor(rate / 100 * (n - 1)) + 1 or zeros == math.ceil(rate / 100 * (n - 1))
        kept = b != 0
        torch.testing.assert_close(b[kept], a[kept])  # survivors unchanged
        assert a[~kept].abs().max() <= a[kept].abs().min()  # the smallest magnitudes went
        assert np.isclose(float(prune.percentile(a.abs(), rate)), np.percentile(a.abs().numpy(), rate), rtol=1e-5)


def test_laplace_noise_scale_and_l1_clip(fmnist):
    # b = Δ/ε = 0.5 (C = 0.5, ε = 1): E|X| = b, Var X = 2b²; relative tolerance 1.5 % on 134,260 draws.
    grads, ctx = step_context(fmnist, **{"defense": "dp-laplace", "defense-dp-clip": 0.5,
                                         "defense-dp-epsilon": 1.0})
    clipped = dp.clip(grads, 0.5, p=1)
    assert float(sum(c.abs().sum() for c in clipped)) == pytest.approx(0.5, rel=1e-4)
    diffs = []
    for step in range(10):
        ctx.generator.manual_seed(step)
        out = DEFENSES["dp-laplace"].apply(grads, ctx)
        diffs.append(torch.cat([(o - c).flatten() for o, c in zip(out, clipped)]))
    d = torch.cat(diffs).double()
    assert abs(float(d.abs().mean()) / 0.5 - 1) < 0.015
    assert abs(float(d.var()) / (2 * 0.25) - 1) < 0.03


def test_direct_noise_scale_overrides_epsilon():
    assert dp.noise_scale("gaussian", params_of("dp-gaussian", **{"defense-dp-noise": 0.03})) == 0.03
    assert dp.noise_scale("laplace", params_of("dp-laplace", **{"defense-dp-epsilon": 4.0,
                                                                "defense-dp-sensitivity": 2.0})) == 0.5


@pytest.mark.parametrize("model_name,batch", [("lenet-tanh", 3), ("lenet", 1), ("lenet-kl", 2)])
def test_soteria_batched_norms_equal_the_per_feature_loop(fmnist, model_name, batch):
    torch.manual_seed(0)
    model = build_model(model_name, fmnist.input_shape, fmnist.num_classes)
    x = to_tensor(fmnist.x_train[10 : 10 + batch], fmnist.mean, fmnist.std)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slow, r2 = soteria.jacobian_norms_loop(model, x)
    for method in ("auto", "batched"):
        fast, r1 = soteria.jacobian_norms(model, x, chunk=100, method=method)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r1, r2)
        for k, v in model.state_dict().items():  # BatchNorm running statistics untouched
            torch.testing.assert_close(v, before[k])
    # the LeNets take the windowed forward-mode path; lenet-kl (train-mode BatchNorm couples samples) cannot
    assert (soteria.jacobian_norms_windowed(model, x) is None) == (model_name == "lenet-kl")


class _Chain(torch.nn.Module):
    """A conv chain unlike the LeNets: in-place ReLU/LeakyReLU/eval BatchNorm/Sigmoid, odd and non-square input, last conv of
    stride 2 (the local-matrix path), input channels 3; ``detour`` adds an op between the chain and ``fc``."""

    def __init__(self, detour: bool = False):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU(inplace=True),
            torch.nn.Sequential(torch.nn.Conv2d(4, 5, 3, padding=1), torch.nn.LeakyReLU(0.1)),
            torch.nn.BatchNorm2d(5), torch.nn.Conv2d(5, 6, 3, stride=2), torch.nn.Sigmoid())
        self.features[3].eval()
        with torch.no_grad():  # non-trivial running statistics
            self.features[3].running_mean.uniform_(-0.5, 0.5)
            self.features[3].running_var.uniform_(0.5, 2.0)
        self.fc = torch.nn.Linear(6 * 3 * 2, 4)
        self.detour = detour

    def forward(self, x):
        h = self.features(x).flatten(1)
        return self.fc(2 * h if self.detour else h)


def test_soteria_windowed_norms_on_other_chains_equal_the_loop():
    torch.manual_seed(1)
    model = _Chain()
    x = torch.randn(2, 3, 13, 11)  # 13 and 11 are not multiples of the total stride 4: partial cells
    assert soteria.jacobian_norms_windowed(model, x) is None  # 36 features: the batched backward is cheaper
    out = soteria.jacobian_norms_windowed(model, x, force=True)
    assert out is not None
    slow, r = soteria.jacobian_norms_loop(model, x)
    torch.testing.assert_close(out[0], slow, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[1], r)
    # the local matrices are cached while the weights stay equal; a changed weight is picked up
    with torch.no_grad():
        model.features[2][0].weight.mul_(1.5)
    slow2, _ = soteria.jacobian_norms_loop(model, x)
    assert not torch.allclose(slow2, slow)
    torch.testing.assert_close(soteria.jacobian_norms(model, x, method="windowed")[0], slow2, rtol=1e-5, atol=1e-7)


def test_soteria_windowed_path_refuses_what_it_cannot_check(fmnist):
    torch.manual_seed(2)
    x = torch.randn(1, 3, 13, 11)
    detour = _Chain(detour=True)  # fc's input is not the chain's output: the forward check refuses it
    assert soteria.jacobian_norms_windowed(detour, x, force=True) is None
    with pytest.raises(ValueError, match="windowed"):
        soteria.jacobian_norms(detour, x, method="windowed")
    torch.testing.assert_close(soteria.jacobian_norms(detour, x)[0], soteria.jacobian_norms_loop(detour, x)[0],
                               rtol=1e-5, atol=1e-7)
    inplace = _Chain()
    inplace.features[5] = torch.nn.Hardtanh(inplace=True)  # overwrites the input its derivative would be taken at
    assert soteria.jacobian_norms_windowed(inplace, x, force=True) is None
    pooled = build_model("cnn", fmnist.input_shape, fmnist.num_classes)  # max-pooling: not a chain it handles
    assert soteria.jacobian_norms_windowed(pooled, torch.randn(1, *fmnist.input_shape), force=True) is None


def test_soteria_mask_from_the_fast_path_is_the_loops_mask(fmnist):
    torch.manual_seed(3)
    model = build_model("lenet-tanh", fmnist.input_shape, fmnist.num_classes)
    for i in range(5):
        x = to_tensor(fmnist.x_train[20 + i : 21 + i], fmnist.mean, fmnist.std)
        fast = soteria.feature_mask(soteria.scores(*soteria.jacobian_norms(model, x), 0.1), 70.0)
        slow = soteria.feature_mask(soteria.scores(*soteria.jacobian_norms_loop(model, x), 0.1), 70.0)
        assert torch.equal(fast, slow)


def test_soteria_masks_only_fc_weight_columns(fmnist):
    grads, ctx = step_context(fmnist, **{"defense": "soteria", "defense-soteria-rate": 70.0})
    out = DEFENSES["soteria"].apply(grads, ctx)
    i = soteria.defended_index(ctx.model)
    for k, (a, b) in enumerate(zip(grads, out)):
        if k != i:
            assert torch.equal(a, b)
    cols = (out[i] == 0).all(dim=0)
    d = out[i].shape[1]
    assert abs(int(cols.sum()) - 0.7 * d) <= 2 and ctx.info["soteria-pruned"] == pytest.approx(0.7, abs=0.005)
    torch.testing.assert_close(out[i][:, ~cols], grads[i][:, ~cols])
    # the pruned features are those with the smallest score ‖∂r/∂x‖ / (|r| + ε)
    norms, r = soteria.jacobian_norms(ctx.model, ctx.x)
    s = soteria.scores(norms, r, 0.1)
    assert s[cols].max() <= s[~cols].min()


def test_slices_balance_sensitivity_and_never_collapse():
    sizes, sens = [300, 12, 3600, 12, 3600, 12, 5880, 10], [1, .1, 1, .1, 1, .1, 3, 2]
    b = graddefense.slice_bounds(sizes, sens, 10)
    assert b[0] == 0 and b[-1] == sum(sizes) and np.all(np.diff(b) >= 1)
    density = np.concatenate([np.full(n, s / n) for n, s in zip(sizes, sens)])
    per_slice = [density[b[k] : b[k + 1]].sum() for k in range(10)]
    heaviest_entry = density.max()
    assert max(per_slice) - min(per_slice) <= 2 * heaviest_entry + 1e-9
    # the public code's collapse case: a tiny, very sensitive tensor
    b2 = graddefense.slice_bounds([100, 10, 100, 10], [0.1, 5, 0.1, 0.1], 10)
    assert np.all(np.diff(b2) >= 1) and b2[-1] == 220


def test_graddefense_perturbs_m_of_s_slices_with_sigma(fmnist):
    grads, ctx = step_context(fmnist, **{"defense": "graddefense", "defense-gd-sigma": 0.05})
    out = DEFENSES["graddefense"].apply(grads, ctx)
    diff = torch.cat([(o - g).flatten() for o, g in zip(out, grads)])
    sens = [float(s) for s in ctx.state["graddefense"]["sensitivity"]]
    assert len(sens) == len(grads) and all(s >= 0 for s in sens)
    b = graddefense.slice_bounds([g.numel() for g in grads], sens, 10)
    touched = [bool((diff[b[k] : b[k + 1]] != 0).any()) for k in range(10)]
    assert sum(touched) == 5
    noisy = torch.cat([diff[b[k] : b[k + 1]] for k in range(10) if touched[k]])
    assert abs(float(noisy.std()) / 0.05 - 1) < 5 / math.sqrt(noisy.numel()) + 0.01
    for k in range(10):
        if not touched[k]:
            assert torch.count_nonzero(diff[b[k] : b[k + 1]]) == 0


def test_graddefense_sensitivity_is_cached_and_refreshed(fmnist):
    grads, ctx = step_context(fmnist, **{"defense": "graddefense", "defense-gd-sensitivity-every": 5})
    ctx.server_round = 1
    DEFENSES["graddefense"].apply(grads, ctx)
    first = list(ctx.state["graddefense"]["sensitivity"])
    ctx.state["graddefense"]["sensitivity"] = [7.0] * len(grads)
    ctx.server_round = 5
    DEFENSES["graddefense"].apply(grads, ctx)
    assert list(ctx.state["graddefense"]["sensitivity"]) == [7.0] * len(grads)  # cached
    ctx.server_round = 6
    DEFENSES["graddefense"].apply(grads, ctx)
    assert list(ctx.state["graddefense"]["sensitivity"]) == pytest.approx(first)  # recomputed


def test_graddefense_clipping_bounds_each_sample_slice(fmnist):
    grads, ctx = step_context(fmnist, batch=4, **{"defense": "graddefense", "defense-gd-clip": True,
                                                   "defense-gd-sigma": 0.0, "defense-gd-clip-bound": 1e-3})
    ps = per_sample_gradients(ctx)
    for a, g in zip(ps, grads):  # the per-sample gradients average to the batch gradient
        torch.testing.assert_close(a.mean(0), g, rtol=1e-4, atol=1e-6)
    out = DEFENSES["graddefense"].apply(grads, ctx)
    diff = torch.cat([(o - g).flatten() for o, g in zip(out, grads)])
    flat = torch.cat([o.flatten() for o in out])
    sens = [float(s) for s in ctx.state["graddefense"]["sensitivity"]]
    b = graddefense.slice_bounds([g.numel() for g in grads], sens, 10)
    changed = [k for k in range(10) if (diff[b[k] : b[k + 1]] != 0).any()]
    assert 1 <= len(changed) <= 5
    for k in changed:  # mean of per-sample slices each clipped to 1e-3
        assert float(flat[b[k] : b[k + 1]].norm()) <= 1e-3 * (1 + 1e-4)


def test_quantize_formats():
    g = [torch.linspace(-1, 1, 1001)]
    assert torch.equal(quantize.quantize(g, "float16")[0], g[0].half().float())
    q = quantize.quantize(g, "int8")[0]
    assert len(torch.unique(q)) <= 255 and float((q - g[0]).abs().max()) <= 0.5 / 127 + 1e-7
    with pytest.raises(ValueError):
        quantize.quantize(g, "int4")


def test_every_defense_keeps_shapes_and_none_is_identity(fmnist):
    for name, defense in DEFENSES.items():
        model = "lenet-kl" if defense.models else "lenet-tanh"
        grads, ctx = step_context(fmnist, model_name=model, **{"defense": name})
        out = defense.apply(grads, ctx)
        assert [o.shape for o in out] == [g.shape for g in grads], name
        if name in ("none", "fedkl"):
            assert all(o is g for o, g in zip(out, grads))


def test_per_sample_gradients_with_batchnorm_leave_buffers_alone(fmnist):
    grads, ctx = step_context(fmnist, model_name="lenet-kl", batch=3)
    before = {k: v.clone() for k, v in ctx.model.named_buffers()}
    ps = per_sample_gradients(ctx)
    for k, v in ctx.model.named_buffers():  # running statistics untouched, tracking restored
        assert torch.equal(v, before[k]), k
    assert all(m.track_running_stats for m in ctx.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert [p.shape[1:] for p in ps] == [g.shape for g in grads] and all(p.shape[0] == 3 for p in ps)
    # sample 0's row is the gradient of sample 0 run alone
    x0, y0 = ctx.x[:1], ctx.y[:1]
    one = torch.autograd.grad(F.cross_entropy(ctx.model(x0), y0), list(ctx.model.parameters()))
    for p, g in zip(ps, one):
        torch.testing.assert_close(p[0], g, rtol=1e-4, atol=1e-6)
