"""The evaluator: scores a reconstruction against the client's true batch.

It is the only component that sees ground truth. The truth reaches it through the ``audit`` record a client adds
to its reply (the partition id and the indices of the samples it trained on), which the server strategy strips
from the reply before it builds the attacker's :class:`~attacker.payload.AttackPayload`. The evaluator rebuilds the
images from the dataset the run uses, de-normalises the reconstruction to [0, 1] and calls
:func:`strategies.metrics.score` (Hungarian matching, MSE/PSNR/SSIM with scikit-image, label accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from attacker.payload import AttackResult
from fl_sim.task.contract import SAMPLE_INDICES
from fl_sim.task.datasets import Dataset, denormalize
from strategies.metrics import match, score


def truth_from_audit(data: Dataset, audit: Mapping[str, Any], limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The true images and labels named by an audit record.

    Args:
        data: the run's dataset.
        audit: ``{"sample-indices": [...]}`` as the client reported it (indices into ``data.x_train``, in order of
            use; duplicates are removed keeping the first use).
        limit: keep only the first ``limit`` distinct samples (``None`` = all).

    Returns:
        ``float32 (N, C, H, W)`` images in [0, 1] and ``int64 (N,)`` labels.
    """
    idx = list(dict.fromkeys(int(i) for i in audit[SAMPLE_INDICES]))
    if limit is not None:
        idx = idx[:limit]
    images = data.x_train[idx].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return images, data.y_train[idx]


def probe_index(audit: Mapping[str, Any] | None) -> int | None:
    """The image a probe asks for (``attack-target=probe``): the first sample the victim reports in its audit
    record this round (an index into the training split), or ``None`` when the record is missing or empty (e.g. an
    empty Poisson batch). The ground truth stays with the evaluator: the attacker sees only the probe's reply."""
    if audit is None or len(audit[SAMPLE_INDICES]) == 0:
        return None
    return int(audit[SAMPLE_INDICES][0])


def score_reconstruction(data: Dataset, result: AttackResult, audit: Mapping[str, Any]) -> dict[str, Any]:
    """Score ``result`` against the samples named in ``audit``.

    Returns:
        ``psnr``, ``ssim``, ``mse``, ``label_accuracy`` (see :func:`strategies.metrics.score`), plus
        ``reconstruction`` and ``truth`` — ``float32 (B, C, H, W)`` arrays in [0, 1], the truth reordered to match
        the reconstruction — for figures.
    """
    truth, labels = truth_from_audit(data, audit)
    rec = denormalize(result.images.detach().float().cpu(), data.mean, data.std).numpy()
    scores = score(rec, truth, result.labels.cpu().numpy(), labels)
    ri, ti = match(rec, truth)
    scores["reconstruction"] = rec[ri]
    scores["truth"] = truth[ti]
    scores["true_labels"] = labels[ti].tolist()
    scores["labels"] = result.labels.cpu().numpy()[ri].tolist()
    return scores
