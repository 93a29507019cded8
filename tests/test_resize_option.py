"""``--resize``: the model's upstream rule by default; the image's own size or a set longer side on request.

The same option reaches ``segment``, ``eval`` and ``crf tune`` and gives what ``Segmenter(resize=...)`` gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGES, VOC_ROOT
from PIL import Image
from segment_helpers import DM05, invoke

from deeplab_cli.runtime import Segmenter

DOG = IMAGES / "dog_segmentation.bmp"  # 128 x 128: the VOC rule enlarges it to 513


@pytest.mark.parametrize("resize", ["protocol", "native", 300])
def test_segment_resize_matches_the_library(resize: str | int, tmp_path: Path) -> None:
    result = invoke(["segment", DOG, "-o", tmp_path, "-m", DM05, "--resize", str(resize), "-q"])
    assert result.code == 0, result.stderr
    mask = np.array(Image.open(tmp_path / "dog_segmentation.png"))
    expected = Segmenter(DM05, resize=resize).predict(str(DOG)).labels
    assert mask.shape == (128, 128)
    assert np.array_equal(mask, expected)


def test_resize_changes_the_thumbnail_result() -> None:
    """The upstream demo's enlargement is what makes the 128 px dog a dog (issue 9's measurement)."""
    dog, cat = 12, 8  # VOC class indices
    demo = Segmenter("deeplabv3-mnv2-voc").predict(str(DOG)).labels
    native = Segmenter("deeplabv3-mnv2-voc", resize="native").predict(str(DOG)).labels
    assert (demo == dog).mean() > 0.4 and (demo == cat).mean() < 0.01
    assert (native == cat).mean() > 0.4 and (native == dog).mean() < 0.05


@pytest.mark.parametrize("bad", ["0", "-5", "big", "1.5"])
def test_bad_resize_is_a_usage_error(bad: str, tmp_path: Path) -> None:
    result = invoke(["segment", DOG, "-o", tmp_path, "--resize", bad])
    assert result.code == 2
    assert "protocol, native or a positive number" in result.stderr


def test_eval_records_the_override(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    args = ["eval", "--dataset", "voc", "--split", "sample", "--data-root", VOC_ROOT, "-m", DM05]
    result = invoke([*args, "--limit", "2", "--resize", "native", "--json", out, "-q"])
    assert result.code == 0, result.stderr
    protocol = json.loads(out.read_text())["protocol"]
    assert protocol["resize"] == "none"
    assert "513" not in protocol["text"].split("pad")[0]
