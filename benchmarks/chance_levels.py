"""Chance levels of a dataset, and how much matching against a larger true set flatters an attack.

Prints (1) the chance level fl-sim records next to every score — PSNR / SSIM / MSE of the training split's mean
image against the first N training images — with the former SSIM (scikit-image's default uniform 7×7 window, sample
covariance) for comparison, and (2) an unrelated real image scored against one image versus against the nearest of
1,000 (what matching B′ reconstructions against a whole FedAvg partition did before the evaluator refused unequal
sets). The README's "Scoring" numbers come from this script (embedded Fashion-MNIST subset, N = 2,000, 20 draws).

Usage::

    python benchmarks/chance_levels.py [DATASET] [N] [DRAWS]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from skimage.metrics import structural_similarity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_sim.task.datasets import load_dataset  # noqa: E402
from strategies.evaluator import chance_reference  # noqa: E402
from strategies.metrics import chance_scores, psnr, ssim  # noqa: E402


def main(dataset: str = "fashion-mnist", n: int = 2000, draws: int = 20) -> None:
    ds = load_dataset(dataset)
    x = ds.x_train.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    ref = chance_reference(ds)
    c = chance_scores(ref, x[:n])
    former = np.mean([structural_similarity(ref.astype(np.float64), t.astype(np.float64), data_range=1.0,
                                            channel_axis=0, win_size=7) for t in x[:n]])
    print(f"{dataset}: chance over {n} training images: PSNR {c['psnr_chance']:.2f} dB, SSIM {c['ssim_chance']:.3f} "
          f"(former SSIM {former:.3f}), MSE {c['mse_chance']:.4f}")
    rng = np.random.default_rng(0)
    own, best, s_own, s_best = [], [], [], []
    for _ in range(draws):
        idx = rng.choice(len(x), 1001, replace=False)
        u, part = x[idx[0]], x[idx[1:]]
        j = int(((part - u) ** 2).reshape(len(part), -1).mean(-1).argmin())
        own.append(psnr(u, part[0]))
        best.append(psnr(u, part[j]))
        s_own.append(ssim(u, part[0]))
        s_best.append(ssim(u, part[j]))
    print(f"an unrelated image against one image: PSNR {np.mean(own):.1f} dB, SSIM {np.mean(s_own):.3f}; against the "
          f"nearest of 1,000: {np.mean(best):.1f} dB, SSIM {np.mean(s_best):.3f} ({draws} draws)")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "fashion-mnist", int(args[1]) if len(args) > 1 else 2000,
         int(args[2]) if len(args) > 2 else 20)
