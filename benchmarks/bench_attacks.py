"""Attack speed, measured in one run: fl-sim's iDLG against a naive reference loop, and IG's iteration rate.

* **iDLG to 40 dB.** LeNet-sigmoid (DLG's LeNet, U(−0.5, 0.5) init), one 3×32×32 photo (scikit-image's
  ``chelsea``), B = 1, label known. The *reference* is the loop of the original DLG/iDLG scripts
  (``mit-han-lab/dlg`` ``main.py``, ``PatrickZH/Improved-Deep-Leakage-from-Gradients`` ``iDLG.py``):
  ``torch.optim.LBFGS([dummy])`` with its defaults (lr 1, ``max_iter`` 20, history 100, no line search), a closure
  that rebuilds the gradient with ``create_graph=True`` and sums ``((g' − g)²).sum()`` layer by layer, 300 steps.
  Its time to 40 dB is read after every step (the PSNR check is not timed). fl-sim's ``idlg`` is timed as a whole
  call (setup included) with the smallest step budget that reaches 40 dB (found by search; the trajectory is
  deterministic). Ratio = fl-sim time / reference time; the target is ≤ 0.2.
  The same is timed with the reference's N(0, 1) initialisation (``attack-init-std=1``), to separate the
  implementation's gain from the initialisation's.
* **IG iterations per second** on the untrained ReLU ConvNet (3×32×32, B = 1), next to the reference loop's
  closure evaluations per second on LeNet.

* **Engines** (``--engines``): the objective's gradient by autograd's double backward (``engine="autograd"``,
  the original scripts' way) against :mod:`attacker.chain` (``"auto"``, the default), side by side in one
  process: milliseconds per evaluation (interleaved repetitions, median), the evaluation's arithmetic
  (``torch.utils.flop_counter``) and its floor at this machine's single-thread SGEMM rate (measured in the same
  run), then whole attacks: iDLG's time to 40 dB and IG's iterations per second with either engine.

Wall and CPU (``time.process_time``) seconds are both printed; on a shared machine the CPU ratio is the steadier.
Every mode ends with one JSON line of its headline figures.
Run: ``python benchmarks/bench_attacks.py [--seeds N]`` or ``python benchmarks/bench_attacks.py --engines``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacker import ATTACKS, AttackOptions, Budget, chain, dlg, ig, matching  # noqa: E402
from fl_sim.audit import fedsgd_payload  # noqa: E402
from fl_sim.task.datasets import DATASETS, denormalize, to_tensor  # noqa: E402
from strategies.metrics import psnr  # noqa: E402

TARGET_DB = 40.0
MEAN, STD = DATASETS["cifar10"].mean, DATASETS["cifar10"].std


def photo() -> np.ndarray:
    from skimage import data, transform

    img = transform.resize(data.chelsea(), (32, 32), anti_aliasing=True)
    return (img * 255).round().astype(np.uint8)[None]


def victim(model_name: str, x: torch.Tensor, y: torch.Tensor, seed: int, lr: float = 0.1):
    payload, model, grads = fedsgd_payload(model_name, x, y, MEAN, STD, 10, lr, seed)
    return model, grads, payload


def reference_idlg(model, target, x, y, seed: int, steps: int = 300) -> dict:
    """The original scripts' loop; returns wall/CPU seconds to 40 dB (None if never) and closure counts."""
    truth = denormalize(x, MEAN, STD).numpy()[0]
    dummy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    optimizer = torch.optim.LBFGS([dummy])
    count = [0]

    def closure():
        optimizer.zero_grad()
        pred = model(dummy)
        dummy_loss = F.cross_entropy(pred, y)
        dummy_dy_dx = torch.autograd.grad(dummy_loss, model.parameters(), create_graph=True)
        grad_diff = 0
        for gx, gy in zip(dummy_dy_dx, target):
            grad_diff += ((gx - gy) ** 2).sum()
        grad_diff.backward()
        count[0] += 1
        return grad_diff

    wall = cpu = 0.0
    for step in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        optimizer.step(closure)
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        if psnr(denormalize(dummy.detach(), MEAN, STD).numpy()[0], truth) >= TARGET_DB:
            return {"wall": wall, "cpu": cpu, "steps": step + 1, "closures": count[0]}
    return {"wall": None, "cpu": None, "steps": steps, "closures": count[0], "wall_total": wall}


