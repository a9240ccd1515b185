"""Datasets: the shipped subset, the on-disk formats torchvision uses, downloads, partitions."""

from __future__ import annotations

import gzip
import pickle
import urllib.error

import numpy as np
import pytest

from fl_sim.task import datasets as D
from fl_sim.task import partition as P
from fl_sim.task.datasets import core, fashion_mnist


def test_shipped_fashion_mnist_subset(fmnist):
    assert fmnist.x_train.shape == (10_000, 28, 28, 1) and fmnist.x_train.dtype == np.uint8
    assert fmnist.x_test.shape == (2_000, 28, 28, 1)
    assert fmnist.y_train.dtype == np.int64 and set(np.unique(fmnist.y_train)) == set(range(10))
    assert set(np.unique(fmnist.y_test)) == set(range(10))
    assert fmnist.input_shape == (1, 28, 28) and fmnist.num_classes == 10
    # real images: not constant, full 0..255 range used, class balance roughly uniform
    assert fmnist.x_train.min() == 0 and fmnist.x_train.max() == 255
    counts = np.bincount(fmnist.y_train)
    assert counts.min() > 800 and counts.max() < 1200
    assert "embedded" in fmnist.source


def test_embedded_subset_matches_debian_full_set_when_present(fmnist):
    if not fashion_mnist.DEBIAN_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    full = D.load_dataset("fashion-mnist", str(fashion_mnist.DEBIAN_DIR))
    with np.load(fashion_mnist.EMBEDDED) as z:
        idx = z["train_source_index"]
    assert full.x_train.shape == (60_000, 28, 28, 1)
    np.testing.assert_array_equal(full.x_train[idx[:50]], fmnist.x_train[:50])
    np.testing.assert_array_equal(full.y_train[idx], fmnist.y_train)


def _write_idx(path, arr, gz):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _write_idx_set(folder, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xtr, ytr = rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)
    xte, yte = rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test)
    for name, arr in zip(core.IDX_NAMES, (xtr, ytr, xte, yte)):
        _write_idx(folder / name, arr, gz)
    return xtr, ytr, xte, yte


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_data_dir_flat_and_torchvision_layout(tmp_path, gz):
    xtr, ytr, _, yte = _write_idx_set(tmp_path / "flat", gz=gz)
    ds = D.DATASETS["fashion-mnist"].loader(str(tmp_path / "flat"))
    np.testing.assert_array_equal(ds.x_train[..., 0], xtr)
    np.testing.assert_array_equal(ds.y_train, ytr)
    np.testing.assert_array_equal(ds.y_test, yte)
    _write_idx_set(tmp_path / "tv" / "FashionMNIST" / "raw", gz=gz)
    assert D.DATASETS["fashion-mnist"].loader(str(tmp_path / "tv")).x_train.shape == (12, 28, 28, 1)


def test_mnist_reads_torchvision_raw_layout(tmp_path):
    xtr, ytr, _, _ = _write_idx_set(tmp_path / "MNIST" / "raw", gz=False, seed=3)
    ds = D.DATASETS["mnist"].loader(str(tmp_path))
    np.testing.assert_array_equal(ds.x_train[..., 0], xtr)
    assert ds.mean == (0.1307,) and ds.name == "mnist"


def _write_cifar(root, folder, files, label_key, n=4, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True)
    out = {}
    for name in files:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, classes, n).tolist()
        with open(root / folder / name, "wb") as f:
            pickle.dump({b"data": x, label_key: y}, f)
        out[name] = (x, y)
    return out


def test_cifar10_and_cifar100_read_python_pickles(tmp_path):
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = _write_cifar(tmp_path, "cifar-10-batches-py", files, b"labels")
    ds = D.DATASETS["cifar10"].loader(str(tmp_path))
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    x0 = written["data_batch_1"][0][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(ds.x_train[0], x0)  # channel-first pickle rows become HWC images
    assert ds.y_train.tolist()[:4] == written["data_batch_1"][1]
    _write_cifar(tmp_path, "cifar-100-python", ["train", "test"], b"fine_labels", classes=100)
    ds100 = D.DATASETS["cifar100"].loader(str(tmp_path))
    assert ds100.num_classes == 100 and ds100.x_train.shape == (4, 32, 32, 3)


def test_missing_files_are_downloaded_with_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            _write_idx_set(tmp_path / "MNIST" / "raw", gz=False)

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    ds = D.DATASETS["mnist"].loader(str(tmp_path))
    assert calls and calls[0] == (str(tmp_path), True, True)
    assert ds.x_train.shape == (12, 28, 28, 1)


def test_offline_download_failure_is_a_clear_data_error(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, root, train, download):
            raise urllib.error.URLError("[Errno -2] Name or service not known")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(D.DataError, match=r"CIFAR10 is not in data-dir=.*downloading it with torchvision failed"):
        D.DATASETS["cifar10"].loader(str(tmp_path))


def test_to_tensor_and_denormalize_roundtrip(fmnist):
    x = D.to_tensor(fmnist.x_train[:3], fmnist.mean, fmnist.std)
    assert x.shape == (3, 1, 28, 28) and x.dtype.is_floating_point
    back = D.denormalize(x, fmnist.mean, fmnist.std).numpy()
    np.testing.assert_allclose(back[:, 0] * 255, fmnist.x_train[:3, ..., 0], atol=1e-3)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_complete_and_deterministic(fmnist, scheme):
    a = P.PARTITIONERS[scheme](fmnist.y_train, 10, 0.3, 7, 1)
    b = P.PARTITIONERS[scheme](fmnist.y_train, 10, 0.3, 7, 1)
    c = P.PARTITIONERS[scheme](fmnist.y_train, 10, 0.3, 8, 1)
    allidx = np.concatenate(a)
    assert len(allidx) == len(fmnist.y_train) and len(np.unique(allidx)) == len(allidx)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_skews_labels_more_for_smaller_alpha(fmnist):
    def skew(alpha):
        parts = P.dirichlet_partition(fmnist.y_train, 10, alpha, seed=0)
        # mean over clients of the share of the client's most frequent class
        return np.mean([np.bincount(fmnist.y_train[p], minlength=10).max() / len(p) for p in parts])

    assert skew(0.1) > skew(1.0) > skew(100.0) > 0.1


def test_dirichlet_impossible_min_size_raises(fmnist):
    with pytest.raises(ValueError, match="dirichlet-alpha=0.01"):
        P.dirichlet_partition(fmnist.y_train[:50], 40, 0.01, seed=0, min_size=5, max_tries=5)
