"""The examples in examples/ really run against ../shared and produce what they claim."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGES
from PIL import Image

from deeplab_cli.runtime import Segmenter

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def env_with_deeplab_on_path() -> dict[str, str]:
    """The current environment with this interpreter's folder first on PATH (its `deeplab` or `python`)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_segment_folder_script(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", EXAMPLES / "segment_folder.sh", IMAGES, tmp_path],
        capture_output=True,
        text=True,
        env=env_with_deeplab_on_path(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "images segmented: 4, failed: 0" in result.stdout
    assert "horse" in result.stdout and "bird" in result.stdout
    rows = (tmp_path / "classes.tsv").read_text().splitlines()
    assert any(row.split("\t")[1] == "horse" for row in rows)
    # the script's masks are the library's labels under the model's upstream protocol (the golden mask of
    # this image, made at its own size, is checked against `--resize native` in test_protocol/test_runtime)
    photo = IMAGES / "segmentation_input_rotation0.jpg"
    mask = np.array(Image.open(tmp_path / "masks" / "segmentation_input_rotation0.png"))
    assert np.array_equal(mask, Segmenter("deeplabv3-mnv2-dm05-voc").predict(str(photo)).labels)


def test_python_api_example(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, EXAMPLES / "python_api.py", IMAGES, tmp_path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "segmentation_input_rotation0.jpg: background, horse, person" in result.stdout
    assert "dog_segmentation.bmp: background, dog" in result.stdout
    photos = [p for p in IMAGES.iterdir() if p.suffix in (".jpg", ".bmp") and "mask" not in p.name]
    first = sorted(photos)[0]
    assert Image.open(tmp_path / f"{first.stem}.png").mode == "P"
    assert (tmp_path / f"{first.stem}.overlay.jpg").exists()
