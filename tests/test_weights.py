"""The weight cache and its commands: mirror, offline errors, import by checksum or architecture, export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import IMAGES, WEIGHTS_MIRROR
from PIL import Image

from deeplab_cli import weights
from deeplab_cli.errors import WeightsError
from deeplab_cli.zoo import get_model

SMALL = "deeplabv3-mnv2-dm05-voc"  # the smallest float model: cheapest to convert
SMALL_FILE = WEIGHTS_MIRROR / SMALL / "deeplabv3_257_mv_gpu.tflite"


def run_cli(
    *args: str, home: Path, mirror: str = "", stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``deeplab`` in a subprocess with its own cache, offline."""
    env = {
        "DEEPLAB_HOME": str(home),
        "DEEPLAB_MIRROR": mirror,
        "DEEPLAB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [sys.executable, "-m", "deeplab_cli", *args], capture_output=True, text=True, env=env, input=stdin
    )


def session_home() -> Path:
    """The test session's shared cache (conftest), where converted models are reused."""
    return Path(os.environ["DEEPLAB_HOME"])


def models_json(home: Path) -> dict[str, dict]:
    result = run_cli("models", "--json", home=home)
    assert result.returncode == 0, result.stderr
    return {record["name"]: record for record in map(json.loads, result.stdout.splitlines())}


def test_offline_without_file_says_where_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPLAB_HOME", str(tmp_path))
    monkeypatch.setenv("DEEPLAB_MIRROR", "")
    spec = get_model(SMALL)
    with pytest.raises(
        WeightsError, match="deeplabv3_257_mv_gpu.tflite.*download.tensorflow.org.*weights import"
    ):
        weights.source_path(spec)


def test_mirror_file_with_wrong_checksum_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror" / "sub"
    mirror.mkdir(parents=True)
    (mirror / SMALL_FILE.name).write_bytes(b"not the model")
    monkeypatch.setenv("DEEPLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPLAB_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(WeightsError, match="not in the cache or a mirror"):
        weights.source_path(get_model(SMALL))


def test_fetch_from_mirror_converts_once_and_marks_ready(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert models_json(home)[SMALL]["ready"] is False
    result = run_cli("weights", "fetch", SMALL, "--mirror", str(WEIGHTS_MIRROR), "-q", home=home)
    assert result.returncode == 0, result.stderr
    onnx_file = home / "models" / f"{SMALL}.onnx"
    assert result.stdout.strip() == f"{SMALL}: {onnx_file}"
    assert models_json(home)[SMALL]["ready"] is True
    metadata = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    assert json.loads(metadata["deeplab.spec"])["name"] == SMALL
    stamp = onnx_file.stat().st_mtime_ns
    again = run_cli("weights", "fetch", SMALL, "--mirror", str(WEIGHTS_MIRROR), "-q", home=home)
    assert again.returncode == 0 and onnx_file.stat().st_mtime_ns == stamp  # no second conversion


def test_import_identifies_a_renamed_file_by_sha256(tmp_path: Path) -> None:
    renamed = tmp_path / "downloaded.bin"
    shutil.copyfile(SMALL_FILE, renamed)
    home = tmp_path / "home"
    result = run_cli("weights", "import", str(renamed), home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{SMALL}: ")
    assert (home / "sources" / SMALL_FILE.name).read_bytes() == SMALL_FILE.read_bytes()
    assert models_json(home)[SMALL]["ready"] is True


def test_import_of_unknown_file_asks_for_arch(tmp_path: Path) -> None:
    stranger = tmp_path / "finetuned.tflite"
    stranger.write_bytes(b"\x00" * 1000)
    result = run_cli("weights", "import", str(stranger), home=tmp_path / "home")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("deeplab: error: finetuned.tflite")
    assert "--arch and --name" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_import_with_wrong_arch_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli(
        "weights",
        "import",
        str(SMALL_FILE),
        "--arch",
        "deeplabv3plus-mnv2-ade20k",
        "--name",
        "x",
        home=tmp_path / "home",
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("deeplab: error:") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "models" / "x.onnx").exists()


def test_import_with_arch_makes_a_user_model(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    names = ["bg"] + [f"thing{i}" for i in range(1, 21)]
    classes.write_text("\n".join(names) + "\n")
    home = tmp_path / "home"
    result = run_cli(
        "weights",
        "import",
        str(SMALL_FILE),
        "--arch",
        SMALL,
        "--name",
        "my-model",
        "--classes",
        str(classes),
        home=home,
    )
    assert result.returncode == 0, result.stderr
    record = models_json(home)["my-model"]
    assert record["user"] is True and record["ready"] is True and record["num_classes"] == 21
    session = ort.InferenceSession(str(home / "models" / "my-model.onnx"), providers=["CPUExecutionProvider"])
    spec = json.loads(session.get_modelmeta().custom_metadata_map["deeplab.spec"])
    assert spec["class_names"] == names


def test_unknown_model_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("weights", "fetch", "no-such-model", home=tmp_path)
    assert result.returncode == 2
    assert "unknown model 'no-such-model'" in result.stderr


def _labels(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    return session.run(["logits"], {"image": batch})[0].argmax(axis=1)


def test_export_has_dynamic_batch_height_width(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    result = run_cli("export", SMALL, "-o", str(out), home=session_home(), mirror=str(WEIGHTS_MIRROR))
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "image"
    image = np.asarray(Image.open(IMAGES / "dog_segmentation.bmp").convert("RGB"), dtype=np.float32)
    one = image.transpose(2, 0, 1)[None, :, :121, :121]
    for height, width in ((121, 121), (57, 97)):
        batch = np.concatenate([one[:, :, :height, :width], one[:, :, :height, :width][..., ::-1]]).copy()
        logits = session.run(["logits"], {"image": batch})[0]
        stride = get_model(SMALL).output_stride
        assert logits.shape == (2, 21, (height - 1) // stride + 1, (width - 1) // stride + 1)
        single = session.run(["logits"], {"image": batch[1:]})[0]
        np.testing.assert_allclose(logits[1:], single, atol=1e-4)


def test_export_fp16_agrees_with_float32(tmp_path: Path) -> None:
    home, mirror = session_home(), str(WEIGHTS_MIRROR)
    assert run_cli("export", SMALL, "-o", str(tmp_path / "a.onnx"), home=home, mirror=mirror).returncode == 0
    result = run_cli("export", SMALL, "-o", str(tmp_path / "b.onnx"), "--fp16", home=home, mirror=mirror)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "b.onnx").stat().st_size < 0.7 * (tmp_path / "a.onnx").stat().st_size
    image = np.asarray(Image.open(IMAGES / "bird_segmentation.bmp").convert("RGB"), dtype=np.float32)
    batch = image.transpose(2, 0, 1)[None].copy()
    full = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    half = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    assert np.mean(_labels(full, batch) == _labels(half, batch)) >= 0.99
