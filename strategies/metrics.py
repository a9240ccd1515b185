"""Image-similarity metrics on de-normalised ``[0, 1]`` images (scikit-image), batch matching and chance levels.

Conventions:

* images are de-normalised and clamped to [0, 1] *before* scoring (IG and Plato score normalised tensors, which
  inflates PSNR);
* PSNR is ``10·log10(1/MSE)`` per image (data range 1), then averaged;
* SSIM is Wang, Bovik, Sheikh & Simoncelli (IEEE TIP 2004): an 11×11 Gaussian window of σ = 1.5, population
  (biased) covariances, ``K1 = 0.01``, ``K2 = 0.03``, data range 1, averaged over the positions where the window
  fits and over channels — ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)``, the definition torchmetrics' ``structural_similarity_index_measure``
  (and LeakPro, which calls it) reports. It is *not* breaching's CW-SSIM, nor scikit-image's default (a uniform 7×7
  window with sample covariance), which scores the same pair higher. Images smaller than the 11-pixel window (only
  tiny test images: 25×25 and up use the full window) use the same σ = 1.5 Gaussian truncated to the largest odd
  size that fits and renormalised (:func:`gaussian_ssim`);
* a reconstruction is matched to the truth by a Hungarian assignment on MSE
  (``scipy.optimize.linear_sum_assignment``) before scoring, never best-of-batch, and only between sets of **equal
  size**: matching B′ reconstructions against a larger true set lets each pick its nearest of many images (an
  unrelated Fashion-MNIST image scores 16.0 dB / SSIM 0.56 against the nearest of a FedAvg client's 1,000 images,
  9.0 dB / SSIM 0.13 against one image; ``benchmarks/chance_levels.py``), so :func:`match` refuses unequal sizes;
* every score has a **chance level** (:func:`chance_scores`): the same metric for a reconstruction that carries no
  information about the client — the training split's mean image, repeated for every true image and matched the
  same way. A PSNR at or below it means nothing was recovered.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import correlate1d
from scipy.optimize import linear_sum_assignment
from skimage.metrics import (
    mean_squared_error,
    peak_signal_noise_ratio,
    structural_similarity,
)

#: Pixel differences held at once while :func:`match` builds its cost matrix (~64 MB of float32).
MATCH_CHUNK = 16_000_000

#: MSE floor used for PSNR so that a bit-exact reconstruction scores 100 dB instead of infinity (JSON-safe).
MSE_FLOOR = 1e-10
#: SSIM's Gaussian window (Wang et al. 2004): standard deviation and size in pixels.
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
#: SSIM's stabilising constants, as fractions of the data range.
SSIM_K1, SSIM_K2 = 0.01, 0.03
#: The metrics that get a chance level (``<name>_chance`` in every attack record).
CHANCE_METRICS = ("psnr", "ssim", "mse")


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of two ``[0, 1]`` images of the same shape ``(C, H, W)``."""
    return float(mean_squared_error(a, b))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two ``[0, 1]`` images ``(C, H, W)`` (data range 1; at most 100 dB, see :data:`MSE_FLOOR`)."""
    if mse(a, b) < MSE_FLOOR:
        return float(10 * np.log10(1.0 / MSE_FLOOR))
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def gaussian_window(size: int, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian of ``size`` (odd) taps and standard deviation ``sigma``, ``float64 (size,)``."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-0.5 * (r / sigma) ** 2)
    return w / w.sum()


def gaussian_ssim(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """SSIM of two ``[0, 1]`` images ``(C, H, W)`` with a ``size``-tap Gaussian window of σ = 1.5 (separable,
    renormalised), population covariances and data range 1, averaged over the positions where the window fits
    entirely and over channels.

    With ``size = 11`` this is exactly what :func:`ssim` gets from scikit-image; :func:`ssim` calls it only for
    images smaller than 11 pixels, with the largest odd ``size`` that fits (the test file checks both).

    Raises:
        ValueError: ``size`` is even, smaller than 1, or larger than the image.
    """
    h, w = a.shape[-2:]
    if size < 1 or size % 2 == 0 or size > min(h, w):
        raise ValueError(f"SSIM window of {size} pixels does not fit an odd-sized window into {h}×{w} images")
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    g = gaussian_window(size)

    def blur(t: np.ndarray) -> np.ndarray:
        return correlate1d(correlate1d(t, g, axis=-1, mode="reflect"), g, axis=-2, mode="reflect")

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    p = (size - 1) // 2
    return float(s[..., p:h - p, p:w - p].mean())


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004; see the module docstring) of two ``[0, 1]`` images ``(C, H, W)``, channels averaged.

    Images of at least 11×11 pixels: ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0)``; smaller ones: :func:`gaussian_ssim`
    with the largest odd window that fits.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    side = min(a.shape[-1], a.shape[-2])
    if side < SSIM_WINDOW:
        return gaussian_ssim(a, b, side - (1 - side % 2))
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=SSIM_SIGMA,
                                       use_sample_covariance=False))


def match(reconstruction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian assignment of reconstructions to true images on MSE (a bijection).

    Args:
        reconstruction: ``(B, C, H, W)`` in [0, 1].
        truth: ``(B, C, H, W)`` in [0, 1]: as many images as the reconstruction.

    Returns:
        ``(rec_idx, truth_idx)``: index arrays of the ``B`` matched pairs, sorted by ``truth_idx``.

    Raises:
        ValueError: the two sets differ in size (see the module docstring: a larger true set flatters the attack)
            or in image shape.
    """
    if len(reconstruction) != len(truth):
        raise ValueError(f"cannot match {len(reconstruction)} reconstructed images against {len(truth)} true images: "
                         "scores are defined between sets of equal size only")
    if reconstruction.shape[1:] != truth.shape[1:]:
        raise ValueError(f"reconstruction {reconstruction.shape} and truth {truth.shape} differ in image shape")
    cost = np.empty((len(reconstruction), len(truth)), dtype=np.result_type(reconstruction, truth))
    step = max(1, MATCH_CHUNK // max(1, len(reconstruction) * reconstruction[0].size))  # truth images per chunk
    for j in range(0, len(truth), step):  # bounded memory: an aggregate's or an epoch's batch holds many images
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
        truth: ``float (B, C, H, W)`` in [0, 1], the same number of images.
        rec_labels: ``(B,)`` labels the attack recovered (optional).
        true_labels: ``(B,)`` true labels (optional).

    Returns:
        ``mse``, ``psnr`` (dB), ``ssim`` — each the mean over matched pairs — and, when labels are given,
        ``label_accuracy``: the fraction of the matched true labels found among the recovered labels, counted as
        multisets (order-free, as label recovery yields an unordered bag).

    Raises:
        ValueError: the sets differ in size or the images in shape (:func:`match`).
    """
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


def mean_image(images: np.ndarray) -> np.ndarray:
    """The per-pixel mean of a training split: ``uint8 (N, H, W, C)`` (the dataset layout) → ``float64 (C, H, W)``
    in [0, 1]. Computed in chunks (a full split is 60,000 images)."""
    n = len(images)
    if n == 0:
        raise ValueError("the mean image of an empty training split is undefined")
    total = np.zeros(images.shape[1:], np.float64)
    for i in range(0, n, 8192):
        total += images[i:i + 8192].sum(axis=0, dtype=np.float64)
    return (total / (255.0 * n)).transpose(2, 0, 1)


def chance_scores(reference: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The chance level of :func:`score`: the scores of a reconstruction without information about the client.

    Args:
        reference: ``(C, H, W)`` in [0, 1], an image that does not depend on the client's data (the training
            split's :func:`mean_image`).
        truth: ``(B, C, H, W)`` in [0, 1], the true images the attack is scored against.

    Returns:
        ``psnr_chance``, ``ssim_chance``, ``mse_chance``: :func:`score` of ``B`` copies of ``reference`` against
        ``truth`` (matched the same way; every assignment of identical copies scores the same).
    """
    guess = np.repeat(np.asarray(reference, truth.dtype)[None], len(truth), axis=0)
    s = score(guess, truth)
    return {f"{k}_chance": s[k] for k in CHANCE_METRICS}


def below_chance(scores: dict, name: str) -> bool | None:
    """Whether ``scores[name]`` is at or below ``scores[name + "_chance"]``; ``None`` when either is missing or
    ``None`` (not comparable). ``scores`` is an attack record or the means of several."""
    v, c = scores.get(name), scores.get(f"{name}_chance")
    return None if v is None or c is None else bool(v <= c)


def at_chance(scores: dict) -> bool | None:
    """Whether a reconstruction recovered nothing: PSNR **and** SSIM at or below their chance levels
    (:func:`below_chance`); ``None`` when either comparison is not possible."""
    p, q = below_chance(scores, "psnr"), below_chance(scores, "ssim")
    return None if p is None or q is None else p and q


def chance_note(scores: dict) -> str:
    """How scores compare with their chance levels, in words: ``""`` when both PSNR and SSIM are above chance (or a
    chance level is missing), ``"PSNR and SSIM at or below chance: nothing recovered"`` when both are at or below
    (:func:`at_chance`), else which one is (``"PSNR at or below chance, SSIM above it"``). Only both at or below
    means nothing was recovered: a reconstruction can sit below the mean image's PSNR and still show the image's
    structure in SSIM.

    Args:
        scores: a mapping with ``psnr``, ``psnr_chance``, ``ssim``, ``ssim_chance`` (an attack record, or the means
            of several; a missing or ``None`` value counts as not comparable).
    """
    p, q = below_chance(scores, "psnr"), below_chance(scores, "ssim")
    if at_chance(scores):
        return "PSNR and SSIM at or below chance: nothing recovered"
    if p:
        return "PSNR at or below chance, SSIM above it" if q is False else "PSNR at or below chance"
    if q:
        return "SSIM at or below chance, PSNR above it" if p is False else "SSIM at or below chance"
    return ""


def label_accuracy(recovered: np.ndarray, true: np.ndarray) -> float:
    """Fraction of true labels found in the recovered labels, counted as multisets (order-free)."""
    rec = list(np.asarray(recovered).tolist())
    hits = 0
    for label in np.asarray(true).tolist():
        if label in rec:
            rec.remove(label)
            hits += 1
    return hits / max(1, len(true))
