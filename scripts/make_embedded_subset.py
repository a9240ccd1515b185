"""Rebuild the Fashion-MNIST subset that ships inside fl-sim (``fl_sim/assets/fashion-mnist-subset.npz``).

The subset is 10,000 training and 2,000 test images drawn uniformly at random (``numpy.random.default_rng(2026)``)
from the full Fashion-MNIST set (Xiao, Rasul & Vollgraf 2017, Zalando Research, MIT licence).

Usage::

    python scripts/make_embedded_subset.py [SOURCE_DIR]

``SOURCE_DIR`` holds the four IDX files (``.gz`` or not); it defaults to Debian's ``dataset-fashion-mnist``
location ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_sim.task.datasets.fashion_mnist import EMBEDDED as EMBEDDED_FMNIST, read_dir as read_fashion_mnist_dir  # noqa: E402

N_TRAIN, N_TEST, SEED = 10_000, 2_000, 2026


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/usr/share/datasets/fashion-mnist")
    x_train, y_train, x_test, y_test = read_fashion_mnist_dir(source)
    rng = np.random.default_rng(SEED)
    train_idx = np.sort(rng.choice(len(x_train), N_TRAIN, replace=False))
    test_idx = np.sort(rng.choice(len(x_test), N_TEST, replace=False))
    EMBEDDED_FMNIST.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        EMBEDDED_FMNIST,
        x_train=x_train[train_idx, ..., 0],
        y_train=y_train[train_idx],
        x_test=x_test[test_idx, ..., 0],
        y_test=y_test[test_idx],
        train_source_index=train_idx.astype(np.int32),
        test_source_index=test_idx.astype(np.int32),
    )
    print(f"wrote {EMBEDDED_FMNIST} ({EMBEDDED_FMNIST.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