def fl_sim_idlg(payload, x, seed: int, options: AttackOptions | None = None) -> dict:
    """Smallest step budget of fl-sim's idlg that reaches 40 dB, and the time of that call."""
    truth = denormalize(x, MEAN, STD).numpy()[0]

    def attempt(steps: int):
        w0, c0 = time.perf_counter(), time.process_time()
        res = ATTACKS["idlg"].run(payload, Budget(iterations=steps, seed=seed), options)
        out = {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0, "steps": steps,
               "closures": res.extras["closures"]}
        return psnr(denormalize(res.images, MEAN, STD).numpy()[0], truth) >= TARGET_DB, out

    lo, hi, best = 0, 1, None
    while hi <= 300:
        ok, out = attempt(hi)
        if ok:
            best = out
            break
        lo, hi = hi, hi * 2
    if best is None:
        return {"wall": None, "cpu": None, "steps": None, "closures": None}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, out = attempt(mid)
        if ok:
            hi, best = mid, out
        else:
            lo = mid
    ok, best = attempt(hi)  # re-time the final budget once more, warm
    return best


def ig_rate(x, y, iterations: int = 200) -> dict:
    _, _, payload = victim("convnet", x, y, 0)
    ATTACKS["ig"].run(payload, Budget(iterations=5))  # untimed: the first call sets up oneDNN's kernels (~1.5 s)
    w0, c0 = time.perf_counter(), time.process_time()
    res = ATTACKS["ig"].run(payload, Budget(iterations=iterations))
    return {"it_per_s": res.iterations / (time.perf_counter() - w0),
            "it_per_cpu_s": res.iterations / (time.process_time() - c0)}


def sgemm_gflops(n: int = 512, reps: int = 20) -> float:
    """This machine's single-thread float32 matrix-multiply rate (the arithmetic floor's unit), best of ``reps``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def closures(model_name: str, kind: str, x: torch.Tensor, y: torch.Tensor):
    """The iDLG (``l2``) or IG (``cosine``) objective's value-and-gradient by either engine, on one victim."""
    _, _, payload = victim(model_name, x, y, 0)
    model = payload.build_model("cpu")
    target = matching.prepare(payload, model)
    fast = chain.compile_chain(model, target.needed, torch.zeros_like(x))
    params = target.needed_params

    def autograd(v):
        v = v.detach().requires_grad_(True)
        g = torch.autograd.grad(F.cross_entropy(model(v), y), params, create_graph=True)
        d = target.l2(g) if kind == "l2" else target.cosine(g)
        return torch.autograd.grad(d, v)[0]

    def chained(v):
        return chain.value_and_grad(fast, lambda g: target.value_and_weights(g, kind), v, None, y)[1]

    return {"autograd": autograd, "chain": chained}


def per_eval(fns: dict, v: torch.Tensor, rounds: int = 15, reps: int = 20) -> dict:
    """Median milliseconds per call of each function, the functions interleaved round by round."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f(v)
    for _ in range(rounds):
        for k, f in fns.items():
            c0 = time.process_time()
            for _ in range(reps):
                f(v)
            times[k].append((time.process_time() - c0) / reps * 1e3)
    return {k: statistics.median(t) for k, t in times.items()}


def flops(f, v: torch.Tensor) -> float | None:
    """Floating-point operations of ``f(v)`` (convolutions and matrix products) by ``torch.utils.flop_counter``;
    ``None`` where the counter cannot follow the call (its module hooks reject ``autograd.grad`` of a leaf)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            f(v)
    except RuntimeError:
        return None
    return float(counter.get_total_flops())


