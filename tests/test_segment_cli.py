"""``deeplab segment`` end to end on the real models and images in ../shared."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGES, VOC2012, voc_sample_ids
from PIL import Image
from segment_helpers import DM05, invoke, run_process

from deeplab_cli.files import TMP_SUFFIX
from deeplab_cli.runtime import Segmenter


@pytest.fixture(scope="module")
def api() -> Segmenter:
    return Segmenter(DM05, device="cpu")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """photos/{a/1.jpg, a/2.jpg, b/c/3.jpg, b/dog.bmp}: real images in nested folders."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "b" / "c").mkdir(parents=True)
    ids = voc_sample_ids(3)
    os.symlink(VOC2012 / "JPEGImages" / f"{ids[0]}.jpg", root / "a" / "1.jpg")
    shutil.copy(VOC2012 / "JPEGImages" / f"{ids[1]}.jpg", root / "a" / "2.jpg")
    shutil.copy(VOC2012 / "JPEGImages" / f"{ids[2]}.jpg", root / "b" / "c" / "3.jpg")
    shutil.copy(IMAGES / "dog_segmentation.bmp", root / "b" / "dog.bmp")
    return root


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_folder_with_subfolders_json_lines(photos: Path, tmp_path: Path, api: Segmenter) -> None:
    out = tmp_path / "out"
    result = invoke(["segment", photos, "-o", out, "--model", DM05, "--json", "--overlay", "-b", "2"])
    assert result.code == 0, result.stderr
    records = json_lines(result.text)
    assert [os.path.relpath(r["input"], photos) for r in records] == [
        "a/1.jpg",
        "a/2.jpg",
        "b/c/3.jpg",
        "b/dog.bmp",
    ]
    assert (out / ".deeplab-output").is_file()  # the output folder is marked as ours
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name[0] != ".")
    assert written == [
        "a/1.overlay.jpg", "a/1.png", "a/2.overlay.jpg", "a/2.png",
        "b/c/3.overlay.jpg", "b/c/3.png", "b/dog.overlay.jpg", "b/dog.png",
    ]  # fmt: skip
    for record in records:
        assert record["status"] == "ok"
        assert set(record["outputs"]) == {"mask", "overlay"}
        mask = np.array(Image.open(record["outputs"]["mask"]))
        assert mask.shape == (record["size"]["height"], record["size"]["width"])
        assert np.array_equal(mask, api.predict(record["input"]).labels)
        fractions = {c["name"]: c["fraction"] for c in record["classes"]}
        present, counts = np.unique(mask, return_counts=True)
        assert len(fractions) == len(present)
        for index, count in zip(present, counts, strict=True):
            assert abs(fractions[api.class_names[index]] - count / mask.size) < 1e-5
        assert {"decode", "infer", "upsample", "write"} <= set(record["timings"])
    assert "4 inputs: 4 done" in result.stderr


def test_stdin_list_and_stdout_png(photos: Path, tmp_path: Path, api: Segmenter) -> None:
    listing = "\n".join(str(p) for p in sorted(photos.rglob("*.jpg"))) + "\n"
    out = tmp_path / "out"
    result = run_process(["segment", "-", "-o", out, "--model", DM05, "-q"], stdin=listing.encode())
    assert result.code == 0, result.stderr
    assert result.stderr == ""  # --quiet
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["a/1.png", "a/2.png", "b/c/3.png"]

    image = IMAGES / "segmentation_input_rotation0.jpg"
    result = run_process(["segment", image, "-o", "-", "--model", DM05, "-q"])
    assert result.code == 0, result.stderr
    png = Image.open(io.BytesIO(result.stdout))
    assert png.format == "PNG" and png.mode == "P"
    assert np.array_equal(np.array(png), api.predict(image).labels)


