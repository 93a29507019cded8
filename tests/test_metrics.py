"""Metrics against hand-made label maps with known answers and against a plain-loop reimplementation."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from conftest import VOC2012, voc_sample_ids
from PIL import Image

from deeplab_cli.metrics import ConfusionMatrix, TrimapAccumulator, trimap_band

# -- a plain, independent implementation -----------------------------------------------------------------


def plain_counts(pairs, num_classes):
    """Confusion counts from (gt, pred) pixel pairs with Counter, skipping void."""
    counts = Counter((int(g), int(p)) for g, p in pairs if g != 255)
    matrix = [[counts.get((g, p), 0) for p in range(num_classes)] for g in range(num_classes)]
    return matrix


def plain_scores(matrix):
    n = len(matrix)
    ious, accs, freq = [], [], []
    total = sum(sum(row) for row in matrix)
    for c in range(n):
        tp = matrix[c][c]
        fn = sum(matrix[c]) - tp
        fp = sum(matrix[g][c] for g in range(n)) - tp
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else None)
        accs.append(tp / (tp + fn) if tp + fn else None)
        freq.append((tp + fn) / total if total else 0)
    present = [v for v in ious if v is not None]
    miou = sum(present) / len(present) if present else None
    acc_present = [v for v in accs if v is not None]
    pixel_acc = sum(matrix[c][c] for c in range(n)) / total if total else None
    fw = sum(f * (v or 0) for f, v in zip(freq, ious, strict=True)) if total else None
    return {
        "iou": ious,
        "miou": miou,
        "pixel_accuracy": pixel_acc,
        "mean_accuracy": sum(acc_present) / len(acc_present) if acc_present else None,
        "fw_iou": fw,
    }


def plain_band_pairs(gt, pred, width):
    """(gt, pred) of the non-void pixels within ``width`` (Euclidean) of a void pixel, by brute force."""
    h, w = gt.shape
    voids = [(y, x) for y in range(h) for x in range(w) if gt[y, x] == 255]
    pairs = []
    for y in range(h):
        for x in range(w):
            if gt[y, x] == 255 or not voids:
                continue
            d = min(math.hypot(y - vy, x - vx) for vy, vx in voids)
            if d <= width:
                pairs.append((gt[y, x], pred[y, x]))
    return pairs


def assert_matches_plain(cm: ConfusionMatrix, reference: dict) -> None:
    iou = cm.iou()
    for c, expected in enumerate(reference["iou"]):
        if expected is None:
            assert np.isnan(iou[c])
        else:
            assert iou[c] == pytest.approx(expected)
    for key, value in (
        ("miou", cm.miou()),
        ("pixel_accuracy", cm.pixel_accuracy()),
        ("mean_accuracy", cm.mean_accuracy()),
        ("fw_iou", cm.fw_iou()),
    ):
        if reference[key] is None:
            assert np.isnan(value), key
        else:
            assert value == pytest.approx(reference[key]), key


# -- hand-made label maps --------------------------------------------------------------------------------


def test_known_small_case():
    gt = np.array([[0, 0], [1, 1]], dtype=np.uint8)
    pred = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    cm = ConfusionMatrix(2)
    cm.update(gt, pred)
    assert cm.iou().tolist() == pytest.approx([1 / 2, 2 / 3])
    assert cm.miou() == pytest.approx(7 / 12)
    assert cm.pixel_accuracy() == pytest.approx(3 / 4)
    assert cm.mean_accuracy() == pytest.approx(3 / 4)
    assert cm.fw_iou() == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_absent_and_false_positive_classes_and_void():
    gt = np.array([[0, 0, 255], [1, 1, 255]], dtype=np.uint8)
    pred = np.array([[0, 3, 2], [1, 1, 2]], dtype=np.uint8)  # class 3 predicted, never in GT; class 2 on void
    cm = ConfusionMatrix(5)
    cm.update(gt, pred)
    iou = cm.iou()
    assert iou[0] == pytest.approx(1 / 2)
    assert iou[1] == pytest.approx(1.0)
    assert np.isnan(iou[2])  # only predicted on void pixels: ignored, so absent
    assert iou[3] == 0.0  # false positive only: counts as 0 in the mean
    assert np.isnan(iou[4])
    assert cm.absent_classes() == [2, 4]
    assert cm.miou() == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert cm.total == 4
    summary = cm.summary(["a", "b", "c", "d", "e"])
    assert summary["absent_classes"] == ["c", "e"]
    assert summary["per_class_iou"]["c"] is None


def test_all_void_image_scores_nothing():
    gt = np.full((4, 5), 255, dtype=np.uint8)
    pred = np.zeros((4, 5), dtype=np.uint8)
    cm = ConfusionMatrix(3)
    cm.update(gt, pred)
    assert cm.total == 0
    assert np.isnan(cm.miou()) and np.isnan(cm.pixel_accuracy()) and np.isnan(cm.fw_iou())
    trimap = TrimapAccumulator(3, max_width=5)
    trimap.update(gt, pred)
    assert trimap.matrices().sum() == 0
    assert np.isnan(trimap.pixel_accuracy()).all()


def test_excluded_class_is_left_out_of_means():
    gt = np.array([[1, 2], [2, 1]], dtype=np.uint8)
    pred = np.array([[0, 2], [2, 1]], dtype=np.uint8)  # predicting class 0 on a labelled pixel
    cm = ConfusionMatrix(3, exclude=(0,))
    cm.update(gt, pred)
    assert np.isnan(cm.iou()[0])
    assert cm.iou()[1] == pytest.approx(1 / 2)  # the miss still counts against class 1
    assert cm.miou() == pytest.approx((0.5 + 1.0) / 2)
    assert cm.absent_classes() == []


def test_bad_labels_are_reported():
    from deeplab_cli.errors import DeeplabError

    cm = ConfusionMatrix(3)
    with pytest.raises(
        DeeplabError, match=r"label\(s\) 7 outside the class range 0..2 \(and not the ignore value 255\)"
    ):
        cm.update(np.array([[7]], dtype=np.uint8), np.array([[0]], dtype=np.uint8))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.array([[7]], dtype=np.uint8), np.array([[0]], dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))


def test_trimap_line_with_known_bands():
    gt = np.array([[255, 1, 1, 1, 1, 0, 0, 0, 0, 0]], dtype=np.uint8)
    pred = np.array([[0, 1, 0, 1, 1, 0, 0, 0, 0, 1]], dtype=np.uint8)
    trimap = TrimapAccumulator(2, max_width=40)
    trimap.update(gt, pred)
    acc = trimap.pixel_accuracy()
    assert acc[0] == pytest.approx(1.0)  # w=1: pixel 1
    assert acc[1] == pytest.approx(1 / 2)  # w=2: pixels 1, 2
    assert acc[2] == pytest.approx(2 / 3)
    assert acc[8] == pytest.approx(7 / 9)  # w=9: the whole image but the void pixel
    assert acc[39] == pytest.approx(7 / 9)  # widths beyond the image change nothing
    assert [int(m.sum()) for m in trimap.matrices()][:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 9]
    # mIoU at w=2: class 1 TP 1, FN 1 -> 1/2; class 0 FP 1 -> 0
    assert trimap.miou()[1] == pytest.approx(0.25)


def test_trimap_distance_is_euclidean():
    gt = np.zeros((3, 3), dtype=np.uint8)
    gt[0, 0] = 255
    band = trimap_band(gt, max_width=40)
    bins = dict(zip(band.index.tolist(), band.bin.tolist(), strict=True))
    assert bins[1] == 1 and bins[3] == 1  # 4-neighbours at distance 1
    assert bins[4] == 2  # diagonal at sqrt(2): outside the 1-px band
    assert bins[8] == 3  # (2, 2) at sqrt(8) = 2.83
    assert 0 not in bins  # the void pixel itself


def test_trimap_image_without_void_contributes_nothing():
    gt = np.ones((6, 6), dtype=np.uint8)
    trimap = TrimapAccumulator(2, max_width=3)
    trimap.update(gt, gt)
    assert trimap.matrices().sum() == 0


# -- real VOC ground truth ---------------------------------------------------------------------------------


def _voc_masks(n: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(VOC2012 / "SegmentationClass" / f"{i}.png")) for i in voc_sample_ids(n)]


def _perturb(gt: np.ndarray, seed: int) -> np.ndarray:
    """A plausible wrong prediction: shifted mask, void filled, some pixels set to random classes."""
    rng = np.random.default_rng(seed)
    pred = np.roll(gt, (3, -5), axis=(0, 1)).copy()
    pred[pred == 255] = 0
    noise = rng.random(gt.shape) < 0.05
    pred[noise] = rng.integers(0, 21, noise.sum())
    return pred


def test_confusion_matrix_matches_plain_loop_on_voc_masks():
    masks = _voc_masks(4)
    cm = ConfusionMatrix(21)
    pairs = []
    for k, gt in enumerate(masks):
        pred = _perturb(gt, k)
        cm.update(gt, pred)
        pairs += list(zip(gt.ravel().tolist(), pred.ravel().tolist(), strict=True))
    assert cm.matrix.tolist() == plain_counts(pairs, 21)
    assert_matches_plain(cm, plain_scores(plain_counts(pairs, 21)))
    assert 0.0 < cm.miou() < 1.0


@pytest.mark.parametrize("width", [1, 3, 8, 40])
def test_trimap_matches_brute_force_on_voc_crops(width):
    trimap = TrimapAccumulator(21, max_width=40)
    pairs = []
    for k, gt in enumerate(_voc_masks(3)):
        h, w = gt.shape
        ys, xs = np.nonzero(gt == 255)  # centre the crop on a void pixel: the band is what we test
        cy = int(np.clip(ys[len(ys) // 2], 30, h - 30))
        cx = int(np.clip(xs[len(xs) // 2], 40, w - 40))
        crop = (slice(cy - 30, cy + 30), slice(cx - 40, cx + 40))
        gt_crop = np.ascontiguousarray(gt[crop])
        pred_crop = np.ascontiguousarray(_perturb(gt, k)[crop])
        assert (gt_crop == 255).any()
        trimap.update(gt_crop, pred_crop)
        pairs += plain_band_pairs(gt_crop, pred_crop, width)
    matrix = plain_counts(pairs, 21)
    assert trimap.matrices()[width - 1].tolist() == matrix
    reference = plain_scores(matrix)
    assert trimap.pixel_accuracy()[width - 1] == pytest.approx(reference["pixel_accuracy"])
    assert trimap.miou()[width - 1] == pytest.approx(reference["miou"])
