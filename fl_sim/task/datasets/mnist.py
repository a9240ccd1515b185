"""MNIST (LeCun, Cortes & Burges): 28×28 grey digits, 10 classes, read from ``data-dir`` in torchvision's layout
(the four IDX files, flat or under ``MNIST/raw``) and downloaded with torchvision when missing."""

from __future__ import annotations

from fl_sim.task.datasets.core import Dataset, load_idx_dataset

MEAN, STD = (0.1307,), (0.3081,)


def load(data_dir: str = "") -> Dataset:
    """MNIST from ``data_dir`` (default ``~/.cache/fl-sim/data``).

    Raises:
        DataError: the files are missing and the download fails.
    """
    return load_idx_dataset("mnist", "MNIST", "MNIST/raw", data_dir, 10, MEAN, STD)
