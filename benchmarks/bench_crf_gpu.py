"""Dense CRF on CUDA: the torch backend's batched path, timed, and checked against the numba CPU backend.

A batch of 32 real VOC images (about 500x375; ``--voc`` points at a VOC2012 folder, default
../shared/voc/VOC2012) with 21-class probabilities synthesised from their ground truth: the one-hot label
map at stride 8 with noise, upsampled bilinearly and softmaxed, i.e. smooth and uncertain at the edges
like a network's output (no model and no onnxruntime-gpu needed). Without the VOC folder, synthetic
images and probabilities are used (said so in the output). LargeFOV parameters, 10 iterations.

Prints the batch time per image (goal <= 5 ms), one image alone, and the label agreement of every image
with the numba backend on the CPU (goal >= 99.9 %). Without CUDA it prints "no CUDA: skipped" and exits 0.

    python benchmarks/bench_crf_gpu.py [--batch 32] [--repeats 5] [--voc DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("DEEPLAB_SHARED", REPO.parent / "shared"))
PARAMS = {"iterations": 10, "pos_w": 3, "pos_xy_std": 3, "bi_w": 4, "bi_xy_std": 121, "bi_rgb_std": 5}


def probs_from_labels(labels: np.ndarray, classes: int, rng: np.random.Generator) -> np.ndarray:
    """C x H x W probabilities: noisy one-hot logits at stride 8, upsampled bilinearly, softmaxed."""
    h, w = labels.shape
    low = labels[::8, ::8]
    logits = np.eye(classes, dtype=np.float32)[np.where(low < classes, low, 0)].transpose(2, 0, 1) * 6.0
    logits += rng.standard_normal(logits.shape).astype(np.float32) * 1.5
    up = np.stack([np.asarray(Image.fromarray(ch).resize((w, h), Image.BILINEAR)) for ch in logits])
    e = np.exp(up - up.max(0))
    return np.ascontiguousarray(e / e.sum(0), dtype=np.float32)


def voc_batch(voc: Path, n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """``n`` VOC images and probabilities from their ground truth (synthetic ones without VOC)."""
    ids_file = voc / "ImageSets" / "Segmentation" / "sample.txt"
    images, probs = [], []
    if ids_file.exists():
        for sid in ids_file.read_text().split():
            gt = voc / "SegmentationClass" / f"{sid}.png"
            if not gt.exists():
                continue
            images.append(np.asarray(Image.open(voc / "JPEGImages" / f"{sid}.jpg").convert("RGB")).copy())
            probs.append(probs_from_labels(np.asarray(Image.open(gt)), 21, rng))
            if len(images) == n:
                return images, probs, f"{n} VOC images from {voc}, probabilities from their ground truth"
    images, probs = [], []
    for _ in range(n):
        labels = np.kron(rng.integers(0, 21, (12, 16)), np.ones((32, 32), np.int64))[:375, :500]
        noisy = labels[..., None] * 11 + rng.integers(0, 40, (375, 500, 3))
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
        probs.append(probs_from_labels(labels, 21, rng))
    return images, probs, f"{n} synthetic 500x375 images (no VOC folder at {voc})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--voc", type=Path, default=SHARED / "voc" / "VOC2012")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA: skipped")
        return 0
    from deeplab_cli.crf import CRFParams, refine, refine_batch
    from deeplab_cli.crf.numba_backend import is_available, refine_numba

    params = CRFParams.from_dict(PARAMS)
    images, probs, what = voc_batch(args.voc, args.batch, np.random.default_rng(0))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {what}; {params}")

    def run_batch() -> list[np.ndarray]:
        out = refine_batch(images, probs, params, backend="torch", device="cuda")
        torch.cuda.synchronize()
        return out

    start = time.perf_counter()
    gpu = run_batch()  # warm-up: CUDA context, kernels, allocator
    print(f"first batch (warm-up) {time.perf_counter() - start:.2f} s")
    times, single = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_batch()
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        refine(images[0], probs[0], params, backend="torch", device="cuda")
        torch.cuda.synchronize()
        single.append(time.perf_counter() - start)
    med = statistics.median(times)
    per_image = med / len(images) * 1000
    verdict = "met" if per_image <= 5 else "NOT met"
    print(
        f"CUDA batch of {len(images)}: median {med * 1000:.1f} ms = {per_image:.2f} ms per image "
        f"(goal <= 5 ms: {verdict})"
    )
    print(f"CUDA one image alone: median {statistics.median(single) * 1000:.1f} ms")
    if not is_available():
        print("numba not installed: no agreement check")
        return 0
    start = time.perf_counter()
    refine_numba(images[0][:32, :32].copy(), np.ascontiguousarray(probs[0][:, :32, :32]), params)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cpu = [refine_numba(im, p, params) for im, p in zip(images, probs, strict=True)]
    cpu_time = time.perf_counter() - start
    agree = [float((g.argmax(0) == c.argmax(0)).mean()) for g, c in zip(gpu, cpu, strict=True)]
    diff = max(float(np.abs(g - c).max()) for g, c in zip(gpu, cpu, strict=True))
    verdict = "met" if min(agree) >= 0.999 else "NOT met"
    print(
        f"labels vs numba on the CPU: min {min(agree) * 100:.3f} %, "
        f"mean {statistics.mean(agree) * 100:.3f} % "
        f"(goal >= 99.9 %: {verdict}); max |dQ| {diff:.1e}; numba CPU {cpu_time / len(images) * 1000:.0f} ms "
        f"per image on {os.cpu_count()} cpus (first call: compile or cache load {first:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
