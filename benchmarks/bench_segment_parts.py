"""Micro-benchmarks behind the runtime's choices (medians of interleaved runs, same process):

1. ONNX Runtime on the CPU: one session with one thread, one session with ONNX Runtime's default
   threads (one per physical core; what ``Segmenter`` uses), and two 1-thread sessions running two
   images at once (what ``deeplab segment`` uses);
2. upsampling to labels: torch ``interpolate`` (align corners) + crop + argmax, vs the runtime's dense
   separable matmul, vs its exact fast path (``upsample_labels``), on real logits of VOC images;
   plus one 6000 x 4000 photo through ``Segmenter.predict`` (``max_size`` 2048).

    python benchmarks/bench_segment_parts.py [--model deeplabv3-mnv2-voc] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
VOC_IMAGES = REPO.parent / "shared" / "voc" / "VOC2012" / "JPEGImages"


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sessions(model: str, repeat: int) -> None:
    from deeplab_cli.runtime import create_session
    from deeplab_cli.weights import ensure_onnx

    path = ensure_onnx(model)
    batch = np.random.default_rng(0).uniform(0, 255, (1, 3, 513, 513)).astype(np.float32)
    default = create_session(path, "cpu")
    one = create_session(path, "cpu", threads=1)
    singles = [create_session(path, "cpu", threads=1) for _ in range(2)]
    for session in (default, one, *singles):
        session.run(None, {"image": batch})

    def pair() -> None:
        workers = [threading.Thread(target=s.run, args=(None, {"image": batch})) for s in singles]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    results = {
        "one session, 1 thread": [],
        "one session, default threads": [],
        "two 1-thread sessions (per image)": [],
    }
    for _ in range(repeat):  # interleaved, so load changes hit all three alike
        results["one session, 1 thread"].append(median_time(lambda: one.run(None, {"image": batch}), 1))
        results["one session, default threads"].append(
            median_time(lambda: default.run(None, {"image": batch}), 1)
        )
        results["two 1-thread sessions (per image)"].append(median_time(pair, 1) / 2)
    print(f"ONNX Runtime, {model}, one 513 x 513 image, median of {repeat}:")
    for name, values in results.items():
        print(f"  {name:36s} {statistics.median(values) * 1000:7.1f} ms")


def upsampling(model: str, repeat: int) -> None:
    import torch

    from deeplab_cli.runtime import Segmenter, upsample, upsample_labels

    segmenter = Segmenter(model, device="cpu")
    paths = sorted(VOC_IMAGES.glob("*.jpg"))[:5]
    predictions = [segmenter.predict(p) for p in paths]

    def with_torch() -> None:
        for p in predictions:
            scores = torch.nn.functional.interpolate(
                torch.from_numpy(p.logits)[None], size=p.padded_size, mode="bilinear", align_corners=True
            )[0, :, : p.image_size[0], : p.image_size[1]]
            scores.argmax(0).numpy().astype(np.uint8)

    def dense() -> None:
        for p in predictions:
            upsample(p.logits, p.image_size, p.input_size, p.padded_size, return_probs=True)

    def fast() -> None:
        for p in predictions:
            upsample_labels(p.logits, p.image_size, p.input_size, p.padded_size)

    n = len(predictions)
    print(f"upsampling to labels, {n} VOC images (~500 x 375), per image, median of {repeat}:")
    cases = (
        ("torch interpolate + argmax", with_torch),
        ("dense matmul (+ softmax)", dense),
        ("fast exact", fast),
    )
    for name, fn in cases:
        print(f"  {name:36s} {median_time(fn, repeat) / n * 1000:7.1f} ms")
    big = np.asarray(Image.open(paths[0]).convert("RGB").resize((6000, 4000)))
    start = time.perf_counter()
    prediction = segmenter.predict(big)
    total = time.perf_counter() - start
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in prediction.timings.items())
    size = prediction.input_size
    print(f"6000 x 4000 photo, max_size 2048 -> network input {size}: {total:.2f} s ({timings})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deeplabv3-mnv2-voc")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sessions(args.model, args.repeat)
    upsampling(args.model, args.repeat)


if __name__ == "__main__":
    main()
