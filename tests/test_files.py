"""Image reading (modes, EXIF orientation, limits, errors) and atomic writers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import png_header_only
from PIL import Image

from deeplab_cli import files as dio
from deeplab_cli.errors import ImageError

RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[10, 20, 30], [200, 100, 50], [0, 0, 0]]], np.uint8)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_rgb_png_and_jpeg(tmp_path: Path) -> None:
    assert np.array_equal(dio.read_image(save(Image.fromarray(RGB), tmp_path / "a.png")), RGB)
    jpeg = dio.read_image(save(Image.fromarray(RGB), tmp_path / "a.jpg", quality=100))
    assert jpeg.shape == (2, 3, 3) and jpeg.dtype == np.uint8


def test_greyscale_and_bilevel(tmp_path: Path) -> None:
    grey = np.array([[0, 128, 255]], np.uint8)
    out = dio.read_image(save(Image.fromarray(grey, "L"), tmp_path / "l.png"))
    assert out.shape == (1, 3, 3) and np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 2], grey)
    bilevel = dio.read_image(save(Image.fromarray(grey > 100), tmp_path / "b.png"))
    assert bilevel[0, :, 0].tolist() == [0, 255, 255]


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent
    out = dio.read_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    la = Image.fromarray(np.array([[[0, 255], [0, 0]]], np.uint8), "LA")
    out = dio.read_image(save(la, tmp_path / "la.png"))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def test_palette_images(tmp_path: Path) -> None:
    palette_image = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    out = dio.read_image(save(palette_image, tmp_path / "p.png"))
    assert np.abs(out.astype(int) - RGB.astype(int)).max() <= 8
    transparent = Image.new("P", (2, 1))
    transparent.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    transparent.putpixel((1, 0), 1)
    out = dio.read_image(save(transparent, tmp_path / "pt.png", transparency=0))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [255, 0, 0]


def test_cmyk(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    out = dio.read_image(save(cmyk, tmp_path / "c.jpg", quality=100))
    assert out.shape == (2, 2, 3)
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 60 and out[0, 0, 2] < 60


def test_16_bit_and_float(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 128, 65535]], np.uint16)
    path = save(Image.fromarray(values), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    out = dio.read_image(path)
    assert out[0, :, 0].tolist() == [0, 128, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    out = dio.read_image(save(floats, tmp_path / "f.tif"))
    assert out[0, :, 1].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[0, 0] = (255, 255, 255)  # top-left white in the stored (landscape) image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(Image.fromarray(pixels), tmp_path / "rotated.png", exif=exif)
    out = dio.read_image(path)
    assert out.shape == (4, 2, 3)  # displayed as portrait
    assert out[0, 1].tolist() == [255, 255, 255]  # the stored top-left ends top-right


def test_errors_name_file_and_reason(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="missing.png: no such file"):
        dio.read_image(tmp_path / "missing.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.jpg: empty file"):
        dio.read_image(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("hello, not a picture\n")
    with pytest.raises(ImageError, match="text.jpg: not an image"):
        dio.read_image(tmp_path / "text.jpg")
    data = _jpeg_bytes(tmp_path)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut.jpg: cannot decode image: truncated"):
        dio.read_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        dio.read_image(tmp_path)


def _jpeg_bytes(tmp_path: Path) -> bytes:
    rng = np.random.default_rng(0)
    path = save(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), tmp_path / "full.jpg")
    return path.read_bytes()


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(ImageError, match=r"bomb.png: image of 100000x100000 pixels exceeds the limit"):
        dio.read_image(path)
    with pytest.raises(ImageError, match="exceeds the limit of 5 pixels"):
        dio.read_image(save(Image.fromarray(RGB), tmp_path / "small.png"), max_pixels=5)


def test_sniffing_by_content(tmp_path: Path) -> None:
    png = save(Image.fromarray(RGB), tmp_path / "noext", format="PNG")
    assert dio.is_image_file(png)
    assert dio.is_image_file(save(Image.fromarray(RGB), tmp_path / "x.bmp"))
    assert dio.is_image_file(save(Image.fromarray(RGB), tmp_path / "x.webp"))
    assert dio.is_image_file(save(Image.fromarray(RGB), tmp_path / "x.tiff"))
    (tmp_path / "notes.jpg").write_text("text")
    assert not dio.is_image_file(tmp_path / "notes.jpg")
    assert not dio.is_image_file(tmp_path / "does-not-exist")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.png"
    dio.write_bytes(target, b"old")

    def broken(handle) -> None:
        handle.write(b"partial data")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        dio.atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]


def test_writers_round_trip(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float16).reshape(3, 2, 2)
    assert np.array_equal(np.load(dio.write_npy(tmp_path / "a.npy", array)), array)
    with np.load(dio.write_npz(tmp_path / "a.npz", {"probs": array})) as data:
        assert np.array_equal(data["probs"], array)
    assert json.loads(dio.write_json(tmp_path / "a.json", {"x": [1, 2]}).read_text()) == {"x": [1, 2]}
    picture = dio.read_image(dio.write_image(tmp_path / "a.png", RGB))
    assert np.array_equal(picture, RGB)
    assert dio.write_image(tmp_path / "a.jpg", RGB).read_bytes()[:3] == b"\xff\xd8\xff"
    assert not list(tmp_path.glob("*" + dio.TMP_SUFFIX))
