"""Image-similarity metrics on de-normalised ``[0, 1]`` images (scikit-image), and batch matching.

Conventions: images are de-normalised and clamped to [0, 1] *before*
scoring (IG and Plato score normalised tensors, which inflates PSNR); PSNR is ``10·log10(1/MSE)`` per image, then
averaged; SSIM is the standard (Wang et al. 2004) SSIM of ``skimage.metrics.structural_similarity`` with
``data_range=1`` — not breaching's CW-SSIM; a batch is matched to the truth by a Hungarian assignment on MSE
(``scipy.optimize.linear_sum_assignment``) before scoring, never best-of-batch.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

#: Pixel differences held at once while :func:`match` builds its cost matrix (~64 MB of float32).
MATCH_CHUNK = 16_000_000

#: MSE floor used for PSNR so that a bit-exact reconstruction scores 100 dB instead of infinity (JSON-safe).
MSE_FLOOR = 1e-10


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of two ``[0, 1]`` images of the same shape ``(C, H, W)``."""
    return float(mean_squared_error(a, b))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two ``[0, 1]`` images ``(C, H, W)`` (data range 1; at most 100 dB, see :data:`MSE_FLOOR`)."""
    if mse(a, b) < MSE_FLOOR:
        return float(10 * np.log10(1.0 / MSE_FLOOR))
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Standard SSIM of two ``[0, 1]`` images ``(C, H, W)``; channels are averaged (``channel_axis=0``)."""
    win = min(7, a.shape[-1], a.shape[-2])
    win -= 1 - win % 2  # odd window no larger than the image
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=0, win_size=win))


def match(reconstruction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian assignment of reconstructions to true images on MSE.

    Args:
        reconstruction: ``(B, C, H, W)`` in [0, 1].
        truth: ``(B', C, H, W)`` in [0, 1]; ``B' != B`` is allowed (e.g. a multi-step update used more images
            than the attack reconstructs), and then ``min(B, B')`` pairs are formed.

    Returns:
        ``(rec_idx, truth_idx)``: index arrays of the matched pairs, sorted by ``truth_idx``.
    """
    cost = np.empty((len(reconstruction), len(truth)), dtype=np.result_type(reconstruction, truth))
    step = max(1, MATCH_CHUNK // max(1, len(reconstruction) * reconstruction[0].size))  # truth images per chunk
    for j in range(0, len(truth), step):  # bounded memory: a one-epoch update's truth holds thousands of images
        part = truth[j:j + step]
        cost[:, j:j + step] = ((reconstruction[:, None] - part[None]) ** 2).reshape(
            len(reconstruction), len(part), -1).mean(-1)
    rows, cols = linear_sum_assignment(cost)
    order = np.argsort(cols)
    return rows[order], cols[order]


def score(reconstruction: np.ndarray, truth: np.ndarray, rec_labels: np.ndarray | None = None,
          true_labels: np.ndarray | None = None) -> dict[str, float]:
    """Score a batch reconstruction against the truth after Hungarian matching.

    Args:
        reconstruction: ``float (B, C, H, W)`` in [0, 1].
        truth: ``float (B', C, H, W)`` in [0, 1] (see :func:`match` for ``B' != B``).
        rec_labels: ``(B,)`` labels the attack recovered (optional).
        true_labels: ``(B',)`` true labels (optional).

    Returns:
        ``mse``, ``psnr`` (dB), ``ssim`` — each the mean over matched pairs — and, when labels are given,
        ``label_accuracy``: the fraction of the matched true labels found among the recovered labels, counted as
        multisets (order-free, as label recovery yields an unordered bag).

    Raises:
        ValueError: the image shapes differ.
    """
    if reconstruction.shape[1:] != truth.shape[1:]:
        raise ValueError(f"reconstruction {reconstruction.shape} and truth {truth.shape} differ in image shape")
    ri, ti = match(reconstruction, truth)
    pairs = list(zip(reconstruction[ri], truth[ti]))
    out = {
        "mse": float(np.mean([mse(r, t) for r, t in pairs])),
        "psnr": float(np.mean([psnr(r, t) for r, t in pairs])),
        "ssim": float(np.mean([ssim(r, t) for r, t in pairs])),
    }
    if rec_labels is not None and true_labels is not None:
        out["label_accuracy"] = label_accuracy(np.asarray(rec_labels), np.asarray(true_labels)[ti])
    return out


def label_accuracy(recovered: np.ndarray, true: np.ndarray) -> float:
    """Fraction of true labels found in the recovered labels, counted as multisets (order-free)."""
    rec = list(np.asarray(recovered).tolist())
    hits = 0
    for label in np.asarray(true).tolist():
        if label in rec:
            rec.remove(label)
            hits += 1
    return hits / max(1, len(true))
