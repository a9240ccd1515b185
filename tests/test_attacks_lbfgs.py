"""The compact-history L-BFGS: its direction equals the classic two-loop recursion, and it solves a quadratic."""

from __future__ import annotations

import torch

from attacker.lbfgs import LBFGSState, minimize


def two_loop(S, Y, g):
    """Nocedal & Wright, Algorithm 7.4, with H0 = γI from the newest pair."""
    q, alphas = g.clone(), []
    for s, y in reversed(list(zip(S, Y))):
        a = (s @ q) / (y @ s)
        alphas.append(a)
        q -= a * y
    r = (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1]) * q
    for (s, y), a in zip(zip(S, Y), reversed(alphas)):
        r += s * (a - (y @ r) / (y @ s))
    return r


def test_compact_direction_matches_two_loop_through_ring_wraparound():
    torch.manual_seed(0)
    n, m = 30, 4
    a = torch.randn(n, n, dtype=torch.float64)
    h = a @ a.T / n + torch.eye(n, dtype=torch.float64)
    state = LBFGSState(m, n, torch.zeros(n, dtype=torch.float64))
    x = torch.randn(n, dtype=torch.float64)
    g = h @ x
    p, q = state.products(g)
    S, Y = [], []
    for i in range(10):  # more pairs than the history holds
        d, yd = state.direction(g, p, q)
        if S:
            torch.testing.assert_close(-d, two_loop(S[-m:], Y[-m:], g))
            torch.testing.assert_close(yd, torch.stack(Y[-m:]) @ d)
        x_new = x + 0.5 * d
        g_new = h @ x_new
        p, q = state.update(x_new - x, g_new - g, g_new, 0.5 * yd, p, q)
        S.append(x_new - x)
        Y.append(g_new - g)
        x, g = x_new, g_new
        torch.testing.assert_close((p, q), state.products(g))


def test_minimize_solves_an_ill_conditioned_quadratic():
    torch.manual_seed(1)
    n = 50
    diag = torch.logspace(0, 4, n, dtype=torch.float64)  # condition number 1e4
    res = minimize(lambda v: (float(0.5 * (diag * v * v).sum()), diag * v), torch.ones(n, dtype=torch.float64),
                   2000, history=50, ftarget=1e-16)
    # torch.optim.LBFGS (history 50, strong Wolfe) needs ~6,000 evaluations for this
    assert res.reason == "target" and res.f <= 1e-16 and res.evaluations < 1000
