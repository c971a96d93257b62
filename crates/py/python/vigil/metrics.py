"""Evaluation metrics on NumPy arrays, computed by vigil's metrics crate (the figures ``vigil test``
reports): exact, ties grouped as scikit-learn groups them, inputs checked (a single class, lengths
that differ or non-finite scores raise :class:`vigil.VigilError`).

Image level: ``scores`` (N,) and ``labels`` (N,), True for anomalous.
Pixel level: ``maps``, a list of (H, W) float arrays or an (N, H, W) array, and ``masks`` of the
same shapes, True for anomalous pixels.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np

from . import _vigil

__all__ = ["auroc", "average_precision", "f1_max", "pixel_auroc", "aupro", "mean_iou_at"]

Planes = Union[np.ndarray, Sequence[np.ndarray]]


def _image_level(scores: Sequence[float], labels: Sequence[bool]) -> Tuple[np.ndarray, np.ndarray]:
    return (
        np.ascontiguousarray(np.asarray(scores, dtype=np.float64).ravel()),
        np.ascontiguousarray(np.asarray(labels).astype(bool).ravel()),
    )


def _pixel_level(maps: Planes, masks: Planes):
    m = [np.ascontiguousarray(np.asarray(x, dtype=np.float32)) for x in maps]
    g = [np.ascontiguousarray(np.asarray(x).astype(bool)) for x in masks]
    for i, x in enumerate(m + g):
        if x.ndim != 2:
            raise _vigil.VigilError(f"maps and masks are (H, W) planes; plane {i % max(len(m), 1)} has shape {x.shape}")
    return m, g


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of image scores (anomalous = positive)."""
    return _vigil.auroc(*_image_level(scores, labels))


def average_precision(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Average precision (area under the precision-recall curve, as scikit-learn computes it)."""
    return _vigil.average_precision(*_image_level(scores, labels))


def f1_max(scores: Sequence[float], labels: Sequence[bool]) -> Tuple[float, float]:
    """The best F1 over all thresholds, and the threshold that gives it."""
    return _vigil.f1_max(*_image_level(scores, labels))


def pixel_auroc(maps: Planes, masks: Planes) -> float:
    """ROC AUC over every pixel of every map, pooled."""
    return _vigil.pixel_auroc(*_pixel_level(maps, masks))


def aupro(maps: Planes, masks: Planes, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised (MVTec AD 2021
    protocol; 0.3 is the standard limit)."""
    return _vigil.aupro(*_pixel_level(maps, masks), float(fpr_limit))


def mean_iou_at(maps: Planes, masks: Planes, threshold: float) -> float:
    """Mean over images of the IoU between ``map > threshold`` and the mask."""
    return _vigil.mean_iou_at(*_pixel_level(maps, masks), float(threshold))
