"""``deeplab eval`` on the real VOC sample with the real deeplabv3-mnv2-voc model.

The CLI's mIoU is checked against a separate plain computation from the label PNGs it saved
(--save-masks) and the ground truth; the trimap plot is opened and inspected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, VOC2012, VOC_ROOT, voc_sample_ids
from PIL import Image

MODEL = "deeplabv3-mnv2-voc"
N_PLAIN = 8
N_CRF = 3


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deeplab_cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "120"},
    )


def plain_miou(mask_dir: Path, ids: list[str]) -> tuple[float, dict[int, float]]:
    """mIoU over the classes present, from saved label PNGs and the VOC ground truth (255 ignored)."""
    counts: Counter = Counter()
    for image_id in ids:
        with Image.open(mask_dir / f"{image_id}.png") as saved:
            assert saved.mode == "P"
            pred = np.asarray(saved)
        gt = np.asarray(Image.open(VOC2012 / "SegmentationClass" / f"{image_id}.png"))
        keep = gt != 255
        counts.update(zip(gt[keep].tolist(), pred[keep].tolist(), strict=True))
    iou = {}
    for c in range(21):
        tp = counts[(c, c)]
        fn = sum(v for (g, _), v in counts.items() if g == c) - tp
        fp = sum(v for (_, p), v in counts.items() if p == c) - tp
        if tp + fn + fp:
            iou[c] = tp / (tp + fn + fp)
    return sum(iou.values()) / len(iou), iou


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    args = ["eval", "--dataset", "voc", "--split", "sample", "--data-root", str(VOC_ROOT), "--model", MODEL]
    args += ["--limit", str(N_PLAIN), "--json", str(out / "r.json"), "--plot", str(out / "trimap.png")]
    done = run_cli(*args, "--save-masks", str(out / "masks"), "--no-crf")
    assert done.returncode == 0, done.stderr
    return {"out": out, "stdout": done.stdout, "json": json.loads((out / "r.json").read_text())}


@pytest.fixture(scope="module")
def crf_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval_crf")
    args = [
        "eval",
        "--split",
        "sample",
        "--data-root",
        str(VOC_ROOT),
        "--model",
        MODEL,
        "--limit",
        str(N_CRF),
    ]
    args += [
        "--crf",
        "--crf-iterations",
        "5",
        "--json",
        str(out / "r.json"),
        "--plot",
        str(out / "trimap.png"),
    ]
    done = run_cli(*args, "--save-masks", str(out / "masks"))
    assert done.returncode == 0, done.stderr
    return {"out": out, "stdout": done.stdout, "json": json.loads((out / "r.json").read_text())}


def test_cli_miou_equals_plain_computation_from_saved_masks(plain_run: dict):
    result = plain_run["json"]
    ids = voc_sample_ids(N_PLAIN)
    assert result["images"] == N_PLAIN and result["model"] == MODEL and result["crf"] is None
    assert sorted(p.stem for p in (plain_run["out"] / "masks").glob("*.png")) == sorted(ids)
    miou, per_class = plain_miou(plain_run["out"] / "masks", ids)
    assert result["no_crf"]["miou"] == pytest.approx(miou, abs=1e-12)
    names = result["class_names"]
    for c, name in enumerate(names):
        expected = per_class.get(c)
        got = result["no_crf"]["per_class_iou"][name]
        assert (got is None) if expected is None else got == pytest.approx(expected, abs=1e-12)
    assert set(result["no_crf"]["absent_classes"]) == {names[c] for c in range(21) if c not in per_class}
    # the real model on (training) images it has seen: a sane, high score
    assert 0.6 < miou <= 1.0
    assert f"{100 * miou:.2f}" in plain_run["stdout"] and "mean IoU" in plain_run["stdout"]


def test_trimap_curves_rise_with_band_width(plain_run: dict):
    trimap = plain_run["json"]["no_crf"]["trimap"]
    assert trimap["widths"] == list(range(1, 41))
    pixels = trimap["pixels"]
    assert all(a <= b for a, b in zip(pixels, pixels[1:], strict=False)) and pixels[0] > 0
    acc = trimap["pixel_accuracy"]
    # errors concentrate at object boundaries: accuracy in the narrowest band is the lowest
    assert acc[0] < acc[-1] <= 1.0


def test_plot_is_a_real_png(plain_run: dict, crf_run: dict):
    for run in (plain_run, crf_run):
        with Image.open(run["out"] / "trimap.png") as image:
            assert image.format == "PNG" and image.size == (1000, 400)
            rgb = np.asarray(image.convert("RGB"))
        colours = np.unique(rgb.reshape(-1, 3), axis=0)
        assert len(colours) > 20 and rgb.std() > 10
        blue = np.all(np.abs(rgb.astype(int) - (31, 119, 180)) < 30, axis=2).sum()  # "no CRF" line
        red = np.all(np.abs(rgb.astype(int) - (214, 39, 40)) < 30, axis=2).sum()  # "CRF" line
        assert blue > 200
        assert (red > 200) == (run is crf_run)


def test_crf_run_scores_both_from_saved_masks(crf_run: dict):
    result = crf_run["json"]
    ids = voc_sample_ids(N_CRF)
    assert result["crf_params"]["iterations"] == 5 and result["crf_params"]["bi_xy_std"] > 0
    plain, _ = plain_miou(crf_run["out"] / "masks", ids)
    refined, _ = plain_miou(crf_run["out"] / "masks" / "crf", ids)
    assert result["no_crf"]["miou"] == pytest.approx(plain, abs=1e-12)
    assert result["crf"]["miou"] == pytest.approx(refined, abs=1e-12)
    assert refined != plain  # the CRF changed the labels
    assert "IoU % CRF" in crf_run["stdout"]


def test_missing_ids_are_an_error_or_skipped(tmp_path: Path):
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{voc_sample_ids(1)[0]}\n2099_000001\n")
    base = ["eval", "--split", "sample", "--data-root", str(VOC_ROOT), "--model", MODEL, "--ids", str(ids)]
    failed = run_cli(*base)
    assert failed.returncode == 1 and "2099_000001" in failed.stderr and "deeplab: error:" in failed.stderr
    done = run_cli(*base, "--allow-missing", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["images"] == 1 and result["missing"] == ["2099_000001"]
    assert "skipped 1 ids" in done.stdout


def test_bad_scales_are_a_usage_error():
    done = run_cli("eval", "--split", "sample", "--data-root", str(VOC_ROOT), "--scales", "1,-2")
    assert done.returncode == 2 and "--scales" in done.stderr


# -- library: multi-scale and flip --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter():
    from deeplab_cli.runtime import Segmenter

    return Segmenter(MODEL, device="cpu")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.open(VOC2012 / "JPEGImages" / f"{voc_sample_ids(1)[0]}.jpg").convert("RGB"))


def test_single_scale_matches_the_runtime(segmenter, image):
    from deeplab_cli.geometry import labels_of

    ours = labels_of(segmenter.scores(image)[0])
    runtime = segmenter.predict(image).labels
    assert (ours == runtime).mean() > 0.9999


def test_flip_average_is_mirror_symmetric(segmenter, image):
    mirrored = np.ascontiguousarray(image[:, ::-1])
    a = segmenter.scores(image, flip=True)[0]
    b = segmenter.scores(mirrored, flip=True)[0]
    np.testing.assert_allclose(a, b[:, :, ::-1], rtol=1e-5, atol=1e-4)
    plain = segmenter.scores(image)[0]
    assert not np.allclose(a, plain)  # the mirrored run contributed


def test_multiscale_max_fusion_and_alignment(segmenter, image):
    from deeplab_cli.geometry import labels_of

    half = segmenter.scores(image, scales=(0.5,))[0]
    full = segmenter.scores(image, scales=(1.0,))[0]
    fused = segmenter.scores(image, scales=(0.5, 1.0))[0]
    assert half.shape == full.shape == (21, *image.shape[:2])
    np.testing.assert_allclose(fused, np.maximum(half, full), rtol=1e-6, atol=1e-5)
    # half-scale scores land on the right pixels: labels agree with full scale nearly everywhere
    assert (labels_of(half) == labels_of(full)).mean() > 0.85
