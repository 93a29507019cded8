"""Colour palettes for label maps (VOC, Cityscapes, ADE20K), palette PNG encoding and colour overlays.

Label maps are written as palette ("P") PNGs, so pixel values stay class indices and viewers still show
colours. Models with more than 256 classes cannot use a palette PNG: their labels are written as 16-bit
greyscale PNGs (values = class indices, no colours).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

# Cityscapes trainId 0..18 colours (cityscapesScripts labels.py).
_CITYSCAPES = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip

# ADE20K: index 0 ("others") black, then the 150 scene-parsing class colours (TF DeepLab / MIT CSAIL).
_ADE20K = [
    (0, 0, 0), (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
]  # fmt: skip


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC bit-interleaved colour map: class c gets its bits spread over R, G, B (MSB first)."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[index] = (r, g, b)
    return colours


@cache
def _table(name: str) -> np.ndarray:
    if name == "voc":
        return voc_colormap(256)
    # Classes beyond a named list fall back to the VOC map, so every index has a distinct colour.
    base = voc_colormap(256)
    if name == "cityscapes":
        base[: len(_CITYSCAPES)] = _CITYSCAPES
    elif name == "ade20k":
        base[: len(_ADE20K)] = _ADE20K
    else:
        raise ValueError(f"unknown palette {name!r}; known: voc, cityscapes, ade20k")
    return base


def get_palette(name: str) -> np.ndarray:
    """A 256 x 3 uint8 colour table for a registry palette name (``voc``, ``cityscapes``, ``ade20k``)."""
    table = _table(name)
    table.flags.writeable = False
    return table


PALETTE_NAMES = ("voc", "cityscapes", "ade20k")


def colorize(labels: np.ndarray, palette: str | np.ndarray) -> np.ndarray:
    """An H x W x 3 uint8 RGB picture of a label map (indices >= 256 wrap around the table)."""
    table = get_palette(palette) if isinstance(palette, str) else np.asarray(palette, dtype=np.uint8)
    return table[labels.astype(np.intp, copy=False) % len(table)]


def label_image(labels: np.ndarray, palette: str | np.ndarray | None) -> Image.Image:
    """A Pillow image holding class indices: mode "P" with the palette when every value fits in a byte,
    else a 16-bit greyscale image (mode "I;16", no palette) for models with more than 256 classes.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be H x W, got shape {labels.shape}")
    height, width = labels.shape
    if labels.dtype == np.uint8 or labels.size == 0 or int(labels.max()) < 256:
        data = np.ascontiguousarray(labels, dtype=np.uint8)
        image = Image.frombytes("P", (width, height), data.tobytes())
        if palette is not None:
            table = get_palette(palette) if isinstance(palette, str) else np.asarray(palette, np.uint8)
            image.putpalette(table.reshape(-1).tobytes())
        return image
    return Image.frombytes("I;16", (width, height), np.ascontiguousarray(labels, dtype="<u2").tobytes())


OVERLAY_BAND_ROWS = 256


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: str | np.ndarray,
    alpha: float = 0.5,
    background: int | None = None,
) -> np.ndarray:
    """Blend the label colours onto an H x W x 3 uint8 RGB image: ``(1 - alpha) * image + alpha * colour``.

    Pixels of class ``background`` (e.g. 0 for VOC's "background"; ``None`` blends every class) keep the
    original image. Computed in bands of rows, so the float scratch stays small for a 24-megapixel photo.
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    out = np.empty(image.shape[:2] + (3,), dtype=np.uint8)
    for top in range(0, labels.shape[0], OVERLAY_BAND_ROWS):
        rows = slice(top, top + OVERLAY_BAND_ROWS)
        band, band_labels = image[rows, :, :3], labels[rows]
        colours = colorize(band_labels, palette)
        blended = band.astype(np.float32) * (1.0 - alpha) + colours.astype(np.float32) * alpha
        out[rows] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        if background is not None:
            keep = band_labels == background
            out[rows][keep] = band[keep]
    return out
