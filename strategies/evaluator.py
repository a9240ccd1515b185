"""The evaluator: scores a reconstruction against the client's true images, next to its chance level.

It is the only component that sees ground truth. The truth reaches it through the ``audit`` record a client adds
to its reply (the partition id and the indices of the samples it trained on), which the server strategy strips
from the reply before it builds the attacker's :class:`~attacker.payload.AttackPayload`. The evaluator rebuilds the
images from the dataset the run uses, de-normalises the reconstruction to [0, 1] and calls
:func:`strategies.metrics.score` (Hungarian matching between sets of equal size, MSE/PSNR/SSIM, label accuracy),
then :func:`strategies.metrics.chance_scores` with the training split's mean image in place of the reconstruction
(``psnr_chance``, ``ssim_chance``, ``mse_chance``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attacker.payload import AttackResult
from fl_sim.task.contract import SAMPLE_INDICES
from fl_sim.task.datasets import Dataset, denormalize
from strategies.metrics import chance_scores, match, mean_image, score


def truth_from_audit(data: Dataset, audit: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The true images and labels named by an audit record.

    Args:
        data: the run's dataset.
        audit: ``{"sample-indices": [...]}`` as the client reported it (indices into ``data.x_train``, in order of
            use; duplicates are removed keeping the first use).

    Returns:
        ``float32 (N, C, H, W)`` images in [0, 1] and ``int64 (N,)`` labels, one per distinct sample.
    """
    idx = list(dict.fromkeys(int(i) for i in audit[SAMPLE_INDICES]))
    images = data.x_train[idx].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return images, data.y_train[idx]


def probe_index(audit: Mapping[str, Any] | None) -> int | None:
    """The image a probe asks for (``attack-target=probe``): the first sample the victim reports in its audit
    record this round (an index into the training split), or ``None`` when the record is missing or empty (e.g. an
    empty Poisson batch). The ground truth stays with the evaluator: the attacker sees only the probe's reply."""
    if audit is None or len(audit[SAMPLE_INDICES]) == 0:
        return None
    return int(audit[SAMPLE_INDICES][0])


def union_audit(audits: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """The audit record of an aggregate: the samples of every record, in order (record after record).

    Args:
        audits: the audit records of the replies aggregated (``{"sample-indices": [...]}``, indices into the
            training split; partitions are disjoint, and a sample named twice is kept once by
            :func:`truth_from_audit`).

    Returns:
        ``{"sample-indices": [...]}``: the union of the round's batches.
    """
    return {SAMPLE_INDICES: [int(i) for a in audits for i in a[SAMPLE_INDICES]]}


def chance_reference(data: Dataset) -> np.ndarray:
    """The chance-level reconstruction of a run: the per-pixel mean of its training split, ``float32 (C, H, W)`` in
    [0, 1] (:func:`strategies.metrics.mean_image`). It depends on the public training split only, never on which
    samples a client used."""
    return mean_image(data.x_train).astype(np.float32)


def score_reconstruction(data: Dataset, result: AttackResult, audit: Mapping[str, Any],
                         reference: np.ndarray | None = None) -> dict[str, Any]:
    """Score ``result`` against the samples named in ``audit``, and the chance reconstruction likewise.

    Args:
        data: the run's dataset (the truth is read from its training split).
        result: the attack's reconstruction, ``(B, C, H, W)`` in normalised space.
        audit: the reply's audit record.
        reference: the chance-level image ``(C, H, W)`` in [0, 1] (default: :func:`chance_reference` of ``data``;
            pass it to avoid recomputing the mean over the whole split on every attack).

    Returns:
        ``psnr``, ``ssim``, ``mse``, ``label_accuracy`` (see :func:`strategies.metrics.score`), ``psnr_chance``,
        ``ssim_chance``, ``mse_chance`` (:func:`strategies.metrics.chance_scores`), plus ``reconstruction`` and
        ``truth`` — ``float32 (B, C, H, W)`` arrays in [0, 1], the truth reordered to match the reconstruction —
        and the matched ``labels`` / ``true_labels``, for figures, and ``arrays`` (the raw results a run directory
        keeps in ``reconstructions.npz``): ``reconstruction`` ``float32 (B, C, H, W)`` in [0, 1] in the attack's
        order, ``truth`` ``float32 (N, C, H, W)`` in [0, 1] in the client's order of use, ``labels`` ``int64 (B,)``
        and ``true_labels`` ``int64 (N,)`` in those orders, ``match`` ``int64 (K, 2)`` — the pairs (reconstruction
        index, truth index) that were scored — and ``sample_indices`` ``int64 (N,)``.

    Raises:
        ValueError: the attack returned another number of images than the update holds (the run's checks make an
            attack reconstruct exactly as many images as the update holds, so this is a bug in the attack or in its
            :attr:`attacker.Attack.images`), or images of another shape.
    """
    truth, labels = truth_from_audit(data, audit)
    rec = denormalize(result.images.detach().float().cpu(), data.mean, data.std).numpy()
    if len(rec) != len(truth):
        raise ValueError(f"the attack returned {len(rec)} images, but the update holds {len(truth)}: the evaluator "
                         "scores a reconstruction only against a true set of its own size")
    scores = score(rec, truth, result.labels.cpu().numpy(), labels)
    scores.update(chance_scores(chance_reference(data) if reference is None else reference, truth))
    ri, ti = match(rec, truth)
    scores["reconstruction"] = rec[ri]
    scores["truth"] = truth[ti]
    scores["true_labels"] = labels[ti].tolist()
    scores["labels"] = result.labels.cpu().numpy()[ri].tolist()
    scores["arrays"] = {
        "reconstruction": rec.astype(np.float32), "truth": truth.astype(np.float32),
        "labels": result.labels.cpu().numpy().astype(np.int64), "true_labels": np.asarray(labels, np.int64),
        "match": np.stack([ri, ti], axis=1).astype(np.int64).reshape(-1, 2),
        "sample_indices": np.asarray(list(dict.fromkeys(int(i) for i in audit[SAMPLE_INDICES])), np.int64),
    }
    return scores
