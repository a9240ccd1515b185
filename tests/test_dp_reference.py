"""The DP defenses' calibrations and accountants against numbers fl-sim did not compute: values asserted in other
libraries' own tests, published tables and closed forms. Each test names its source; the collected values and how
they were read are in ``/work/shared/reference/dp.md`` (§ numbers below refer to it).

Nothing here runs a model: these are the formulas behind ``dp-gaussian``, ``dp-laplace``, ``dp-sgd`` and
``local-dp``, called the way the defenses call them.
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from clients.defenses import DEFENSES, dp, dp_sgd, local_dp
from fl_sim.config import resolve


def params_of(defense, **overrides):
    return DEFENSES[defense].configure(resolve({"defense": defense, **overrides}))


# -- the Gaussian mechanism: analytic against classical calibration ----------------------------------------------
# dp.md §1: σ for Δ = 1 from Balle & Wang's Thm. 8 (ICML'18), solved independently with scipy's brentq over
# σ ∈ [1e-3, 1e4] and with dp-accounting's get_sigma_gaussian (they agree to 4 d.p.); classical = Dwork & Roth
# Thm. A.1. For ε = 8, 10, 20 the classical σ is *below* the analytic one (the classical claim fails there).
ANALYTIC_TABLE = [  # (ε, δ, σ classical, σ analytic)
    (0.1, 1e-5, 48.4481, 30.7496), (0.1, 1e-6, 52.9880, 36.3047), (0.5, 1e-5, 9.6896, 7.0318),
    (0.5, 1e-6, 10.5976, 8.0576), (1.0, 1e-5, 4.8448, 3.7306), (1.0, 1e-6, 5.2988, 4.2247),
    (2.0, 1e-5, 2.4224, 1.9938), (4.0, 1e-5, 1.2112, 1.0812), (8.0, 1e-5, 0.6056, 0.6002),
    (8.0, 1e-2, 0.3884, 0.4084), (10.0, 1e-5, 0.4845, 0.4999), (20.0, 1e-5, 0.2422, 0.2900),
]


@pytest.mark.parametrize("eps,delta,classical,analytic", ANALYTIC_TABLE)
def test_dp_gaussian_sigma_is_the_analytic_gaussian_mechanism(eps, delta, classical, analytic):
    p = params_of("dp-gaussian", **{"defense-dp-epsilon": eps, "defense-dp-delta": delta})
    assert dp.noise_scale("gaussian", p) == pytest.approx(analytic, abs=6e-5)
    assert dp.classical_gaussian_sigma(1.0, eps, delta) == pytest.approx(classical, abs=6e-5)
    # the analytic σ is exactly (ε, δ): one release at that σ spends ε
    assert dp.epsilon_spent("gaussian", dp.noise_scale("gaussian", p), 1, delta) == pytest.approx(eps, rel=1e-6)
    # and scales with the sensitivity
    p2 = params_of("dp-gaussian", **{"defense-dp-epsilon": eps, "defense-dp-delta": delta,
                                     "defense-dp-sensitivity": 2.0})
    assert dp.noise_scale("gaussian", p2) == pytest.approx(2 * analytic, abs=1.2e-4)


def test_the_classical_sigma_does_not_give_the_epsilon_it_claims_at_large_epsilon():
    # dp.md §1: at ε = 10, δ = 1e-5 the classical σ = 0.4845 is only (10.39, 1e-5)-DP (its true δ at ε = 10 is
    # 2.27e-5), which is what Flower's LocalDpMod claims; at ε = 1 it is conservative (true δ 4.11e-8)
    sigma = dp.classical_gaussian_sigma(1.0, 10.0, 1e-5)
    assert dp.epsilon_spent("gaussian", sigma, 1, 1e-5) > 10.3
    assert dp.epsilon_spent("gaussian", sigma, 1, 2.3e-5) == pytest.approx(10.0, abs=0.01)
    assert dp.epsilon_spent("gaussian", dp.classical_gaussian_sigma(1.0, 1.0, 1e-5), 1, 4.11e-8) == pytest.approx(
        1.0, abs=0.01)


@pytest.mark.parametrize("eps,delta,l_inf,java_variance", [
    (math.log(3), 1e-5, 1.0, 11.735977), (2 * math.log(3), 1e-5, 1.0, 3.3634987),
    (math.log(3), 0.01, 1.0, 3.0625), (math.log(3), 1e-5, 0.5, 2.9339943)])
def test_gaussian_variance_against_googles_differential_privacy_library(eps, delta, l_inf, java_variance):
    # google/differential-privacy, GaussianNoiseTest.java (dp.md §1, A3): expected variances for L0 = 1 (Δ₂ = L∞).
    # Its getSigma bisects to relative accuracy 1e-3 and returns the upper end ("to err on the safe side"), so the
    # tight variance is at most the Java value and within 2·1e-3 (relative, σ²) below it.
    var = dp.gaussian_sigma(l_inf, eps, delta) ** 2
    assert java_variance * (1 - 2e-3) <= var <= java_variance


# -- composition of the Gaussian mechanism (dp-gaussian, local-dp) ------------------------------------------------
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("releases", [1, 3, 10])
def test_exact_gaussian_composition_is_what_dp_accountings_pld_accountant_gives(sigma, releases):
    # dp-accounting's own test_get_epsilon_gaussian_pld asserts get_epsilon_gaussian == PLDAccountant for one
    # release (σ ∈ {0.5, 1, 3}); here R releases (the composition rule used by the "pld" accountant). The PLD
    # estimate is pessimistic: the exact value lies at or just below it.
    acc = PLDAccountant(value_discretization_interval=1e-3).compose(dp_accounting.GaussianDpEvent(sigma), releases)
    for delta in (1e-1, 1e-5):
        pld = acc.get_epsilon(delta)
        assert pld - 5e-3 <= dp.epsilon_spent("gaussian", sigma, releases, delta) <= pld + 1e-9


def test_gaussian_composition_published_values():
    # dp-accounting pld_privacy_accountant_test::test_gaussian_basic: 3 × Gaussian(σ = √3) → δ(ε = 1) = 0.126936
    # (±1e-3): so ε at δ = 0.126936 ∓ 1e-3 brackets 1
    assert (dp.epsilon_spent("gaussian", math.sqrt(3), 3, 0.126936 + 1e-3) <= 1.0
            <= dp.epsilon_spent("gaussian", math.sqrt(3), 3, 0.126936 - 1e-3))
    # dp.md §1: σ = 1, δ = 1e-5 → 4.377178 (analytic = PLD), 4.728507 (RDP, default orders)
    assert dp.epsilon_spent("gaussian", 1.0, 1, 1e-5) == pytest.approx(4.377178, abs=1e-6)
    assert dp.epsilon_spent("gaussian", 1.0, 1, 1e-5, "rdp") == pytest.approx(4.728507, abs=1e-6)


def test_flowers_local_dp_mod_sigma_and_what_it_really_spends():
    # dp.md §4.1 (F1, flwr 1.41/1.42 localdp_mod.py): LocalDpMod(1, 1, 1, 1e-5) adds σ = 4.844805; that σ alone is
    # (0.7510, 1e-5)-DP; over R rounds (GaussianDpEvent(4.8448) composed R times, δ = 1e-5): R = 10 → 2.688 (PLD)
    # / 2.915 (RDP), R = 100 → 10.394 / 11.146 (basic composition would say 10 / 100).
    p = params_of("local-dp", **{"defense-dp-clip": 1.0, "defense-dp-sensitivity": 1.0, "defense-dp-epsilon": 1.0})
    mod = local_dp.mod_for(p)
    assert (mod.clipping_norm, mod.sensitivity, mod.epsilon, mod.delta) == (1.0, 1.0, 1.0, 1e-5)
    assert local_dp.noise_std(p) == pytest.approx(4.844805, abs=1e-6)
    z = local_dp.noise_std(p) / 1.0
    assert dp.epsilon_spent("gaussian", z, 1, 1e-5) == pytest.approx(0.7510, abs=1e-4)
    assert dp.epsilon_spent("gaussian", z, 10, 1e-5) == pytest.approx(2.688, abs=1e-3)
    assert dp.epsilon_spent("gaussian", z, 100, 1e-5) == pytest.approx(10.394, abs=1e-3)
    assert dp.epsilon_spent("gaussian", z, 10, 1e-5, "rdp") == pytest.approx(2.915, abs=1e-3)
    assert dp.epsilon_spent("gaussian", z, 100, 1e-5, "rdp") == pytest.approx(11.146, abs=1e-3)
    # a σ given directly reaches the mod as the ε its own formula turns into that σ
    p = params_of("local-dp", **{"defense-dp-noise": 0.25})
    assert local_dp.noise_std(p) == pytest.approx(0.25, rel=1e-12)


# -- Laplace (dp-laplace) ------------------------------------------------------------------------------------------
def test_laplace_accounting():
    # closed form for one Lap(b = 1), Δ₁ = 1 (dp.md §3): δ(ε) = 1 − e^{(ε − 1)/2}, so ε(δ) = 1 + 2 ln(1 − δ);
    # dp.md: δ(ε = 0.5) = 0.2211992 (matches dp-accounting's PLD to 1e-13)
    for delta in (1e-5, 1e-2, 0.2211992):
        assert dp.epsilon_spent("laplace", 1.0, 1, delta) == pytest.approx(1 + 2 * math.log(1 - delta), abs=2e-3)
    # dp-accounting pld_privacy_accountant_test::test_laplace_basic: Laplace releases compose basically (ε = Σ Δ/b)
    # at δ = 1e-14; here 3 × Lap(1) → 3 (the PLD value itself, below the basic-composition cap)
    acc = PLDAccountant(value_discretization_interval=dp.DISCRETIZATION)
    assert acc.compose(dp_accounting.LaplaceDpEvent(1.0), 3).get_epsilon(1e-14) == pytest.approx(3.0, abs=1e-3)
    assert dp.epsilon_spent("laplace", 1.0, 3, 1e-14) == pytest.approx(3.0, abs=1e-3)
    # dp.md §3 [PLD]: 10 × Lap(1) at δ = 1e-5 → 9.9900 (RDP 9.9903); 100 × → 68.253 (far below basic 100)
    assert dp.epsilon_spent("laplace", 1.0, 10, 1e-5) == pytest.approx(9.9900, abs=1e-3)
    assert dp.epsilon_spent("laplace", 1.0, 10, 1e-5, "rdp") == pytest.approx(9.9903, abs=1e-3)
    assert dp.epsilon_spent("laplace", 1.0, 100, 1e-5) == pytest.approx(68.253, abs=2e-2)
    # fl-sim builds the one-release PLD once per multiplier; the ε is dp-accounting's PLDAccountant's, bit for bit
    for m, n in ((0.1, 1), (0.1, 40), (1.0, 3), (1.0, 100), (2.5, 17)):
        ref = PLDAccountant(value_discretization_interval=dp.DISCRETIZATION).compose(
            dp_accounting.LaplaceDpEvent(m), n).get_epsilon(1e-5)
        assert dp.epsilon_spent.__wrapped__("laplace", m, n, 1e-5) == min(ref, n / m)
    # the b the defense uses: Δ/ε, here Δ = 2, ε = 4
    assert dp.noise_scale("laplace", params_of("dp-laplace", **{"defense-dp-epsilon": 4.0,
                                                                "defense-dp-sensitivity": 2.0})) == 0.5


# -- DP-SGD (dp-sgd) -----------------------------------------------------------------------------------------------
def test_dp_sgd_budgets_asserted_in_opacus_and_tf_privacy_tests():
    e = dp_sgd.sgd_epsilon
    # TF Privacy compute_dp_sgd_privacy_test (T1): Test0 N = 60000, B = 150, σ = 1.3, 15 epochs (6000 steps),
    # δ = 1e-5 → 0.7242234026109595; Test1 N = 1e5, B = 100, σ = 1.0, 30 epochs, δ = 1e-7 → 1.4154988495444842 (RDP)
    assert e(1.3, 150 / 60000, 6000, 1e-5, "rdp") == pytest.approx(0.7242234026109595, rel=1e-9)
    assert e(1.0, 100 / 100000, 30000, 1e-7, "rdp") == pytest.approx(1.4154988495444842, rel=1e-9)
    # TF Privacy test_compute_dp_sgd_example_privacy: 1.2 epochs at q = 0.01 (120 steps), σ = 0.7, δ = 1e-5,
    # Poisson: RDP 3.2392676, PLD 2.4612381
    assert e(0.7, 0.01, 120, 1e-5, "rdp") == pytest.approx(3.2392676, abs=1e-6)
    assert e(0.7, 0.01, 120, 1e-5, "pld", 1e-4) == pytest.approx(2.4612381, abs=1e-6)
    # Opacus accountants_test (O1): q = 0.04, σ = 1.5, 90 epochs (2250 steps), δ = 1e-5: RDP 7.32911117143 (its
    # orders 1.1…10.9, 12…63; dp-accounting's default orders add 11 and 128…1024, dp.md §2.3: 7.3293);
    # PRV 6.777395712150674 (eps_error 0.01, an upper bound: the tight PLD is below it and within 0.02)
    assert e(1.5, 0.04, 2250, 1e-5, "rdp") == pytest.approx(7.32911117143, abs=5e-4)
    pld = e(1.5, 0.04, 2250, 1e-5, "pld", 1e-4)
    assert 6.777395712150674 - 0.02 <= pld <= 6.777395712150674
    # dp-accounting pld_privacy_accountant_test::test_poisson_subsampled_gaussian: q = 0.2, σ = 0.5, 3 steps →
    # δ(ε = 1) = 0.15594 (±1e-3)
    assert e(0.5, 0.2, 3, 0.15594 + 1e-3, "pld", 1e-4) <= 1.0 <= e(0.5, 0.2, 3, 0.15594 - 1e-3, "pld", 1e-4)
    # Abadi et al. (CCS'16) setting q = 0.01, σ = 4, T = 10,000, δ = 1e-5: dp.md §2.3 RDP 1.0355, PLD 0.9470
    assert e(4.0, 0.01, 10000, 1e-5, "rdp") == pytest.approx(1.0355, abs=1e-4)
    assert e(4.0, 0.01, 10000, 1e-5, "pld", 1e-4) == pytest.approx(0.9470, abs=1e-4)


@pytest.mark.parametrize("sigma,q,steps,delta", [(1.5, 0.04, 2250, 1e-5), (1.3, 0.0025, 6000, 1e-5),
                                                 (0.7, 0.01, 120, 1e-5), (4.0, 0.01, 10000, 1e-5)])
def test_the_default_pld_discretisation_is_an_upper_bound_close_to_the_fine_one(sigma, q, steps, delta):
    fine = dp_sgd.sgd_epsilon(sigma, q, steps, delta, "pld", 1e-4)
    coarse = dp_sgd.sgd_epsilon(sigma, q, steps, delta)
    assert fine <= coarse <= fine + 0.02
    # and the cached one-step PLD gives what dp-accounting's PLDAccountant gives for the same event
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc = PLDAccountant(value_discretization_interval=dp.DISCRETIZATION).compose(event, steps)
    assert coarse == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


def test_calibration_against_opacus_get_noise_multiplier():
    # Opacus accountants_test (O1, dp.md §2.1): get_noise_multiplier(target ε = 8, δ = 1e-5, q = 0.04): 90 epochs →
    # RDP 1.416 (4 places); 2000 steps → RDP 1.3562, PRV 1.2915. Opacus stops its bisection once target − ε ≤ 0.01
    # and returns the upper σ, so the tight σ is at or just below its value.
    rdp_90 = dp_sgd.calibrate_sigma(8.0, 1e-5, 0.04, 2250, "rdp")
    assert 1.405 <= rdp_90 <= 1.4161
    assert dp_sgd.calibrate_sigma(8.0, 1e-5, 0.04, 2000, "rdp") == pytest.approx(1.3562, abs=2e-4)
    assert 1.28 <= dp_sgd.calibrate_sigma(8.0, 1e-5, 0.04, 2000, "pld") <= 1.2915  # PRV ≥ PLD in ε


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("eps,delta,q,steps", [(8.0, 1e-5, 0.04, 2250), (1.0, 1e-5, 0.01, 300),
                                               (10.0, 1e-5, 0.05, 30), (0.5, 1e-6, 1.0, 20), (3.0, 1e-5, 0.2, 3)])
def test_calibrated_sigma_never_exceeds_the_target_and_is_tight(eps, delta, q, steps, accountant):
    sigma = dp_sgd.calibrate_sigma(eps, delta, q, steps, accountant)
    spent = dp_sgd.sgd_epsilon(sigma, q, steps, delta, accountant)
    assert spent <= eps
    # a σ smaller by twice the calibration tolerance overshoots: the plan spends (nearly) all of the target
    assert dp_sgd.sgd_epsilon(sigma * (1 - 2 * dp_sgd.CALIBRATION_RTOL), q, steps, delta, accountant) > eps
