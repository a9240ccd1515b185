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

Wall and CPU (``time.process_time``) seconds are both printed; on a shared machine the CPU ratio is the steadier.
Run: ``python benchmarks/bench_attacks.py [--seeds N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacker import ATTACKS, AttackOptions, Budget  # noqa: E402
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
    w0, c0 = time.perf_counter(), time.process_time()
    res = ATTACKS["ig"].run(payload, Budget(iterations=iterations))
    return {"it_per_s": res.iterations / (time.perf_counter() - w0),
            "it_per_cpu_s": res.iterations / (time.process_time() - c0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="model initialisations (and dummy seeds) to time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = to_tensor(photo(), MEAN, STD)
    y = torch.tensor([3])
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
    both = [(r[1], r[2]) for r in rows if r[1]["wall"] and r[2]["wall"]]
    med = lambda key: statistics.median(o[key] / r[key] for r, o in both) if both else None  # noqa: E731
    print(json.dumps({"bench": "attacks", "seeds": args.seeds,
                      "idlg_40db_ratio_wall": med("wall"), "idlg_40db_ratio_cpu": med("cpu"),
                      "ig_it_per_s": round(rate["it_per_s"], 2), "reference_closures_per_s": round(ref_rate, 2)}))


if __name__ == "__main__":
    main()
