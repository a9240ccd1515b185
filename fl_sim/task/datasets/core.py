"""The in-memory dataset type, tensor conversion, and the on-disk formats fl-sim reads.

Every dataset is held in memory as ``uint8`` arrays of shape ``(N, H, W, C)`` plus ``int64`` labels; clients hold
only *index arrays* into the training split, and a batch is converted to a normalised ``float32`` tensor of shape
``(B, C, H, W)`` only when it is used (:func:`to_tensor`).

Formats: IDX (LeCun's MNIST format, gzipped or not; :func:`read_idx`), CIFAR's python pickles
(:func:`read_cifar_pickles`), and torchvision's downloader for the online path (:func:`torchvision_download`).
"""

from __future__ import annotations

import functools
import gzip
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

#: Where datasets other than the embedded subset are read from (and downloaded to) when ``data-dir`` is empty.
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
        class_names: optional class names.
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
    x: np.ndarray | torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Convert ``uint8`` images ``(B, H, W, C)`` to a normalised ``float32`` tensor ``(B, C, H, W)``.

    ``x`` is a NumPy array or a ``uint8`` tensor (e.g. a batch indexed from :func:`on_device`'s copy, already on
    ``device``: then nothing crosses the bus). The result is ``(x / 255 - mean) / std`` per channel, bit for bit
    the same for both kinds of input.
    """
    if isinstance(x, torch.Tensor):
        t = x.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    else:
        t = torch.as_tensor(np.ascontiguousarray(x), device=device).permute(0, 3, 1, 2).float().div_(255.0)
    m, s = _channel_stats(tuple(mean), tuple(std), str(torch.device(device)))
    return (t - m) / s


@functools.lru_cache(maxsize=64)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as ``float32 (1, C, 1, 1)`` tensors on ``device``, made once (never written to)."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))


#: Per-process copies of dataset splits on a device: ``(id(dataset), split, device) -> (dataset, x, y)`` (the
#: dataset is kept so that its id is not reused while the entry lives).
_ON_DEVICE: dict[tuple[int, str, str], tuple[Dataset, torch.Tensor, torch.Tensor]] = {}
#: Entries kept (a process holds one dataset, seldom two; the oldest entry is dropped first).
ON_DEVICE_ENTRIES = 8


def on_device(data: Dataset, split: str, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of ``data`` as tensors on ``device``, copied there once per process (Ray actor, ServerApp).

    Args:
        data: the dataset (:func:`fl_sim.task.datasets.load_dataset` returns the same object within a process).
        split: ``"train"`` or ``"test"``.
        device: where the copy lives. On the CPU the tensors share the NumPy arrays' memory (no copy).

    Returns:
        ``(x uint8 (N, H, W, C), y int64 (N,))`` on ``device``; index them with a tensor of indices, then
        :func:`to_tensor` the batch.

    Raises:
        ValueError: ``split`` is neither ``"train"`` nor ``"test"``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; allowed: train, test")
    device = torch.device(device)
    key = (id(data), split, str(device))
    hit = _ON_DEVICE.get(key)
    if hit is not None and hit[0] is data:
        return hit[1], hit[2]
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    # torch warns on (and must not write to) read-only NumPy memory: copy such arrays once
    xt = torch.from_numpy(x if x.flags.writeable and x.flags.c_contiguous else np.ascontiguousarray(x).copy())
    yt = torch.from_numpy(y if y.flags.writeable and y.flags.c_contiguous else np.ascontiguousarray(y).copy())
    out = (xt.to(device), yt.to(device))
    while len(_ON_DEVICE) >= ON_DEVICE_ENTRIES:
        _ON_DEVICE.pop(next(iter(_ON_DEVICE)))
    _ON_DEVICE[key] = (data, *out)
    return out


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Invert :func:`to_tensor`'s normalisation: ``(B, C, H, W)`` normalised → ``[0, 1]`` images, clamped."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


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
    return data.reshape(dims).copy()  # a writable array (torch warns on tensors over read-only buffers)


IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def find_idx_files(root: Path, subdirs: tuple[str, ...]) -> list[Path] | None:
    """The four IDX files (``.gz`` or not) in ``root`` or one of ``root/subdirs``, or ``None``."""
    for folder in (root, *[root / s for s in subdirs]):
        found = []
        for name in IDX_NAMES:
            hit = next((c for c in (folder / name, folder / f"{name}.gz") if c.is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found
    return None


def read_idx_set(files: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x_train (N, H, W, 1) uint8, y_train (N,) int64, x_test, y_test`` from the four IDX files."""
    xtr, ytr, xte, yte = (read_idx(f) for f in files)
    return xtr[..., None], ytr.astype(np.int64), xte[..., None], yte.astype(np.int64)


def read_cifar_pickles(folder: Path, names: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 32, 32, 3)`` and labels ``int64 (N,)`` from CIFAR's python pickles in ``folder``."""
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def torchvision_download(cls_name: str, root: Path) -> None:
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


def resolve_dir(data_dir: str) -> Path:
    """``data_dir`` as a path, or :data:`DEFAULT_CACHE_DIR` when empty."""
    return Path(data_dir).expanduser() if data_dir else DEFAULT_CACHE_DIR


def load_idx_dataset(name: str, tv_cls: str, subdir: str, data_dir: str, num_classes: int,
                     mean: tuple[float, ...], std: tuple[float, ...]) -> Dataset:
    """An IDX dataset from ``data_dir`` (flat or torchvision's ``subdir`` layout), downloaded when missing."""
    root = resolve_dir(data_dir)
    files = find_idx_files(root, (subdir,))
    if files is None:
        torchvision_download(tv_cls, root)
        files = find_idx_files(root, (subdir,))
        if files is None:
            raise DataError(f"torchvision downloaded {tv_cls} but its IDX files are not under {root / subdir}")
    xtr, ytr, xte, yte = read_idx_set(files)
    return Dataset(name, xtr, ytr, xte, yte, num_classes, mean, std, source=str(files[0].parent))