def test_skip_existing(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = invoke(["segment", photos / "a", "-o", out, "--model", DM05, "-q"])
    assert first.code == 0
    stamp = (out / "1.png").stat().st_mtime_ns
    (out / "2.png").unlink()
    again = invoke(["segment", photos / "a", "-o", out, "--model", DM05, "--skip-existing", "--json", "-q"])
    assert again.code == 0
    statuses = {os.path.basename(r["input"]): r["status"] for r in json_lines(again.text)}
    assert statuses == {"1.jpg": "skipped", "2.jpg": "ok"}
    assert (out / "1.png").stat().st_mtime_ns == stamp and (out / "2.png").exists()


def test_shards_cover_every_input_once(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[str] = []
    for index in range(3):
        result = invoke(
            ["segment", photos, "-o", out, "--model", DM05, "--shard", f"{index}/3", "--json", "-q"]
        )
        assert result.code == 0
        seen += [r["input"] for r in json_lines(result.text)]
    assert sorted(seen) == sorted(str(p) for p in photos.rglob("*") if p.is_file())
    assert len(seen) == len(set(seen)) == 4
    assert len(list(out.rglob("*.png"))) == 4


def test_scores_outputs(tmp_path: Path, api: Segmenter) -> None:
    image = IMAGES / "dog_segmentation.bmp"  # 128 x 128; the model's protocol decides the network input
    out = tmp_path / "out"
    result = invoke(["segment", image, "-o", out, "--model", DM05, "--scores", "logits", "--json", "-q"])
    (record,) = json_lines(result.text)
    logits = np.load(out / "dog_segmentation.logits.npy")
    direct = api.predict(image)
    height, width = direct.input_size
    stride = api.spec.output_stride
    assert logits.dtype == np.float16 and logits.shape == direct.logits.shape
    assert record["scores"] == {
        "kind": "logits", "shape": list(logits.shape), "input_size": [height, width],
        "padded_size": list(direct.padded_size), "crop_box": [0, 0, height, width], "output_stride": stride,
    }  # fmt: skip
    assert logits.shape[1:] == tuple((side - 1) // stride + 1 for side in direct.padded_size)
    assert np.allclose(logits, api.predict(image).logits, atol=0.05)
    result = invoke(["segment", image, "-o", out, "--model", DM05, "--scores", "probs", "--no-mask", "-q"])
    assert result.code == 0
    with np.load(out / "dog_segmentation.probs.npz") as data:
        probs = data["probs"]
    assert probs.shape == (21, 128, 128) and probs.dtype == np.float16
    assert (probs.argmax(axis=0) == api.predict(image).labels).mean() >= 0.999
    assert not list(out.rglob("*" + TMP_SUFFIX))


def test_default_model_and_verbose(tmp_path: Path) -> None:
    result = invoke(["segment", IMAGES / "bird_segmentation.bmp", "-o", tmp_path, "-v"])
    assert result.code == 0
    assert "deeplabv3-mnv2-voc on CPUExecutionProvider" in result.stderr
    assert f"ok: {IMAGES / 'bird_segmentation.bmp'} -> {tmp_path / 'bird_segmentation.png'}" in result.stderr
    labels = np.array(Image.open(tmp_path / "bird_segmentation.png"))
    assert (labels == 3).mean() > 0.15  # the bird


def test_crf_refines_with_the_model_defaults(tmp_path: Path, api: Segmenter) -> None:
    from deeplab_cli.crf import CRFParams, refine

    image_path = IMAGES / "dog_segmentation.bmp"
    result = invoke(
        ["segment", image_path, "-o", tmp_path, "--model", DM05, "--crf", "--crf-iterations", "5", "--json"]
    )
    assert result.code == 0, result.stderr
    (record,) = json_lines(result.text)
    assert record["timings"]["crf"] > 0
    mask = np.array(Image.open(tmp_path / "dog_segmentation.png"))
    prediction = api.predict(image_path, return_probs=True)
    params = CRFParams.from_dict(api.spec.crf).replace(iterations=5)
    expected = refine(np.array(Image.open(image_path).convert("RGB")), prediction.probs, params).argmax(
        axis=0
    )
    assert (mask == expected).mean() >= 0.999


def test_readme_python_use_case(tmp_path: Path, api: Segmenter) -> None:
    """The README's `segment_files` snippet: what `deeplab segment` does, from Python."""
    from deeplab_cli.batch import SegmentOptions, segment_files

    records = []
    summary = segment_files(
        [str(IMAGES)], tmp_path / "masks", SegmentOptions(overlay=True), api, on_record=records.append
    )
    assert summary.failed == 0 and summary.ok == len(records) >= 2
    for record in records:
        mask = np.array(Image.open(record.outputs["mask"]))
        assert np.array_equal(mask, api.predict(record.input).labels)
