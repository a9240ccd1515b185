"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 32×32 colour images, read from ``data-dir`` in torchvision's layout
(the python pickles under ``cifar-10-batches-py`` / ``cifar-100-python``) and downloaded when missing."""

from __future__ import annotations

from fl_sim.task.datasets.core import Dataset, read_cifar_pickles, resolve_dir, torchvision_download

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _load(name: str, tv_cls: str, folder: str, train: list[str], test: list[str], key: bytes, num_classes: int,
          mean: tuple[float, ...], std: tuple[float, ...], data_dir: str,
          class_names: tuple[str, ...] = ()) -> Dataset:
    root = resolve_dir(data_dir)
    path = root / folder
    if not all((path / n).is_file() for n in train + test):
        torchvision_download(tv_cls, root)
    xtr, ytr = read_cifar_pickles(path, train, key)
    xte, yte = read_cifar_pickles(path, test, key)
    return Dataset(name, xtr, ytr, xte, yte, num_classes, mean, std, source=str(path), class_names=class_names)


def load_cifar10(data_dir: str = "") -> Dataset:
    """CIFAR-10 from ``data_dir/cifar-10-batches-py``.

    Raises:
        DataError: the files are missing and the download fails.
    """
    return _load("cifar10", "CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                 ["test_batch"], b"labels", 10, CIFAR10_MEAN, CIFAR10_STD, data_dir, CIFAR10_CLASSES)


def load_cifar100(data_dir: str = "") -> Dataset:
    """CIFAR-100 (fine labels) from ``data_dir/cifar-100-python``.

    Raises:
        DataError: the files are missing and the download fails.
    """
    return _load("cifar100", "CIFAR100", "cifar-100-python", ["train"], ["test"], b"fine_labels", 100,
                 CIFAR100_MEAN, CIFAR100_STD, data_dir)
