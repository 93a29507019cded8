"""Segmentation metrics: a confusion matrix over a split, mIoU and friends, and the trimap band metric.

Conventions (PASCAL VOC, DeepLab papers):

- One confusion matrix is accumulated over the whole split (rows = ground truth, columns = prediction);
  ground-truth pixels equal to ``ignore_index`` (255, "void") are skipped.
- ``IoU_c = TP / (TP + FP + FN)``. A class absent from both the ground truth and the prediction has no
  IoU (NaN); the mean IoU averages the classes that have one, and :meth:`ConfusionMatrix.absent_classes`
  names the others so reports can list them. Classes in ``exclude`` (e.g. ADE20K's class 0 "others",
  which the challenge does not score) are left out of every mean.
- Trimap (DeepLab v1 Fig. 4, v2 Fig. 10): the band of width ``w`` is the set of non-void pixels whose
  **Euclidean distance** (between pixel centres, ``scipy.ndimage.distance_transform_edt``) to the nearest
  void pixel of the ground truth is at most ``w`` pixels. Void pixels are never scored. An image without
  void pixels contributes nothing to any band. Each pixel is binned once by ``ceil(distance)``; the
  confusion matrix of band ``w`` is the cumulative sum of the bins ``1..w``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from deeplab_cli.errors import DeeplabError

IGNORE_INDEX = 255  # the "void" label of VOC-style ground truth: not scored (the one definition)


class LabelError(DeeplabError, ValueError):
    """Ground truth and prediction do not fit together (shape, or a label outside the class range)."""


TRIMAP_MAX_WIDTH = 40


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> None:
    if gt.shape != pred.shape:
        raise LabelError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")


class ConfusionMatrix:
    """A ``num_classes x num_classes`` pixel count (rows: ground truth, columns: prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, exclude: Sequence[int] = ()):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.exclude = tuple(exclude)
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: ``gt`` and ``pred`` are integer label maps of the same shape."""
        _check_pair(gt, pred)
        n = self.num_classes
        gt = gt.ravel()
        pred = pred.ravel()
        valid = gt != self.ignore_index
        gt_valid = gt[valid].astype(np.int64)
        pred_valid = pred[valid].astype(np.int64)
        if gt_valid.size and (gt_valid.min() < 0 or gt_valid.max() >= n):
            bad = sorted({int(v) for v in np.unique(gt_valid) if v < 0 or v >= n})
            raise LabelError(
                f"ground-truth label(s) {', '.join(map(str, bad))} outside the class range 0..{n - 1} "
                f"(and not the ignore value {self.ignore_index})"
            )
        if pred_valid.size and (pred_valid.min() < 0 or pred_valid.max() >= n):
            raise LabelError(f"predicted labels outside 0..{n - 1}")
        self.matrix += np.bincount(gt_valid * n + pred_valid, minlength=n * n).reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix

    # -- metrics ---------------------------------------------------------------------------------------

    def _scored(self) -> np.ndarray:
        mask = np.ones(self.num_classes, dtype=bool)
        mask[list(self.exclude)] = False
        return mask

    @property
    def total(self) -> int:
        return int(self.matrix.sum())

    def iou(self) -> np.ndarray:
        """Per-class IoU (NaN where the class is in neither ground truth nor prediction, or excluded)."""
        return iou_from_matrix(self.matrix, self._scored())

    def miou(self) -> float:
        return _nanmean(self.iou())

    def class_accuracy(self) -> np.ndarray:
        """Per-class recall TP / (TP + FN) (NaN where the class has no ground-truth pixel, or excluded)."""
        tp = np.diag(self.matrix).astype(np.float64)
        gt_count = self.matrix.sum(axis=1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(gt_count > 0, tp / gt_count, np.nan)
        acc[~self._scored()] = np.nan
        return acc

    def mean_accuracy(self) -> float:
        return _nanmean(self.class_accuracy())

    def pixel_accuracy(self) -> float:
        return pixel_accuracy_from_matrix(self.matrix)

    def fw_iou(self) -> float:
        """Frequency-weighted IoU: sum over scored classes of (GT pixel share) x IoU."""
        gt_count = self.matrix.sum(axis=1).astype(np.float64)
        gt_count[~self._scored()] = 0
        total = gt_count.sum()
        if total == 0:
            return float("nan")
        iou = np.nan_to_num(self.iou())
        return float((gt_count / total * iou).sum())

    def absent_classes(self) -> list[int]:
        """Scored classes with no pixel in ground truth or prediction (IoU undefined)."""
        return [int(c) for c in np.flatnonzero(np.isnan(self.iou()) & self._scored())]

    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """A JSON-ready dict of every metric (percent values are left to the caller: these are 0..1)."""
        names = list(class_names) if class_names else [str(c) for c in range(self.num_classes)]
        return {
            "miou": _none_if_nan(self.miou()),
            "pixel_accuracy": _none_if_nan(self.pixel_accuracy()),
            "mean_accuracy": _none_if_nan(self.mean_accuracy()),
            "fw_iou": _none_if_nan(self.fw_iou()),
            "per_class_iou": dict(zip(names, _nan_to_none(self.iou()), strict=True)),
            "absent_classes": [names[c] for c in self.absent_classes()],
            "excluded_classes": [names[c] for c in self.exclude],
            "pixels": self.total,
        }


def iou_from_matrix(matrix: np.ndarray, scored: np.ndarray | None = None) -> np.ndarray:
    """Per-class IoU of one (C x C) or a stack (... x C x C) of confusion matrices."""
    tp = np.diagonal(matrix, axis1=-2, axis2=-1).astype(np.float64)
    union = matrix.sum(axis=-1) + matrix.sum(axis=-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    if scored is not None:
        iou[..., ~scored] = np.nan
    return iou


def pixel_accuracy_from_matrix(matrix: np.ndarray) -> float | np.ndarray:
    tp = np.diagonal(matrix, axis1=-2, axis2=-1).sum(axis=-1).astype(np.float64)
    total = matrix.sum(axis=(-2, -1)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(total > 0, tp / total, np.nan)
    return float(acc) if acc.ndim == 0 else acc


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _none_if_nan(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


# -- trimap -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Band:
    """The pixels of one ground truth that fall in some trimap band: flat indices, labels and their bin.

    Computed once per image (:func:`trimap_band`) and reused for every prediction of that image
    (e.g. before and after the CRF).
    """

    index: np.ndarray  # flat pixel indices, int64
    gt: np.ndarray  # their ground-truth labels, int64
    bin: np.ndarray  # ceil(distance to the nearest void pixel), 1..max_width, int64
    shape: tuple[int, int]


def trimap_band(gt: np.ndarray, max_width: int = TRIMAP_MAX_WIDTH, ignore_index: int = IGNORE_INDEX) -> Band:
    """Distance of each non-void pixel to the nearest void pixel, binned by ceil; pixels beyond
    ``max_width`` are dropped."""
    void = gt == ignore_index
    empty = np.zeros(0, dtype=np.int64)
    if not void.any() or void.all():
        return Band(empty, empty, empty, gt.shape)
    distance = ndimage.distance_transform_edt(~void)
    bins = np.ceil(distance).astype(np.int64).ravel()
    index = np.flatnonzero((bins >= 1) & (bins <= max_width))
    return Band(index, gt.ravel()[index].astype(np.int64), bins[index], gt.shape)


class TrimapAccumulator:
    """Confusion matrices inside the trimap bands of width 1..``max_width``, accumulated over a split."""

    def __init__(
        self,
        num_classes: int,
        max_width: int = TRIMAP_MAX_WIDTH,
        ignore_index: int = IGNORE_INDEX,
        exclude: Sequence[int] = (),
    ):
        self.num_classes = num_classes
        self.max_width = max_width
        self.ignore_index = ignore_index
        self.exclude = tuple(exclude)
        # bins[k] counts pixels whose ceil(distance) == k (k = 0 unused)
        self.bins = np.zeros((max_width + 1, num_classes, num_classes), dtype=np.int64)

    def band(self, gt: np.ndarray) -> Band:
        return trimap_band(gt, self.max_width, self.ignore_index)

    def update(self, gt: np.ndarray, pred: np.ndarray, band: Band | None = None) -> None:
        """Add one image; pass the :class:`Band` of ``gt`` when it was already computed."""
        _check_pair(gt, pred)
        band = band if band is not None else self.band(gt)
        if band.index.size == 0:
            return
        n = self.num_classes
        pred_band = pred.ravel()[band.index].astype(np.int64)
        flat = (band.bin * n + band.gt) * n + pred_band
        counts = np.bincount(flat, minlength=(self.max_width + 1) * n * n)
        self.bins += counts.reshape(self.max_width + 1, n, n)

    def matrices(self) -> np.ndarray:
        """``max_width x C x C``: the confusion matrix of band ``w`` at index ``w - 1``."""
        return np.cumsum(self.bins, axis=0)[1:]

    def widths(self) -> list[int]:
        return list(range(1, self.max_width + 1))

    def pixel_accuracy(self) -> np.ndarray:
        return np.asarray(pixel_accuracy_from_matrix(self.matrices()))

    def miou(self) -> np.ndarray:
        scored = np.ones(self.num_classes, dtype=bool)
        scored[list(self.exclude)] = False
        iou = iou_from_matrix(self.matrices(), scored)
        out = np.full(iou.shape[0], np.nan)
        for w, row in enumerate(iou):
            out[w] = _nanmean(row)
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "distance": "euclidean (scipy.ndimage.distance_transform_edt) to the nearest void pixel",
            "widths": self.widths(),
            "pixel_accuracy": _nan_to_none(self.pixel_accuracy()),
            "miou": _nan_to_none(self.miou()),
            "pixels": [int(m.sum()) for m in self.matrices()],
        }
