"""Palettes (VOC, Cityscapes, ADE20K), label PNG encoding and overlays."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deeplab_cli.files import encode_label_png
from deeplab_cli.palette import colorize, get_palette, label_image, overlay, voc_colormap
from deeplab_cli.zoo import registry_models


def test_voc_colormap_known_entries() -> None:
    colours = voc_colormap()
    assert colours.shape == (256, 3)
    assert tuple(colours[0]) == (0, 0, 0)
    assert tuple(colours[1]) == (128, 0, 0)  # aeroplane
    assert tuple(colours[2]) == (0, 128, 0)  # bicycle
    assert tuple(colours[3]) == (128, 128, 0)  # bird
    assert tuple(colours[15]) == (192, 128, 128)  # person
    assert tuple(colours[255]) == (224, 224, 192)  # void, the VOC boundary colour
    assert len({tuple(c) for c in colours}) == 256


def test_cityscapes_and_ade_palettes() -> None:
    city = get_palette("cityscapes")
    assert tuple(city[0]) == (128, 64, 128)  # road
    assert tuple(city[10]) == (70, 130, 180)  # sky
    assert tuple(city[18]) == (119, 11, 32)  # bicycle
    ade = get_palette("ade20k")
    assert tuple(ade[0]) == (0, 0, 0)  # "others"
    assert tuple(ade[1]) == (120, 120, 120)  # wall
    assert tuple(ade[150]) == (92, 0, 255)  # the 150th class
    assert len({tuple(c) for c in ade[:151]}) >= 148  # the upstream list repeats a few colours


def test_every_registry_palette_covers_its_classes() -> None:
    for spec in registry_models():
        table = get_palette(spec.palette)
        assert table.shape == (256, 3)
        assert spec.num_classes <= 256


def test_unknown_palette() -> None:
    with pytest.raises(ValueError, match="unknown palette"):
        get_palette("nope")


def test_label_png_keeps_class_indices() -> None:
    labels = np.arange(21, dtype=np.uint8).repeat(3).reshape(7, 9)
    data = encode_label_png(labels, "voc")
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P"
    assert np.array_equal(np.array(image), labels)
    assert image.getpalette()[3:6] == [128, 0, 0]


def test_label_png_16_bit_above_256_classes() -> None:
    labels = np.array([[0, 255, 256], [300, 1000, 65535]], dtype=np.uint16)
    image = label_image(labels, "ade20k")
    assert image.mode == "I;16"
    decoded = Image.open(io.BytesIO(encode_label_png(labels, "ade20k")))
    assert np.array_equal(np.array(decoded).astype(np.int64), labels.astype(np.int64))


def test_colorize_and_overlay() -> None:
    labels = np.array([[0, 1], [2, 15]], dtype=np.uint8)
    assert colorize(labels, "voc")[1, 1].tolist() == [192, 128, 128]
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    blended = overlay(image, labels, "voc", alpha=0.5, background=0)
    assert blended[0, 0].tolist() == [100, 100, 100]  # background left as is
    assert blended[0, 1].tolist() == [114, 50, 50]  # (100 + 128) / 2, 100 / 2, 100 / 2
    full = overlay(image, labels, "voc", alpha=1.0, background=None)
    assert np.array_equal(full, colorize(labels, "voc"))
    with pytest.raises(ValueError):
        overlay(image, labels[:1], "voc")
