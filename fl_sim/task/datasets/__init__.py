"""Dataset registry: one :class:`DatasetSpec` per name (its loader, input shape, classes and normalisation).

A new dataset is one module with a loader ``(data_dir: str) -> Dataset`` plus one ``DATASETS.register`` line
below. The shape, class count and normalisation are known without loading the data (configs are checked and
models built from them); :func:`load_dataset` loads once per process (Ray actor, ServerApp) and caches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from fl_sim.task.datasets import cifar, fashion_mnist, mnist
from fl_sim.task.datasets.core import DataError, Dataset, denormalize, on_device, read_idx, to_tensor
from fl_sim.task.registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    """What fl-sim knows about a dataset before loading it.

    Attributes:
        loader: ``(data_dir) -> Dataset`` (raises :class:`DataError`).
        input_shape: ``(C, H, W)`` of one image.
        num_classes: number of classes.
        mean, std: public per-channel normalisation constants in [0, 1] pixel units.
        summary: one line (source and licence).
    """

    loader: Callable[[str], Dataset]
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    summary: str = ""


#: Dataset registry.
DATASETS: Registry[DatasetSpec] = Registry("dataset")
DATASETS.register("fashion-mnist", DatasetSpec(fashion_mnist.load, (1, 28, 28), 10, fashion_mnist.MEAN,
                                               fashion_mnist.STD, "Fashion-MNIST (Xiao et al. 2017, MIT)"))
DATASETS.register("mnist", DatasetSpec(mnist.load, (1, 28, 28), 10, mnist.MEAN, mnist.STD, "MNIST (LeCun et al.)"))
DATASETS.register("cifar10", DatasetSpec(cifar.load_cifar10, (3, 32, 32), 10, cifar.CIFAR10_MEAN,
                                         cifar.CIFAR10_STD, "CIFAR-10 (Krizhevsky 2009)"))
DATASETS.register("cifar100", DatasetSpec(cifar.load_cifar100, (3, 32, 32), 100, cifar.CIFAR100_MEAN,
                                          cifar.CIFAR100_STD, "CIFAR-100 (Krizhevsky 2009, fine labels)"))


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "") -> Dataset:
    """Load (once per process) the dataset ``name`` from ``data_dir``.

    Raises:
        RegistryError: unknown ``name`` (a ``KeyError`` whose message lists the registry).
        DataError: the data cannot be found or downloaded.
    """
    return DATASETS[name].loader(data_dir)


__all__ = ["DATASETS", "DataError", "Dataset", "DatasetSpec", "denormalize", "load_dataset", "on_device", "read_idx",
           "to_tensor"]
