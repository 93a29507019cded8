"""Evaluation overhead vs inference, and images/s of `deeplab eval` with and without the CRF.

Overhead = the work evaluation adds around the network: decoding the image and the ground-truth PNG,
the trimap distance transform, and the confusion-matrix/trimap updates. It is measured per image and
compared with the inference time (network + upsampling of the logits) of the same image, in the same run.
Then the whole `evaluate()` loop (read-ahead thread, metrics, optionally the CRF) is timed end to end
against a bare inference loop over the same images. Last, `evaluate()` with the CRF is timed for each
CRF backend (default: the `auto` backend against pydensecrf), interleaved over --rounds rounds, with the
core split of `deeplab eval --crf` (crf.runner.default_crf_workers) unless --crf-workers is given; the
ratio of medians is printed. The machine may be shared: compare ratios measured in one run only.

Usage: python benchmarks/bench_eval.py [--n 30] [--crf-n 8] [--rounds 3] [--backends auto,pydensecrf]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DEEPLAB_SHARED", REPO.parent / "shared"))
os.environ.setdefault("DEEPLAB_MIRROR", str(SHARED / "weights"))
os.environ.setdefault("DEEPLAB_OFFLINE", "1")
sys.path.insert(0, str(REPO))

from deeplab_cli.crf.params import CRFParams  # noqa: E402
from deeplab_cli.crf.runner import CRFRunner, default_crf_workers, network_threads  # noqa: E402
from deeplab_cli.datasets import open_dataset  # noqa: E402
from deeplab_cli.evaluate import EvalOptions, _load, evaluate  # noqa: E402
from deeplab_cli.geometry import labels_of  # noqa: E402
from deeplab_cli.metrics import ConfusionMatrix, TrimapAccumulator  # noqa: E402
from deeplab_cli.runtime import Segmenter  # noqa: E402


def median_ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):8.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="images for the overhead and no-CRF runs")
    parser.add_argument("--crf-n", type=int, default=8, help="images for the CRF run")
    parser.add_argument("--model", default="deeplabv3-mnv2-voc")
    parser.add_argument("--crf-workers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per CRF backend")
    parser.add_argument("--backends", default="auto,pydensecrf", help="CRF backends compared")
    args = parser.parse_args()

    dataset = open_dataset("voc", SHARED / "voc", "sample").limit(args.n)
    segmenter = Segmenter(args.model, device="cpu")
    segmenter.scores(_load(dataset, dataset.samples[0], 40).rgb)  # warm-up

    decode, band, metrics, infer = [], [], [], []
    matrix = ConfusionMatrix(21)
    trimap = TrimapAccumulator(21)
    for sample in dataset.samples:
        t0 = time.perf_counter()
        loaded = _load(dataset, sample, 1)  # decode only (width 1: the band is negligible)
        t1 = time.perf_counter()
        loaded_band = trimap.band(loaded.label)
        t2 = time.perf_counter()
        logits, _ = segmenter.scores(loaded.rgb)
        t3 = time.perf_counter()
        pred = labels_of(logits)
        matrix.update(loaded.label, pred)
        trimap.update(loaded.label, pred, loaded_band)
        t4 = time.perf_counter()
        decode.append(t1 - t0)
        band.append(t2 - t1)
        infer.append(t3 - t2)
        metrics.append(t4 - t3)
    overhead = [a + b + c for a, b, c in zip(decode, band, metrics, strict=True)]
    print(f"model {args.model}, {len(dataset)} VOC sample images, CPU threads {os.cpu_count()}")
    print(f"median per image: decode image+GT {median_ms(decode)}, trimap distance {median_ms(band)}")
    print(f"                  metrics (argmax, confusion, trimap) {median_ms(metrics)}")
    print(f"                  inference (network + upsampling) {median_ms(infer)}")
    ratio = sum(overhead) / sum(infer)
    print(f"evaluation overhead / inference (serial, summed): {100 * ratio:.1f} %  (goal <= 10 %)")

    start = time.perf_counter()
    for sample in dataset.samples:
        segmenter.scores(_load(dataset, sample, 1).rgb)
    bare = time.perf_counter() - start
    result = evaluate(segmenter, dataset, EvalOptions())
    wall = result.timings["wall_s"]
    print(
        f"bare inference loop {len(dataset) / bare:.2f} images/s; "
        f"evaluate() without CRF {len(dataset) / wall:.2f} images/s"
    )
    print(f"end-to-end overhead of evaluate() over bare inference: {100 * (wall / bare - 1):+.1f} %")

    if args.crf_n <= 0:
        return
    crf_data = open_dataset("voc", SHARED / "voc", "sample").limit(args.crf_n)
    workers, threads = default_crf_workers(os.cpu_count() or 1, network_on_gpu=False)
    workers = workers if args.crf_workers is None else args.crf_workers
    # as `deeplab eval --crf`: the network gets the cores the CRF workers do not
    segmenter = Segmenter(
        args.model, device="cpu", threads=network_threads(os.cpu_count() or 1, workers, threads)
    )
    params = CRFParams.from_dict(segmenter.spec.crf)
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    walls: dict[str, list[float]] = {name: [] for name in backends}
    mious: dict[str, float] = {}
    for _ in range(args.rounds):
        for name in backends:  # interleaved: a noisy neighbour slows every backend alike
            with CRFRunner(params, name, "cpu", workers, threads if workers else None) as runner:
                runner.wait_ready()  # worker start-up is reported separately below
                result = evaluate(segmenter, crf_data, crf=runner)
            walls[name].append(result.timings["wall_s"])
            mious[name] = result.crf.matrix.miou()
    print(
        f"evaluate() with CRF, {params.iterations} iterations, {len(crf_data)} images, {args.rounds} rounds:"
    )
    for name in backends:
        median = statistics.median(walls[name])
        print(
            f"  {name:10s} median {median:6.2f} s = {len(crf_data) / median:.2f} images/s, "
            f"ratio to {backends[-1]} {median / statistics.median(walls[backends[-1]]):.2f}; "
            f"mIoU {100 * mious[name]:.2f}"
        )
    start = time.perf_counter()
    with CRFRunner(params, backends[0], "cpu", workers, threads if workers else None) as runner:
        runner.wait_ready()
        label = runner.describe()
    print(f"CRF worker start-up ({label}): {time.perf_counter() - start:.2f} s")
    print(f"no-CRF mIoU on these images: {100 * result.plain.matrix.miou():.2f}")


if __name__ == "__main__":
    main()
