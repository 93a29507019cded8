"""``deeplab segment`` on bad inputs: each fails clearly (one line naming the file) and the batch goes on."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from conftest import IMAGES, VOC2012, voc_sample_ids
from PIL import Image
from segment_helpers import DM05, command, invoke

from deeplab_cli.files import TMP_SUFFIX

GOOD = IMAGES / "dog_segmentation.bmp"


def segment(*args: object) -> list[object]:
    return ["segment", *args, "--model", DM05]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("deeplab: error:")]


def check_one_failure(tmp_path: Path, bad: Path, reason: str) -> None:
    """``bad`` fails with one line naming it and ``reason``; the good image beside it is still done."""
    good = tmp_path / "good.bmp"
    shutil.copy(GOOD, good)
    result = invoke(segment(bad, good, "-o", tmp_path / "out"))
    assert result.code == 1
    (line,) = error_lines(result.stderr)
    assert str(bad) in line and reason in line
    assert (tmp_path / "out" / "good.png").exists()
    assert "2 inputs: 1 done, 0 skipped, 1 failed" in result.stderr


def test_missing_file(tmp_path: Path) -> None:
    check_one_failure(tmp_path, tmp_path / "missing.jpg", "no such file")


def test_text_file_named_jpg(tmp_path: Path) -> None:
    bad = tmp_path / "text.jpg"
    bad.write_text("this is not a JPEG\n")
    check_one_failure(tmp_path, bad, "not an image")


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = (VOC2012 / "JPEGImages" / f"{voc_sample_ids(1)[0]}.jpg").read_bytes()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 3])
    check_one_failure(tmp_path, bad, "truncated")


def test_zero_byte_file(tmp_path: Path) -> None:
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    check_one_failure(tmp_path, bad, "empty file")


def test_decompression_bomb(tmp_path: Path) -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 10^10 RGB pixels declared
    bad = tmp_path / "bomb.png"
    bad.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
    check_one_failure(tmp_path, bad, "100000x100000 pixels exceeds the limit")


def test_unknown_model(tmp_path: Path) -> None:
    result = invoke(["segment", GOOD, "-o", tmp_path, "--model", "no-such-model"])
    assert result.code == 2
    assert "unknown model 'no-such-model'" in result.stderr and "deeplabv3-mnv2-voc" in result.stderr


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file, not a folder\n")
    result = invoke(segment(GOOD, "-o", blocker / "out"))  # works as root too, unlike chmod
    assert result.code == 2
    assert f"cannot write to output folder {blocker / 'out'}" in result.stderr


def test_usage_errors(tmp_path: Path) -> None:
    bad_shard = invoke(segment(GOOD, "-o", tmp_path, "--shard", "2/2"))
    assert bad_shard.code == 2 and "invalid --shard" in bad_shard.stderr
    several = invoke(segment(GOOD, IMAGES / "bird_segmentation.bmp", "-o", "-"))
    assert several.code == 2 and "exactly one input" in several.stderr
    assert several.stdout == b""
    mixed = invoke(segment(GOOD, "-o", "-", "--json"))
    assert mixed.code == 2
    bad_device = invoke(segment(GOOD, "-o", tmp_path, "--device", "tpu"))
    assert bad_device.code == 2 and "invalid device" in bad_device.stderr


def test_cuda_without_gpu_is_an_error(tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a CUDA provider is installed here")
    result = invoke(segment(GOOD, "-o", tmp_path / "out", "--device", "cuda"))
    assert result.code == 2
    assert "--device cuda" in result.stderr and "onnxruntime-gpu" in result.stderr
    assert not (tmp_path / "out" / "dog_segmentation.png").exists()  # never a silent CPU run


def test_interrupted_run_then_resume(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    ids = voc_sample_ids(12)
    for image_id in ids:
        shutil.copy(VOC2012 / "JPEGImages" / f"{image_id}.jpg", source / f"{image_id}.jpg")
    out = tmp_path / "out"
    args = command(segment(source, "-o", out, "--json", "-q", "--workers", "1", "--sessions", "1"))
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.readline()  # the first image is done
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()
    assert "interrupted" in stderr.decode()
    done = sorted(out.glob("*.png"))
    assert 1 <= len(done) < len(ids)
    assert not [p for p in out.iterdir() if p.name.endswith(TMP_SUFFIX)]  # no half-written files
    for path in done:
        Image.open(path).load()
    result = invoke(segment(source, "-o", out, "--skip-existing"))
    assert result.code == 0
    assert f"{len(ids)} inputs: {len(ids) - len(done)} done, {len(done)} skipped, 0 failed" in result.stderr
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)
    assert os.listdir(out) == [p for p in os.listdir(out) if not p.endswith(TMP_SUFFIX)]
