"""Datasets and federated partitions.

Every dataset is held in memory as ``uint8`` arrays of shape ``(N, H, W, C)`` plus ``int64`` labels; clients hold
only *index arrays* into the training split, and a batch is converted to a normalised ``float32`` tensor of shape
``(B, C, H, W)`` only when it is used (:func:`to_tensor`). Datasets are loaded once per process (Ray actor, ServerApp)
and cached.

Sources (registry :data:`DATASETS`, one loader per name):

* ``fashion-mnist`` (Xiao, Rasul & Vollgraf 2017, Zalando Research, MIT licence). With ``data-dir`` empty, the
  10,000/2,000 real-image subset shipped in ``fl_sim/assets`` is used (no download, works offline). With
  ``data-dir`` set, the full set is read from the four IDX files there (``.gz`` or not, flat or in torchvision's
  ``FashionMNIST/raw`` layout; Debian's ``dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist``), or downloaded into it with torchvision when they are missing.
* ``mnist``, ``cifar10``, ``cifar100``: read from ``data-dir`` in torchvision's on-disk formats (IDX files under
  ``MNIST/raw``; the python pickles under ``cifar-10-batches-py`` / ``cifar-100-python``), downloaded with
  torchvision when missing. An empty ``data-dir`` means ``~/.cache/fl-sim/data``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import json
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

EMBEDDED_FMNIST = Path(__file__).resolve().parent / "assets" / "fashion-mnist-subset.npz"
DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "fl-sim" / "data"


class DataError(RuntimeError):
    """A dataset cannot be found, read or downloaded; the message says where fl-sim looked."""


@dataclass(frozen=True)
class Dataset:
    """An image-classification dataset held in memory.

    Attributes:
        name: registry name, e.g. ``"fashion-mnist"``.
        x_train: ``uint8`` array ``(N, H, W, C)``, pixel values 0..255.
        y_train: ``int64`` array ``(N,)`` of class indices.
        x_test: ``uint8`` array ``(M, H, W, C)``.
        y_test: ``int64`` array ``(M,)``.
        num_classes: number of classes.
        mean: per-channel mean of the normalisation, in [0, 1] pixel units (public constants).
        std: per-channel standard deviation of the normalisation, in [0, 1] pixel units.
        source: where the arrays were read from (a path or ``"embedded subset"``).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    class_names: tuple[str, ...] = field(default=())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image, as models expect it."""
        _, h, w, c = self.x_train.shape
        return (c, h, w)


def to_tensor(
    x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Convert ``uint8`` images ``(B, H, W, C)`` to a normalised ``float32`` tensor ``(B, C, H, W)``.

    The result is ``(x / 255 - mean) / std`` per channel.
    """
    t = torch.as_tensor(np.ascontiguousarray(x), device=device).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (t - m) / s


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Invert :func:`to_tensor`'s normalisation: ``(B, C, H, W)`` normalised → ``[0, 1]`` images, clamped."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# File formats (the on-disk formats torchvision downloads)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not, into a ``uint8`` array.

    Raises:
        DataError: when the file is not an unsigned-byte IDX file or its size does not match its header.
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx_files(root: Path, subdirs: tuple[str, ...]) -> list[Path] | None:
    for folder in (root, *[root / s for s in subdirs]):
        found = []
        for name in _IDX_NAMES:
            cands = [folder / name, folder / f"{name}.gz"]
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found
    return None