def engines(x: torch.Tensor, y: torch.Tensor, seed: int, ig_iterations: int) -> dict:
    """Side by side in one process: per-evaluation cost, floors, and whole attacks with each engine."""
    rate = sgemm_gflops()
    out: dict = {"sgemm_gflops_1thread": round(rate, 1)}
    print(f"single-thread SGEMM (512^3): {rate:.1f} GFLOP/s", flush=True)
    for label, model_name, kind, mk in (("idlg_lenet", "lenet", "l2", dlg.MKLDNN), ("ig_convnet", "convnet", "cosine", True)):
        fns = closures(model_name, kind, x, y)
        v = torch.randn_like(x) * 0.5
        with dlg.mkldnn(mk):
            ms = per_eval(fns, v)
            fl = {"chain": flops(fns["chain"], v)}
        floor_ms = fl["chain"] / (rate * 1e9) * 1e3
        out[label] = {"ms_per_eval": {k: round(t, 3) for k, t in ms.items()},
                      "mflop_per_eval_chain": round(fl["chain"] / 1e6, 2),
                      "floor_ms": round(floor_ms, 3), "chain_over_floor": round(ms["chain"] / floor_ms, 2),
                      "chain_speedup": round(ms["autograd"] / ms["chain"], 3)}
        print(f"{label}: ms per evaluation (CPU, median) autograd {ms['autograd']:.3f}, chain {ms['chain']:.3f} "
              f"({ms['autograd'] / ms['chain']:.2f}x); {fl['chain'] / 1e6:.1f} MFLOP (convolutions and matrix "
              f"products of the chain pass); floor {floor_ms:.3f} ms at {rate:.0f} GFLOP/s, chain is "
              f"{ms['chain'] / floor_ms:.1f}x the floor", flush=True)
    _, _, lenet_payload = victim("lenet", x, y, seed)
    _, _, convnet_payload = victim("convnet", x, y, seed)
    saved = (dlg.ENGINE, ig.ENGINE)
    ATTACKS["ig"].run(convnet_payload, Budget(iterations=5, seed=seed))  # untimed warm-up (oneDNN kernel set-up)
    try:
        for eng in ("autograd", "auto"):
            dlg.ENGINE = ig.ENGINE = eng
            res = fl_sim_idlg(lenet_payload, x, seed)
            c0, w0 = time.process_time(), time.perf_counter()
            r = ATTACKS["ig"].run(convnet_payload, Budget(iterations=ig_iterations, seed=seed))
            ig_cpu, ig_wall = time.process_time() - c0, time.perf_counter() - w0
            out[f"engine_{eng}"] = {"idlg_wall_s": res["wall"], "idlg_cpu_s": res["cpu"], "idlg_steps": res["steps"],
                                    "idlg_closures": res["closures"], "ig_it_per_s": round(r.iterations / ig_wall, 2),
                                    "ig_it_per_cpu_s": round(r.iterations / ig_cpu, 2)}
            print(f"engine {eng}: iDLG to {TARGET_DB:.0f} dB {res['wall']:.2f} s wall / {res['cpu']:.2f} s CPU "
                  f"({res['closures']} closures); IG {r.iterations / ig_wall:.1f} it/s wall, "
                  f"{r.iterations / ig_cpu:.1f} per CPU s", flush=True)
    finally:
        dlg.ENGINE, ig.ENGINE = saved
    a, c = out["engine_autograd"], out["engine_auto"]
    if a["idlg_cpu_s"] and c["idlg_cpu_s"]:
        out["idlg_cpu_ratio_chain_vs_autograd"] = round(c["idlg_cpu_s"] / a["idlg_cpu_s"], 3)
    out["ig_rate_ratio_chain_vs_autograd"] = round(c["ig_it_per_cpu_s"] / a["ig_it_per_cpu_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="model initialisations (and dummy seeds) to time")
    parser.add_argument("--engines", action="store_true", help="compare the gradient engines side by side instead")
    parser.add_argument("--ig-iterations", type=int, default=500, help="IG iterations per engine with --engines")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = to_tensor(photo(), MEAN, STD)
    y = torch.tensor([3])
    if args.engines:
        print(json.dumps({"bench": "attack-engines", **engines(x, y, 0, args.ig_iterations)}))
        return
    rows = []
    for seed in range(args.seeds):
        model, target, payload = victim("lenet", x, y, seed)
        ref = reference_idlg(model, target, x, y, seed)
        ours = fl_sim_idlg(payload, x, seed)
        same_init = fl_sim_idlg(payload, x, seed, AttackOptions(init_std=1.0))
        rows.append((seed, ref, ours, same_init))
        fmt = lambda v: "never" if v is None else f"{v:.2f} s"  # noqa: E731
        ratio = (ours["wall"] / ref["wall"]) if ref["wall"] and ours["wall"] else None
        cratio = (ours["cpu"] / ref["cpu"]) if ref["cpu"] and ours["cpu"] else None
        print(f"seed {seed}: reference {fmt(ref['wall'])} wall / {fmt(ref['cpu'])} CPU ({ref['steps']} steps, "
              f"{ref['closures']} closures); fl-sim idlg {fmt(ours['wall'])} wall / {fmt(ours['cpu'])} CPU "
              f"({ours['steps']} steps, {ours['closures']} closures); ratio wall "
              f"{'n/a' if ratio is None else f'{ratio:.3f}'}, CPU {'n/a' if cratio is None else f'{cratio:.3f}'}; "
              f"with the reference's N(0, 1) init: {fmt(same_init['wall'])} wall ({same_init['closures']} closures)",
              flush=True)
    for label, k in (("default init N(0, 0.1²)", 2), ("reference init N(0, 1)", 3)):
        both = [(row[1], row[k]) for row in rows if row[1]["wall"] and row[k]["wall"]]
        if both:
            print(f"iDLG time to {TARGET_DB:.0f} dB, fl-sim ({label}) / reference, median over {len(both)} seeds: "
                  f"wall {statistics.median(o['wall'] / r['wall'] for r, o in both):.3f}, CPU "
                  f"{statistics.median(o['cpu'] / r['cpu'] for r, o in both):.3f} (target <= 0.2)")
    never = [row[0] for row in rows if row[1]["wall"] is None]
    if never:
        print(f"reference never reached {TARGET_DB:.0f} dB in 300 steps for seeds {never}; fl-sim reached it for "
              f"{[row[0] for row in rows if row[1]['wall'] is None and row[2]['wall'] is not None]}")
    model, target, _ = victim("lenet", x, y, 0)
    dummy = torch.randn(x.shape).requires_grad_(True)
    w0 = time.perf_counter()
    for _ in range(100):
        g = torch.autograd.grad(F.cross_entropy(model(dummy), y), model.parameters(), create_graph=True)
        d = sum(((a - b) ** 2).sum() for a, b in zip(g, target))
        d.backward()
    ref_rate = 100 / (time.perf_counter() - w0)
    rate = ig_rate(x, y)
    print(f"IG on the ConvNet (3x32x32, B=1): {rate['it_per_s']:.1f} iterations/s wall "
          f"({rate['it_per_cpu_s']:.1f} per CPU s); reference loop on LeNet: {ref_rate:.1f} closures/s")
    # the headline figures, one JSON line (ratios: fl-sim time to 40 dB / the reference's, median over seeds)
    both = [(row[1], row[2]) for row in rows if row[1]["wall"] and row[2]["wall"]]
    med = lambda key: round(statistics.median(o[key] / r[key] for r, o in both), 4) if both else None  # noqa: E731
    print(json.dumps({"bench": "attacks", "seeds": args.seeds,
                      "idlg_40db_ratio_wall": med("wall"), "idlg_40db_ratio_cpu": med("cpu"),
                      "ig_it_per_s": round(rate["it_per_s"], 2), "ig_it_per_cpu_s": round(rate["it_per_cpu_s"], 2),
                      "reference_closures_per_s": round(ref_rate, 2)}))


if __name__ == "__main__":
    main()
