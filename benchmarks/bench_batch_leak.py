"""The leak-versus-batch-size trade-off of the default setting, measured.

For batch sizes B = 1, 2, 4, 8 this prints the mean PSNR / SSIM / label accuracy of iDLG and DLG (L-BFGS, 200 steps,
the defaults of ``fl-sim run``) on a round-1 FedSGD update of the default model (tanh LeNet, Fashion-MNIST), over
three seeds (different images and initial models). Larger batches train better under FedSGD but leak far less to
DLG-family attacks; the README's table comes from this script.

Usage::

    python benchmarks/bench_batch_leak.py [MODEL] [SEEDS]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacker import ATTACKS, AttackPayload, Budget  # noqa: E402
from attacker.metrics import score  # noqa: E402
from fl_sim.data import denormalize, load_dataset, to_tensor  # noqa: E402
from fl_sim.models import build_model  # noqa: E402


def one(attack: str, model: str, batch: int, seed: int) -> dict[str, float]:
    data = load_dataset("fashion-mnist")
    torch.manual_seed(seed)
    net = build_model(model, data.input_shape, data.num_classes)
    idx = np.random.default_rng(seed).choice(len(data.y_train), batch, replace=False)
    x = to_tensor(data.x_train[idx], data.mean, data.std)
    y = torch.as_tensor(data.y_train[idx])
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), list(net.parameters()))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    update = {n: -0.15 * g for (n, _), g in zip(net.named_parameters(), grads)}
    payload = AttackPayload(model, data.input_shape, data.num_classes, data.mean, data.std, state, update, batch,
                            {"mode": "fedsgd", "lr": 0.15, "batch-size": batch})
    res = ATTACKS[attack].run(payload, Budget(iterations=200, seed=seed, time_limit_s=120))
    s = score(denormalize(res.images, data.mean, data.std).numpy(), denormalize(x, data.mean, data.std).numpy(),
              res.labels.numpy(), y.numpy())
    s["time_s"] = res.time_s
    return s


def main() -> None:
    torch.set_num_threads(1)
    model = sys.argv[1] if len(sys.argv) > 1 else "lenet-tanh"
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(f"{model}, Fashion-MNIST, round-1 FedSGD update, L-BFGS 200 steps, {seeds} seeds")
    print("| attack | B | PSNR (dB) | SSIM | label acc. | time (s) |")
    print("|---|---|---|---|---|---|")
    for attack in ("idlg", "dlg"):
        for batch in (1, 2, 4, 8):
            rows = [one(attack, model, batch, s) for s in range(seeds)]
            m = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            print(f"| {attack} | {batch} | {m['psnr']:.1f} | {m['ssim']:.3f} | {m['label_accuracy']:.2f} | "
                  f"{m['time_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
