"""Segmenter.predict follows each model's upstream protocol on images of every size.

The reference is the ORIGINAL .tflite run by ai-edge-litert under the upstream preprocessing, written
here independently of ``deeplab_cli.geometry``: TF DeepLab's ``resize_to_range`` size rule spelled out
from its source, the align-corners bilinear resize done by ``torch.nn.functional.interpolate`` (which
samples input ``y * (in - 1) / (out - 1)``, as TF's ``resize_bilinear(align_corners=True)``), the DeepLab
demo's resize with Pillow's ANTIALIAS filter, padding with the mean, the graph's output cropped to the
resized image and resized to the original size (align-corners bilinear), argmax.

The images are real: the shared test images (128 x 128, 513 x 513) and real VOC photos resized to
768 x 512, 683 x 512 and 400 x 300, so that every case (enlarged, shrunk, both) is covered. Bounds:
ADE20K >= 99.0% of labels (the reference runtime agrees with itself on 99.3% under one-ulp input noise:
see test_fidelity), the VOC models >= 99.9%.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import IMAGES, VOC2012, voc_sample_ids
from PIL import Image
from test_fidelity import onnx_for, source_file
from tflite_reference import TFLiteReference

from deeplab_cli import geometry, zoo
from deeplab_cli.runtime import Segmenter

ADE20K = "deeplabv3plus-mnv2-ade20k"
SIZES = [(512, 768), (512, 683), (300, 400)]  # (height, width) of the resized real photos


def real_images() -> list[tuple[str, np.ndarray]]:
    """Shared images at their own size plus real VOC photos resized to the sizes above."""
    images = [
        (name, np.asarray(Image.open(IMAGES / name).convert("RGB")))
        for name in ("dog_segmentation.bmp", "bird_segmentation.bmp")
    ]
    for voc_id, (height, width) in zip(voc_sample_ids(len(SIZES)), SIZES, strict=True):
        photo = Image.open(VOC2012 / "JPEGImages" / f"{voc_id}.jpg").convert("RGB")
        images.append(
            (f"{voc_id} at {width}x{height}", np.asarray(photo.resize((width, height), Image.BICUBIC)))
        )
    return images


# -- the upstream preprocessing, spelled out --------------------------------------------------------------


def tf_resize_to_range(height: int, width: int, min_size: int, max_size: int, factor: int) -> tuple[int, int]:
    """tensorflow/models research/deeplab/core/preprocess_utils.py resize_to_range (float32 maths)."""
    f = np.float32
    max_size_f = f(max_size - (max_size - 1) % factor)
    large_scale = f(min_size) / f(min(height, width))
    new = [math.floor(f(height) * large_scale), math.floor(f(width) * large_scale)]
    if f(max(new)) > max_size_f:
        small_scale = max_size_f / f(max(height, width))
        new = [math.floor(f(height) * small_scale), math.floor(f(width) * small_scale)]
    return tuple(n + (factor - (n - 1) % factor) % factor for n in new)


def tf_resize_bilinear_align_corners(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float32 H x W x 3 image resized like tf.image.resize_bilinear(align_corners=True), unrounded."""
    tensor = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=True)
    return out[0].permute(1, 2, 0).numpy()


def demo_resize(rgb: np.ndarray, longer: int = 513) -> np.ndarray:
    """The official DeepLab demo: ratio = 513 / max(w, h); PIL resize to int(ratio * side), ANTIALIAS."""
    image = Image.fromarray(rgb)
    ratio = 1.0 * longer / max(image.size)
    target = (int(ratio * image.width), int(ratio * image.height))
    return np.asarray(image.resize(target, Image.LANCZOS)).astype(np.float32)


def reference_labels(
    reference: TFLiteReference, rgb: np.ndarray, resized: np.ndarray, corners: bool
) -> np.ndarray:
    """The original file on the padded resized image; scores cropped and resized back; argmax.

    ``corners``: resize back with align-corners (after TF's resize) or on pixel centres (after Pillow's).
    """
    logits, output = reference.run(reference.padded(resized))
    full = torch.from_numpy(np.ascontiguousarray(output if output.ndim == 3 else logits, dtype=np.float32))
    if full.shape[1:] != reference.size:
        full = torch.nn.functional.interpolate(
            full[None], size=reference.size, mode="bilinear", align_corners=True
        )[0]
    crop = full[:, : resized.shape[0], : resized.shape[1]]
    back = torch.nn.functional.interpolate(
        crop[None], size=rgb.shape[:2], mode="bilinear", align_corners=corners
    )
    return back[0].argmax(0).numpy()


def agreement(
    name: str, preprocess: Callable[[np.ndarray], np.ndarray], corners: bool, resize: str | int = "protocol"
) -> tuple[float, list[str]]:
    spec = zoo.get_model(name)
    onnx_for(spec)
    segmenter = Segmenter(spec, device="cpu", threads=2, resize=resize)
    reference = TFLiteReference(source_file(spec), spec)
    same = total = 0
    lines = []
    for label, rgb in real_images():
        ours = segmenter.predict(rgb)
        theirs = reference_labels(reference, rgb, preprocess(rgb), corners)
        assert ours.labels.shape == rgb.shape[:2]
        share = float((ours.labels == theirs).mean())
        lines.append(f"{label}: input {ours.input_size}, agreement {share:.5f}")
        same += int((ours.labels == theirs).sum())
        total += theirs.size
    return same / total, lines


def test_tf_resize_rule_matches_the_reference_rule() -> None:
    protocol = zoo.get_model(ADE20K).protocol
    for height in (1, 2, 100, 300, 375, 500, 512, 513, 514, 1000, 1024, 4000):
        for width in (1, 7, 128, 333, 500, 683, 768, 2048, 6000):
            expected = tf_resize_to_range(height, width, 513, 513, 16)
            assert geometry.network_input_size(height, width, protocol) == expected, (height, width)


def test_align_corners_resize_matches_torch() -> None:
    rgb = np.asarray(Image.open(IMAGES / "dog_segmentation.bmp").convert("RGB"))
    for size in ((513, 513), (97, 200), (128, 128), (1, 5)):
        ours = geometry.resize_align_corners(rgb, size)
        assert ours.dtype == np.float32 and ours.shape == (*size, 3)
        assert np.abs(ours - tf_resize_bilinear_align_corners(rgb, size)).max() < 1e-3


def test_ade20k_follows_tf_deeplab_resize_to_range() -> None:
    def preprocess(rgb: np.ndarray) -> np.ndarray:
        size = tf_resize_to_range(rgb.shape[0], rgb.shape[1], 513, 513, 16)
        return tf_resize_bilinear_align_corners(rgb, size)

    share, lines = agreement(ADE20K, preprocess, corners=True)
    assert share >= 0.99, f"{ADE20K}: labels agree on {share:.5f}\n" + "\n".join(lines)


@pytest.mark.parametrize("name", ["deeplabv3-mnv2-dm05-voc-trainval", "deeplabv3-mnv2-voc"])
def test_voc_models_follow_the_demo_when_asked(name: str) -> None:
    share, lines = agreement(name, demo_resize, corners=False, resize=513)
    assert share >= 0.999, f"{name}: labels agree on {share:.5f}\n" + "\n".join(lines)
