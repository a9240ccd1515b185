"""Batch label recovery, measured: every method of ``attacker.labels.LABEL_METHODS`` (and iLRG exactly as its paper
solves it) on round-1 FedSGD gradients of an untrained model, Fashion-MNIST batches of B = 8 … 128.

For each seed s the model is built after ``torch.manual_seed(s)`` and the batch is ``B`` distinct training images
drawn by ``numpy.random.default_rng(s)``; the table gives the mean over the seeds of the three accuracies defined in
``attacker/labels.py``: label-count accuracy (``Σ_c min(n̂_c, n_c)/B``), class-count accuracy (classes whose count
is exact) and label-set accuracy (classes whose presence is right).

Usage::

    python benchmarks/bench_labels.py [MODEL] [SEEDS] [B ...]      # defaults: lenet-tanh 3 8 16 32 64 128
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacker.labels import (LABEL_METHODS, class_count_accuracy, classifier_gradients, counts_to_labels,  # noqa: E402
                             ilrg_counts, label_count_accuracy, label_set_accuracy, recover_labels)
from fl_sim.task.datasets import load_dataset, to_tensor  # noqa: E402
from fl_sim.task.models import build_model, classifier_layer  # noqa: E402


def methods() -> list[str]:
    """The registry's methods (``auto`` is an alias) plus ``ilrg-paper``: every row of iLRG's system uses its
    class-mean estimate (no fallback; :func:`attacker.labels.ilrg_counts` with ``mean_softmax=None``)."""
    return [m for m in LABEL_METHODS if m != "auto"] + ["ilrg-paper"]


def one(model_name: str, batch: int, seed: int) -> dict[str, tuple[float, float, float, float]]:
    data = load_dataset("fashion-mnist")
    torch.manual_seed(seed)
    model = build_model(model_name, data.input_shape, data.num_classes)
    idx = np.random.default_rng(seed).choice(len(data.y_train), batch, replace=False)
    y = data.y_train[idx]
    x = to_tensor(data.x_train[idx], data.mean, data.std)
    grads = list(torch.autograd.grad(F.cross_entropy(model(x), torch.as_tensor(y)), list(model.parameters())))
    out = {}
    for m in methods():
        t = time.perf_counter()
        if m == "ilrg-paper":
            w, b = classifier_gradients(model, grads)
            labels = counts_to_labels(ilrg_counts(w, b, classifier_layer(model), batch), batch)
        else:
            labels = recover_labels(model, grads, batch, m, data.input_shape)
        c = data.num_classes
        out[m] = (label_count_accuracy(labels, y), class_count_accuracy(labels, y, c), label_set_accuracy(labels, y, c),
                  time.perf_counter() - t)
    return out


def main() -> None:
    torch.set_num_threads(1)
    model = sys.argv[1] if len(sys.argv) > 1 else "lenet-tanh"
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    batches = [int(b) for b in sys.argv[3:]] or [8, 16, 32, 64, 128]
    print(f"{model} (untrained), Fashion-MNIST, round-1 FedSGD gradient, mean of {seeds} seeds")
    print("| method | B | label-count acc. | class-count acc. | label-set acc. | time (ms) |")
    print("|---|---|---|---|---|---|")
    head: dict[str, dict[str, float]] = {}
    for batch in batches:
        rows = [one(model, batch, s) for s in range(seeds)]
        for m in methods():
            a = np.mean([r[m] for r in rows], axis=0)
            print(f"| {m} | {batch} | {a[0]:.3f} | {a[1]:.3f} | {a[2]:.3f} | {1000 * a[3]:.1f} |", flush=True)
            head.setdefault(f"label_count_acc_b{batch}", {})[m] = round(float(a[0]), 4)
    # the headline figures, one JSON line: label-count accuracy per batch size and method (mean over the seeds)
    print(json.dumps({"bench": "labels", "model": model, "seeds": seeds, **head}))


if __name__ == "__main__":
    main()
