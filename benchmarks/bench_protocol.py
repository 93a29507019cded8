"""Which resize rule serves a VOC model best on images of every size: measured on the real VOC images.

    python benchmarks/bench_protocol.py [--model deeplabv3-mnv2-voc] [--n 330] [--n-x2 80] [--n-x4 30]

The 330 real VOC 2012 images of ../shared/voc (train split: the models saw them, so absolute numbers are
optimistic; the comparison between rules is what counts) are scored at their own size (<= 500 px), shrunk
to a longer side of 128 px (a thumbnail), and enlarged x2 (~1000 px) and x4 (~2000 px, like a photo).
The ground truth follows each image (nearest neighbour). Every rule sees the same images; mIoU over the
21 classes via ``deeplab_cli.metrics``. Also printed: class shares on ``dog_segmentation.bmp`` (128 x 128)
and on ``cityscapes_segmentation.bmp`` (a street scene) under each rule.

Rules (``Protocol`` rows): ``native`` (pad only), ``demo`` (longer side to 513, as the DeepLab demo;
Pillow bilinear), ``demo_tf`` (the same with TF's align-corners resize), ``up513`` (enlarge to 513 when
smaller, keep larger images native), ``up513_cap1025`` (the same, larger images capped at 1025).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from deeplab_cli.metrics import ConfusionMatrix
from deeplab_cli.runtime import Segmenter

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DEEPLAB_SHARED", REPO.parent / "shared"))
VOC = SHARED / "voc" / "VOC2012"

RULES = {
    "native": {"resize": "none"},
    "demo": {
        "resize": "longer_side",
        "resize_min": 513,
        "resize_max": 513,
        "resize_method": "pillow_bilinear",
    },
    "demo_tf": {
        "resize": "longer_side",
        "resize_min": 513,
        "resize_max": 513,
        "resize_method": "bilinear_align_corners",
    },
    "up513": {
        "resize": "longer_side",
        "resize_min": 513,
        "resize_max": 0,
        "resize_method": "pillow_bilinear",
    },
    "up513_cap1025": {
        "resize": "longer_side",
        "resize_min": 513,
        "resize_max": 1025,
        "resize_method": "pillow_bilinear",
    },
}


def rescaled(image: Image.Image, label: Image.Image, longer: int | None, factor: float | None):
    """The image (bicubic; antialiased when shrinking) and its ground truth (nearest) at a new size."""
    scale = factor if factor else longer / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    method = Image.BICUBIC
    return np.asarray(image.resize(size, method)), np.asarray(label.resize(size, Image.NEAREST))


def load(image_id: str) -> tuple[Image.Image, Image.Image]:
    image = Image.open(VOC / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
    label = Image.open(VOC / "SegmentationClass" / f"{image_id}.png")
    return image, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deeplabv3-mnv2-voc")
    parser.add_argument("--n", type=int, default=330, help="images at native size and as thumbnails")
    parser.add_argument("--n-x2", type=int, default=80)
    parser.add_argument("--n-x4", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rules", default=",".join(RULES))
    args = parser.parse_args()
    segmenter = Segmenter(args.model, device="cpu", threads=args.threads)
    base = segmenter.spec.protocol
    rules = {name: dataclasses.replace(base, **RULES[name]) for name in args.rules.split(",")}
    ids = (VOC / "ImageSets" / "Segmentation" / "sample.txt").read_text().split()
    sets = {
        "native": (ids[: args.n], None, None),
        "thumb128": (ids[: args.n], 128, None),
        "x2": (ids[: args.n_x2], None, 2.0),
        "x4": (ids[: args.n_x4], None, 4.0),
    }
    print(f"model {args.model}; mIoU (%) per image set and rule (VOC train images: optimistic)")
    print(f"{'set':10} {'images':>6} " + " ".join(f"{name:>14}" for name in rules) + "   seconds")
    for set_name, (set_ids, longer, factor) in sets.items():
        if not set_ids:
            continue
        matrices = {name: ConfusionMatrix(segmenter.spec.num_classes) for name in rules}
        start = time.perf_counter()
        for image_id in set_ids:
            image, label = load(image_id)
            if longer or factor:
                rgb, gt = rescaled(image, label, longer, factor)
            else:
                rgb, gt = np.asarray(image), np.asarray(label)
            cache: dict[tuple, np.ndarray] = {}
            for name, protocol in rules.items():
                segmenter.protocol = protocol
                prepared = segmenter.prepare(rgb)
                key = (prepared.input_size, protocol.resize_method)
                if key not in cache:
                    cache[key] = segmenter.finish(prepared, segmenter.run([prepared])[0]).labels
                matrices[name].update(gt, cache[key])
        cells = " ".join(f"{100 * matrices[name].miou():14.2f}" for name in rules)
        print(f"{set_name:10} {len(set_ids):6d} {cells}   {time.perf_counter() - start:.0f}", flush=True)
    for file, classes in (
        ("dog_segmentation.bmp", ("dog", "cat")),
        ("cityscapes_segmentation.bmp", ("car", "person")),
    ):
        shares = []
        for name, protocol in rules.items():
            segmenter.protocol = protocol
            prediction = segmenter.predict(SHARED / "images" / file)
            fractions = {
                row["name"]: row["fraction"] for row in prediction.class_fractions(segmenter.class_names)
            }
            shares.append(f"{name}: " + ", ".join(f"{c} {100 * fractions.get(c, 0):.1f}%" for c in classes))
        print(f"{file}: " + "; ".join(shares))


if __name__ == "__main__":
    main()
