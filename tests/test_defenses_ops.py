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
    # the pruned features are those with the smallest score Σ_n ‖∂r_{n,i}/∂x_n‖ / (|r_{n,i}| + ε), computed here
    # from the full Jacobian of the representation (the FC layer's input), not with the defense's own code
    model = ctx.model
    with torch.no_grad():
        r = model.features(ctx.x).flatten(1)  # (B, d)
    jac = torch.autograd.functional.jacobian(lambda inp: model.features(inp).flatten(1), ctx.x, vectorize=True)
    b = ctx.x.shape[0]
    per_sample = torch.stack([jac[n, :, n].flatten(1).norm(dim=1) for n in range(b)])  # (B, d) ‖∂r_{n,i}/∂x_n‖
    score = (per_sample / (r.abs() + 0.1)).sum(dim=0)
    assert d == r.shape[1] and float(score[cols].max()) <= float(score[~cols].min()) * (1 + 1e-5)


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


def _root_batch(fmnist, per_class=2):
    idx = graddefense.root_indices(fmnist.y_train, np.arange(500), per_class)
    return to_tensor(fmnist.x_train[idx], fmnist.mean, fmnist.std), torch.as_tensor(fmnist.y_train[idx])


def test_public_sensitivity_zeroes_the_classifier_and_the_jacobian_one_does_not(fmnist):
    """The public code's ones-vector VJP cancels for the softmax layer (Σ_i (p_i − y_i) = 0): the whole FC layer
    weighs nothing and sits in the last slice. The Jacobian estimate gives it a share of the same order as the
    convolutions' (measured ~38 % on lenet-tanh; asserted > 10 %), so it spreads over several slices."""
    torch.manual_seed(0)
    model = build_model("lenet-tanh", fmnist.input_shape, fmnist.num_classes)
    x, y = _root_batch(fmnist)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    fc = [names.index("fc.weight"), names.index("fc.bias")]
    public = graddefense.layer_sensitivity(model, x, y, "public")
    jac = graddefense.layer_sensitivity(model, x, y, "jacobian", 8, torch.Generator().manual_seed(0))
    assert max(public[i] for i in fc) < 1e-6 * max(public)  # ~1e-9: rounding, not signal
    assert min(public[i] for i in range(len(names)) if i not in fc) > 0
    assert jac[fc[0]] / sum(jac) > 0.1 and jac[fc[1]] > 0
    fc_start = sum(sizes[: fc[0]])
    for sens, expect_many in ((public, False), (jac, True)):
        b = graddefense.slice_bounds(sizes, sens, 10)
        holding_fc = [k for k in range(10) if b[k + 1] > fc_start]
        assert (len(holding_fc) >= 2) is expect_many, holding_fc
        assert holding_fc[-1] == 9


def _exact_jacobians(model, x, y):
    """Brute force: the full Jacobian ``∂G_l/∂x`` of every parameter gradient, by torch.autograd.functional."""
    params = list(model.parameters())

    def grads_of(inp):
        return tuple(torch.autograd.grad(F.cross_entropy(model(inp), y), params, create_graph=True))

    jac = torch.autograd.functional.jacobian(grads_of, x)  # per tensor: (*G_l.shape, *x.shape)
    return [j.reshape(p.numel(), x.shape[0], -1) for j, p in zip(jac, params)]  # (n_l, B, D)


def test_jacobian_sensitivity_agrees_with_the_brute_force_frobenius_norm():
    """On a model small enough for the full Jacobian: each sample's probe estimate of ``‖J_b‖_F²`` lies within 4
    standard deviations of the exact value, the deviation being the Rademacher-Hutchinson one
    ``sqrt(2(‖A‖_F² − Σ A_ii²)/K)``, ``A = J_b J_bᵀ`` (Avron & Toledo 2011); the per-layer sensitivity is within
    the docstring's worst-case 3 standard errors ``3/sqrt(2K)`` of the exact ``mean_b ‖J_b‖_F``; and the public
    setting equals the exact ``mean_b ‖1ᵀ J_b‖``."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, stride=2), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 3 * 3, 3))
    x = torch.randn(4, 1, 7, 7)
    y = torch.tensor([0, 2, 1, 2])
    exact = _exact_jacobians(model, x, y)
    k = 64
    jac = graddefense.layer_sensitivity(model, x, y, "jacobian", k, torch.Generator().manual_seed(1))
    public = graddefense.layer_sensitivity(model, x, y, "public")
    xg = x.clone().requires_grad_(True)
    grads = torch.autograd.grad(F.cross_entropy(model(xg), y), list(model.parameters()), create_graph=True)
    ones = [float(j.sum(dim=0).norm(dim=1).mean()) for j in exact]  # ‖Σ_i ∂G_l[i]/∂x_b‖ = ‖1ᵀ J_b‖
    torch.testing.assert_close(torch.tensor(public), torch.tensor(ones), rtol=1e-4, atol=1e-6 * max(ones))
    for layer, (j, g) in enumerate(zip(exact, grads)):
        fro = j.pow(2).sum(dim=(0, 2))  # (B,) exact ‖J_b‖_F²
        assert float(fro.min()) > 0
        a = torch.einsum("ibd,jbd->bij", j, j)  # A_b = J_b J_bᵀ, (B, n_l, n_l)
        sd = torch.sqrt(2 * (a.pow(2).sum(dim=(1, 2)) - torch.diagonal(a, dim1=1, dim2=2).pow(2).sum(1)) / k)
        est = graddefense.probe_norms(g, xg, k, torch.Generator().manual_seed(7 + layer)).pow(2)
        assert bool(((est - fro).abs() <= 4 * sd + 1e-12).all()), (layer, est, fro, sd)
        s_exact = float(fro.sqrt().mean())
        assert abs(jac[layer] / s_exact - 1) < 3 / math.sqrt(2 * k), (layer, jac[layer], s_exact)
    # the classifier layer (weight, bias): ~1e-8 of the convolution's with the ones vector, ~0.1-1x with the probes
    assert max(public[2:]) < 1e-6 * max(public[:2]) and min(jac[2:]) > 0.05 * max(jac[:2])


def test_public_sensitivity_sends_a_clean_classifier_in_half_the_uploads(fmnist):
    """With the public sensitivities the FC layer is one slice's tail, unperturbed with probability 1 − M/S = 1/2;
    with the Jacobian's it spans ~4 slices and is clean with probability C(6,5)/C(10,5) = 2.4 %. Over 40 steps
    (binomial): public 20 ± 3.2 expected (asserted 10..30), jacobian ~1 (asserted <= 5)."""
    counts = {}
    for setting in ("public", "jacobian"):
        grads, ctx = step_context(fmnist, **{"defense": "graddefense", "defense-gd-sensitivity": setting})
        i = ctx.names.index("fc.weight")
        clean = 0
        for step in range(40):
            ctx.generator.manual_seed(100 + step)
            out = DEFENSES["graddefense"].apply(grads, ctx)
            clean += int(torch.equal(out[i], grads[i]))
        counts[setting] = clean
    assert 10 <= counts["public"] <= 30 and counts["jacobian"] <= 5, counts


def test_sensitivity_setting_is_checked():
    from fl_sim.config import ConfigError

    with pytest.raises(ConfigError, match="defense-gd-sensitivity='hessian'"):
        resolve({"defense": "graddefense", "defense-gd-sensitivity": "hessian"})
    with pytest.raises(ConfigError, match="defense-gd-probes=0"):
        resolve({"defense": "graddefense", "defense-gd-probes": 0})
    assert params_of("graddefense").sensitivity == "public"  # the published behaviour stays the default
