"""The Python API: segment images, read class fractions, write a mask and an overlay, batch a folder.

    python examples/python_api.py [IMAGE_OR_FOLDER] [OUT_DIR]

Defaults: the images in ../shared/images beside the repository, and a new temporary folder.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from deeplab_cli import Segmenter
from deeplab_cli.files import read_image, write_image, write_label_png
from deeplab_cli.palette import overlay

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE.parent.parent / "shared" / "images"


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_IMAGES
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="deeplab-example-"))
    paths = [source] if source.is_file() else sorted(
        p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".png", ".bmp") and "mask" not in p.name
        and "golden" not in p.name
    )  # fmt: skip

    # A model by registry name (weights are fetched/converted into the cache on first use).
    segmenter = Segmenter("deeplabv3-mnv2-dm05-voc", device="auto", batch_size=2)
    print(f"model {segmenter.spec.name}: {segmenter.spec.num_classes} classes on {segmenter.providers[0]}")

    # One image: labels (H x W class indices) and, on request, probabilities (C x H x W).
    image = read_image(paths[0])
    prediction = segmenter.predict(image, return_probs=True)
    top = prediction.class_fractions(segmenter.class_names)
    classes = ", ".join(f"{c['name']} {c['fraction']:.1%}" for c in top)
    print(f"{paths[0].name}: {image.shape[1]}x{image.shape[0]}, classes: {classes}")
    confidence = prediction.probs.max(axis=0)
    print(f"  mean confidence {confidence.mean():.3f}; logits {prediction.logits.shape} at stride 8")
    write_label_png(out / f"{paths[0].stem}.png", prediction.labels, segmenter.spec.palette)
    write_image(out / f"{paths[0].stem}.overlay.jpg", overlay(image, prediction.labels, "voc", background=0))

    # Many images: same-size inputs share a session run.
    for path, result in zip(paths, segmenter.predict_batch(paths), strict=True):
        names = [segmenter.class_names[i] for i in np.unique(result.labels)]
        print(f"{path.name}: {', '.join(names)}")
    print(f"outputs in {out}")


if __name__ == "__main__":
    main()
