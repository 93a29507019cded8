"""The dense CRF per core on real photos: numba on one thread against pydensecrf, process time.

The first ``--images`` images of the shared VOC sample with the default model's probabilities and the
LargeFOV parameters. The two backends alternate image by image, so machine load falls on both alike; the
ratio of their summed process times is what ``segment --crf`` gains per CRF worker (each worker is one
thread). Also prints the numba path from the network's logits (the unary in one pass), which is what
``segment --crf`` runs.

    python benchmarks/bench_crf_per_core.py [--images 16]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from bench_crf import LARGEFOV, SHARED, VOC, model_probs
from PIL import Image

from deeplab_cli.crf import refine
from deeplab_cli.crf.numba_backend import refine_numba, refine_numba_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("DEEPLAB_MIRROR", str(SHARED / "weights"))
    from deeplab_cli.runtime import Segmenter

    segmenter = Segmenter(device="cpu", threads=1)
    cases = []
    ids = (VOC / "ImageSets" / "Segmentation" / "sample.txt").read_text().split()[: args.images]
    for sid in ids:
        path = VOC / "JPEGImages" / f"{sid}.jpg"
        image = np.asarray(Image.open(path).convert("RGB"))
        prepared = segmenter.prepare(str(path))
        logits = segmenter.run([prepared])[0]
        grid = prepared.frame.resampler(logits.shape[1:], prepared.image_size)
        cases.append((image, model_probs(image), logits, grid))
    runs = {
        "numba": lambda image, probs, logits, grid: refine_numba(image, probs, LARGEFOV, threads=1),
        "numba from logits": lambda image, probs, logits, grid: refine_numba_logits(
            image, logits, grid.taps(), LARGEFOV, threads=1
        ),
        "pydensecrf": lambda image, probs, logits, grid: refine(image, probs, LARGEFOV, backend="pydensecrf"),
    }
    for run in runs.values():  # compile or load the kernels
        run(*cases[0])
    spent = dict.fromkeys(runs, 0.0)
    for case in cases:
        for name, run in runs.items():
            start = time.process_time()
            run(*case)
            spent[name] += time.process_time() - start
    base = spent["pydensecrf"]
    print(f"{len(cases)} VOC images, LargeFOV CRF, one thread, process time per image:")
    for name, seconds in spent.items():
        print(f"  {name:18s} {seconds / len(cases) * 1e3:7.0f} ms   ratio {seconds / base:.3f}")


if __name__ == "__main__":
    main()
