"""Federated partitions of a training split: registry name → partitioner, and the cached partition table.

Clients hold only index arrays into the training split. Partitions are public and deterministic for a given
``(dataset, num_partitions, scheme, alpha, seed)``: the run config's seed chooses them, so the evaluator can rebuild
any client's data from its partition id (which samples a client *uses* in a round is its own secret).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from fl_sim.task.datasets import load_dataset
from fl_sim.task.registry import Registry

#: A partitioner: ``(labels int64 (N,), num_partitions, alpha, seed, min_size) -> list of sorted int64 index arrays``.
Partitioner = Callable[[np.ndarray, int, float, int, int], list[np.ndarray]]


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


#: Partitioner registry.
PARTITIONERS: Registry[Partitioner] = Registry("partition scheme")
PARTITIONERS.register("iid", lambda labels, n, alpha, seed, min_size: iid_partition(len(labels), n, seed))
PARTITIONERS.register("dirichlet", dirichlet_partition)


@functools.lru_cache(maxsize=8)
def partitions(
    dataset: str, data_dir: str, num_partitions: int, scheme: str, alpha: float, seed: int, size: int = 0,
    min_size: int = 1
) -> tuple[np.ndarray, ...]:
    """All partitions of ``dataset``'s training split as sorted index arrays (cached per process).

    Args:
        dataset, data_dir: the dataset.
        num_partitions: the number of clients.
        scheme: a :data:`PARTITIONERS` name; ``alpha`` its Dirichlet concentration.
        seed: the run's public seed.
        size: keep at most this many samples per partition (``partition-size``; 0 = all): a uniform random subset
            of the partition, drawn from ``(seed, partition id)``, so a client can hold e.g. 32 images while the
            federation keeps its number of clients.
        min_size: the fewest samples a partition may hold (Dirichlet redraws until it holds).

    Raises:
        RegistryError: unknown dataset or scheme.
        ValueError: the scheme cannot satisfy ``min_size``.
    """
    ds = load_dataset(dataset, data_dir)
    parts = PARTITIONERS[scheme](ds.y_train, num_partitions, alpha, seed, min_size)
    if size > 0:
        parts = [p if len(p) <= size else
                 np.sort(np.random.default_rng([seed % 2**63, pid, _SUBSET_STREAM]).choice(p, size, replace=False))
                 for pid, p in enumerate(parts)]
    return tuple(parts)


#: Stream id mixed into the ``partition-size`` subset draw.
_SUBSET_STREAM = 0x5153


def eval_share(num_test: int, num_partitions: int, partition_id: int, seed: int) -> np.ndarray:
    """The IID share of the test split a client evaluates on under federated evaluation (sorted indices)."""
    return iid_partition(num_test, num_partitions, seed)[partition_id]
