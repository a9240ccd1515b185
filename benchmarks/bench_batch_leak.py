"""The leak-versus-batch-size trade-off of the default setting, measured.

For batch sizes B = 1, 2, 4, 8 this prints the mean PSNR / SSIM / label accuracy of iDLG and DLG (L-BFGS, 200 steps,
the defaults of ``fl-sim run``) on a round-1 FedSGD update of the default model (tanh LeNet, Fashion-MNIST), over
three seeds (different images and initial models), each with its chance level (the same metric for the training
split's mean image in place of every reconstruction, :func:`strategies.metrics.chance_scores`). Larger batches leak
far less to DLG-family attacks; the README's table comes from this script.

Usage::

    python benchmarks/bench_batch_leak.py [MODEL] [SEEDS]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacker import ATTACKS, Budget  # noqa: E402
from fl_sim.audit import fedsgd_payload  # noqa: E402
from fl_sim.task.datasets import denormalize, load_dataset, to_tensor  # noqa: E402
from strategies.evaluator import chance_reference  # noqa: E402
from strategies.metrics import chance_scores, score  # noqa: E402


def one(attack: str, model: str, batch: int, seed: int) -> dict[str, float]:
    """Scores of one attack on one round-1 FedSGD update of ``batch`` training images, with their chance level."""
    data = load_dataset("fashion-mnist")
    idx = np.random.default_rng(seed).choice(len(data.y_train), batch, replace=False)
    x = to_tensor(data.x_train[idx], data.mean, data.std)
    y = torch.as_tensor(data.y_train[idx])
    payload, _, _ = fedsgd_payload(model, x, y, data.mean, data.std, data.num_classes, lr=0.15, seed=seed)
    res = ATTACKS[attack].run(payload, Budget(iterations=200, seed=seed, time_limit_s=120))
    truth = denormalize(x, data.mean, data.std).numpy()
    s = score(denormalize(res.images, data.mean, data.std).numpy(), truth, res.labels.numpy(), y.numpy())
    s.update(chance_scores(chance_reference(data), truth))
    s["time_s"] = res.time_s
    return s


def main() -> None:
    torch.set_num_threads(1)
    model = sys.argv[1] if len(sys.argv) > 1 else "lenet-tanh"
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(f"{model}, Fashion-MNIST, round-1 FedSGD update, L-BFGS 200 steps, {seeds} seeds")
    print("| attack | B | PSNR (dB) | chance | SSIM | chance | label acc. | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    psnr = {}
    for attack in ("idlg", "dlg"):
        for batch in (1, 2, 4, 8):
            rows = [one(attack, model, batch, s) for s in range(seeds)]
            m = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            psnr[f"{attack}_b{batch}"] = round(m["psnr"], 2)
            print(f"| {attack} | {batch} | {m['psnr']:.1f} | {m['psnr_chance']:.1f} | {m['ssim']:.3f} | "
                  f"{m['ssim_chance']:.3f} | {m['label_accuracy']:.2f} | {m['time_s']:.1f} |", flush=True)
    print(json.dumps({"bench": "batch_leak", "model": model, "seeds": seeds, "mean_psnr_db": psnr}))


if __name__ == "__main__":
    main()