def _read_idx_set(files: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    xtr, ytr, xte, yte = (read_idx(f) for f in files)
    return xtr[..., None], ytr.astype(np.int64), xte[..., None], yte.astype(np.int64)


def read_fashion_mnist_dir(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the four Fashion-MNIST IDX files from ``root`` (flat, or torchvision's ``FashionMNIST/raw``).

    Returns:
        ``x_train (60000, 28, 28, 1) uint8, y_train (60000,) int64, x_test (10000, 28, 28, 1), y_test (10000,)``.

    Raises:
        DataError: when the files are not there.
    """
    files = _find_idx_files(Path(root), ("FashionMNIST/raw",))
    if files is None:
        raise DataError(f"no Fashion-MNIST IDX files in {root}")
    return _read_idx_set(files)


def _read_cifar_pickles(folder: Path, names: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------------------------------------------
# Loaders (one per registry name)

_FMNIST_STATS = ((0.2860,), (0.3530,))
_MNIST_STATS = ((0.1307,), (0.3081,))
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _embedded_candidates() -> list[Path]:
    """Places the shipped subset can be: next to this module, any ``sys.path`` entry, an editable install's source.

    ``flwr run`` installs a copy of the app's code files (no data files) and imports that copy, so the module's
    own folder may lack the subset; the installed distribution still has it.
    """
    rel = Path("fl_sim") / "assets" / EMBEDDED_FMNIST.name
    cands = [EMBEDDED_FMNIST] + [Path(p) / rel for p in sys.path if p]
    try:
        direct = importlib.metadata.distribution("fl-sim").read_text("direct_url.json")
        url = json.loads(direct or "{}").get("url", "")
        if url.startswith("file://"):
            cands.append(Path(url[len("file://") :]) / rel)
    except importlib.metadata.PackageNotFoundError:
        pass
    return cands


def _load_embedded_fmnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    for cand in _embedded_candidates():
        if cand.is_file():
            with np.load(cand) as z:
                return (z["x_train"][..., None], z["y_train"].astype(np.int64), z["x_test"][..., None],
                        z["y_test"].astype(np.int64), f"embedded subset ({cand})")
    raise DataError(
        "the embedded Fashion-MNIST subset (fl_sim/assets/fashion-mnist-subset.npz) is missing from this "
        "installation; reinstall fl-sim or set data-dir to a folder with the Fashion-MNIST IDX files"
    )


def _torchvision_download(cls_name: str, root: Path) -> None:
    """Download a dataset with torchvision into ``root`` (both splits), turning failures into :class:`DataError`."""
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(tvd, cls_name)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # torchvision raises URLError, RuntimeError, ... when offline
        raise DataError(
            f"{cls_name} is not in data-dir={root} and downloading it with torchvision failed "
            f"({type(exc).__name__}: {exc}); put the files there or run online"
        ) from exc


def _resolve_dir(data_dir: str) -> Path:
    return Path(data_dir).expanduser() if data_dir else DEFAULT_CACHE_DIR


def _load_idx_dataset(name: str, tv_cls: str, subdir: str, data_dir: str, stats) -> Dataset:
    root = _resolve_dir(data_dir)
    files = _find_idx_files(root, (subdir,))
    if files is None:
        _torchvision_download(tv_cls, root)
        files = _find_idx_files(root, (subdir,))
        if files is None:
            raise DataError(f"torchvision downloaded {tv_cls} but its IDX files are not under {root / subdir}")
    xtr, ytr, xte, yte = _read_idx_set(files)
    return Dataset(name, xtr, ytr, xte, yte, 10, stats[0], stats[1], source=str(files[0].parent))


def load_fashion_mnist(data_dir: str = "") -> Dataset:
    """Fashion-MNIST: the shipped subset when ``data_dir`` is empty, else the full set from ``data_dir``."""
    if not data_dir:
        xtr, ytr, xte, yte, src = _load_embedded_fmnist()
        return Dataset("fashion-mnist", xtr, ytr, xte, yte, 10, *_FMNIST_STATS, source=src)
    return _load_idx_dataset("fashion-mnist", "FashionMNIST", "FashionMNIST/raw", data_dir, _FMNIST_STATS)


def load_mnist(data_dir: str = "") -> Dataset:
    """MNIST (LeCun et al.) from ``data_dir`` in torchvision's layout, downloaded when missing."""
    return _load_idx_dataset("mnist", "MNIST", "MNIST/raw", data_dir, _MNIST_STATS)


def _load_cifar(name: str, tv_cls: str, folder: str, train: list[str], test: list[str], key: bytes,
                num_classes: int, stats, data_dir: str) -> Dataset:
    root = _resolve_dir(data_dir)
    path = root / folder
    if not all((path / n).is_file() for n in train + test):
        _torchvision_download(tv_cls, root)
    xtr, ytr = _read_cifar_pickles(path, train, key)
    xte, yte = _read_cifar_pickles(path, test, key)
    return Dataset(name, xtr, ytr, xte, yte, num_classes, stats[0], stats[1], source=str(path))


def load_cifar10(data_dir: str = "") -> Dataset:
    """CIFAR-10 (Krizhevsky 2009) from ``data_dir/cifar-10-batches-py``, downloaded when missing."""
    return _load_cifar("cifar10", "CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                       ["test_batch"], b"labels", 10, _CIFAR10_STATS, data_dir)


def load_cifar100(data_dir: str = "") -> Dataset:
    """CIFAR-100 (Krizhevsky 2009, fine labels) from ``data_dir/cifar-100-python``, downloaded when missing."""
    return _load_cifar("cifar100", "CIFAR100", "cifar-100-python", ["train"], ["test"], b"fine_labels", 100,
                       _CIFAR100_STATS, data_dir)


#: Dataset registry: name → loader ``(data_dir: str) -> Dataset``. A new dataset is one function plus one line.
DATASETS: dict[str, Callable[[str], Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}

#: Input shape and class count per dataset, known without loading it (used to build models and check configs).
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "fashion-mnist": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}

#: Public normalisation constants per dataset (mean, std), known to clients and the server alike.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": _FMNIST_STATS,
    "mnist": _MNIST_STATS,
    "cifar10": _CIFAR10_STATS,
    "cifar100": _CIFAR100_STATS,
}


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "") -> Dataset:
    """Load (once per process) the dataset ``name`` from ``data_dir``.

    Raises:
        KeyError: unknown ``name`` (the message lists the registry).
        DataError: the data cannot be found or downloaded.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](data_dir)


# ---------------------------------------------------------------------------------------------------------------
# Partitioning


def iid_partition(num_samples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Split ``range(num_samples)`` into ``num_partitions`` near-equal random parts (sorted ``int64`` indices)."""
    perm = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(p) for p in np.array_split(perm, num_partitions)]


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 1000
) -> list[np.ndarray]:
    """Label-skewed partition: each class is split across partitions with proportions ~ Dirichlet(α·1).

    The draw is repeated (with the same generator) until every partition holds at least ``min_size`` samples, as
    in Hsu et al. 2019 / NIID-Bench. Smaller α means more skew.

    Raises:
        ValueError: when no draw in ``max_tries`` gives every partition ``min_size`` samples.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(
        f"dirichlet-alpha={alpha} with {num_partitions} partitions leaves some partition with fewer than "
        f"{min_size} samples in {max_tries} draws; raise dirichlet-alpha or lower num-supernodes"
    )


#: Partitioner registry: name → ``(labels, num_partitions, alpha, seed, min_size) -> list of index arrays``.
PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": lambda labels, n, alpha, seed, min_size: iid_partition(len(labels), n, seed),
    "dirichlet": lambda labels, n, alpha, seed, min_size: dirichlet_partition(labels, n, alpha, seed, min_size),
}


@functools.lru_cache(maxsize=8)
def partitions(
    dataset: str, data_dir: str, num_partitions: int, scheme: str, alpha: float, seed: int, min_size: int = 1
) -> tuple[np.ndarray, ...]:
    """All partitions of ``dataset``'s training split as index arrays (cached per process).

    Deterministic for a given ``(dataset, num_partitions, scheme, alpha, seed)``, so the evaluator can rebuild any
    client's data from its partition id.
    """
    ds = load_dataset(dataset, data_dir)
    return tuple(PARTITIONERS[scheme](ds.y_train, num_partitions, alpha, seed, min_size))
