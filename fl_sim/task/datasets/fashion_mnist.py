"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017; Zalando Research, MIT licence): 28×28 grey, 10 classes.

With ``data-dir`` empty, the 10,000/2,000 real-image subset shipped in ``fl_sim/assets`` is used (no download,
works offline; rebuilt by ``scripts/make_embedded_subset.py``). With ``data-dir`` set, the full set is read from the
four IDX files there (``.gz`` or not, flat or in torchvision's ``FashionMNIST/raw`` layout; Debian's
``dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``), or downloaded into it with
torchvision when they are missing.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np

from fl_sim.task.datasets.core import Dataset, DataError, find_idx_files, load_idx_dataset, read_idx_set

#: Public normalisation constants (per-channel mean and std of the training split, in [0, 1] units).
MEAN, STD = (0.2860,), (0.3530,)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
EMBEDDED = Path(__file__).resolve().parents[2] / "assets" / "fashion-mnist-subset.npz"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_dir(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the four Fashion-MNIST IDX files from ``root`` (flat, or torchvision's ``FashionMNIST/raw``).

    Returns:
        ``x_train (60000, 28, 28, 1) uint8, y_train (60000,) int64, x_test (10000, 28, 28, 1), y_test (10000,)``.

    Raises:
        DataError: when the files are not there.
    """
    files = find_idx_files(Path(root), ("FashionMNIST/raw",))
    if files is None:
        raise DataError(f"no Fashion-MNIST IDX files in {root}")
    return read_idx_set(files)


def embedded_candidates() -> list[Path]:
    """Places the shipped subset can be: next to this package, any ``sys.path`` entry, an editable install's source.

    ``flwr run`` installs a copy of the app's code files (no data files) and imports that copy, so the package's
    own folder may lack the subset; the installed distribution still has it.
    """
    rel = Path("fl_sim") / "assets" / EMBEDDED.name
    cands = [EMBEDDED] + [Path(p) / rel for p in sys.path if p]
    try:
        direct = importlib.metadata.distribution("fl-sim").read_text("direct_url.json")
        url = json.loads(direct or "{}").get("url", "")
        if url.startswith("file://"):
            cands.append(Path(url[len("file://"):]) / rel)
    except importlib.metadata.PackageNotFoundError:
        pass
    return cands


def load(data_dir: str = "") -> Dataset:
    """Fashion-MNIST: the shipped subset when ``data_dir`` is empty, else the full set from ``data_dir``.

    Raises:
        DataError: the subset is missing from the installation, or ``data_dir`` has no files and the download fails.
    """
    if data_dir:
        return load_idx_dataset("fashion-mnist", "FashionMNIST", "FashionMNIST/raw", data_dir, 10, MEAN, STD)
    for cand in embedded_candidates():
        if cand.is_file():
            with np.load(cand) as z:
                return Dataset("fashion-mnist", z["x_train"][..., None], z["y_train"].astype(np.int64),
                               z["x_test"][..., None], z["y_test"].astype(np.int64), 10, MEAN, STD,
                               source=f"embedded subset ({cand})", class_names=CLASSES)
    raise DataError(
        "the embedded Fashion-MNIST subset (fl_sim/assets/fashion-mnist-subset.npz) is missing from this "
        "installation; reinstall fl-sim or set data-dir to a folder with the Fashion-MNIST IDX files"
    )
