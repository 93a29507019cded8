"""Input geometry: padding images to the model's protocol size and cropping the result back.

Normalisation is part of the exported ONNX graph, so the runtime feeds RGB values 0..255 and pads with
the model's mean colour (which the graph maps to 0, as TF DeepLab's evaluation does).
"""

from __future__ import annotations

import math

import numpy as np

from deeplab_cli.zoo import ModelSpec, Protocol


def padded_size(height: int, width: int, protocol: Protocol) -> tuple[int, int]:
    """The padded (H, W) for an image: at least ``min_size`` and of the form ``size_step * k + 1``."""

    def side(n: int) -> int:
        n = max(n, protocol.min_size)
        step = protocol.size_step
        return step * math.ceil((n - 1) / step) + 1

    return side(height), side(width)


def logits_size(padded: tuple[int, int], stride: int) -> tuple[int, int]:
    """Size of the stride-``stride`` logits for a padded input of size ``padded`` (align-corners)."""
    return (padded[0] - 1) // stride + 1, (padded[1] - 1) // stride + 1


def pad_batch(images: list[np.ndarray], size: tuple[int, int], spec: ModelSpec) -> np.ndarray:
    """Stack HxWx3 uint8 RGB images into an N x 3 x H x W float32 batch padded bottom/right with the mean."""
    height, width = size
    batch = np.empty((len(images), 3, height, width), dtype=np.float32)
    batch[:] = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    for index, image in enumerate(images):
        h, w = image.shape[:2]
        if h > height or w > width:
            raise ValueError(f"image of {h}x{w} does not fit the padded size {height}x{width}")
        batch[index, :, :h, :w] = image.transpose(2, 0, 1)
    return batch
