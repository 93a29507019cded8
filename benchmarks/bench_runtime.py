"""Latency of one 513x513 image: ONNX Runtime (our export) vs the TFLite original vs PyTorch eager.

    python benchmarks/bench_runtime.py [--model deeplabv3-mnv2-voc] [--runs 15] [--threads 2]
    python benchmarks/bench_runtime.py --large [--crf numba|torch|none] [--size 6000x4000]

``--large``: one real photo enlarged to 6000 x 4000 (a phone photo's size) through ``Segmenter.predict``
(with the CRF on its bounded grid, ``runtime.CRF_MAX_PIXELS``), each run in a fresh subprocess: wall
time and peak RSS (``ru_maxrss`` of the child), plus the same for the probabilities written band by band.

The three runtimes are timed round-robin (one run of each per round) so that background load hits
them alike; medians and the ratios ORT/TFLite and ORT/torch are printed. The TFLite reference is
ai-edge-litert with its default XNNPACK delegate. Note that for dynamic-range int8 files XNNPACK runs
the 1x1 convolutions in int8 (activations quantized on the fly), while ORT and torch compute in float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from deeplab_cli import zoo
from deeplab_cli.export import convert_to_onnx, wrap_for_export
from deeplab_cli.geometry import pad_batch
from deeplab_cli.importers import load_weights

REPO = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("DEEPLAB_MIRROR", REPO.parent / "shared" / "weights"))
IMAGE = REPO.parent / "shared" / "images" / "bird_segmentation.bmp"


def _source(spec: zoo.ModelSpec) -> Path:
    matches = sorted(MIRROR.rglob(spec.source.file))
    if not matches:
        raise SystemExit(f"{spec.source.file} not found under {MIRROR} (set DEEPLAB_MIRROR)")
    return matches[0]


def _image(size: tuple[int, int], spec: zoo.ModelSpec) -> np.ndarray:
    from PIL import Image

    rgb = np.asarray(Image.open(IMAGE).convert("RGB"))[: size[0], : size[1]]
    return pad_batch([rgb], size, spec)  # 1 x 3 x H x W float32 RGB 0..255, mean-padded


def _runners(spec: zoo.ModelSpec, onnx_path: Path, source: Path, batch: np.ndarray, threads: int):  # type: ignore[no-untyped-def]
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_path=str(source), num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    nhwc = batch.transpose(0, 2, 3, 1)
    if detail["dtype"] == np.uint8:
        feed = np.round(nhwc).astype(np.uint8)
    else:
        feed = ((nhwc - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)).astype(
            np.float32
        )

    def run_tflite() -> None:
        interpreter.set_tensor(detail["index"], feed)
        interpreter.invoke()

    torch.set_num_threads(threads)
    net = wrap_for_export(load_weights(source, spec), spec)
    tensor = torch.from_numpy(batch)

    def run_torch() -> None:
        with torch.no_grad():
            net(tensor)

    return {
        "onnxruntime": lambda: session.run(["logits"], {"image": batch}),
        "tflite": run_tflite,
        "torch": run_torch,
    }


LARGE_CHILD = """
import resource, sys, time
import numpy as np
from PIL import Image
from deeplab_cli.runtime import Segmenter
model, size, crf_backend, bands = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
width, height = (int(v) for v in size.split("x"))
photo = np.asarray(Image.open(sys.argv[5]).convert("RGB").resize((width, height), Image.BICUBIC))
segmenter = Segmenter(model, device="cpu")
runner = None
if crf_backend != "none":
    from deeplab_cli.crf.params import CRFParams
    from deeplab_cli.crf.runner import CRFRunner
    runner = CRFRunner(CRFParams.from_dict(segmenter.spec.crf), backend=crf_backend)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
prediction = segmenter.predict(photo, crf=runner)
checksum = 0.0
if bands:
    for top, band in prediction.iter_prob_bands():
        checksum += float(band[:, :, 0].sum())
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
timings = {k: round(v, 2) for k, v in prediction.timings.items()}
print(f"{wall:.1f} {peak / 1024:.0f} {base / 1024:.0f} {prediction.input_size} {timings}")
"""


def large(args: argparse.Namespace) -> None:
    """Time and peak RSS of one huge photo, each configuration in a fresh child process."""
    import subprocess
    import sys

    configs = (
        [("none", "0"), ("none", "1"), (args.crf, "0"), (args.crf, "1")]
        if args.crf != "none"
        else [
            ("none", "0"),
            ("none", "1"),
        ]
    )
    print(f"model {args.model}, one {args.size} photo ({IMAGE.name} enlarged), Segmenter.predict in a child")
    for crf, bands in configs:
        out = subprocess.run(
            [sys.executable, "-c", LARGE_CHILD, args.model, args.size, crf, bands, str(IMAGE)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split(maxsplit=3)
        label = f"crf={crf}" + (" + probability bands" if bands == "1" else "")
        print(
            f"  {label:32s} {float(out[0]):6.1f} s   peak RSS {int(out[1]):5d} MB (after setup {out[2]} MB)"
        )
        print(f"  {'':32s} network input {out[3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deeplabv3-mnv2-voc")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--large", action="store_true", help="one huge photo: time and peak RSS")
    parser.add_argument("--crf", default="numba", help="CRF backend for --large (none: no CRF)")
    parser.add_argument("--size", default="6000x4000", help="photo size for --large, WxH")
    args = parser.parse_args()
    if args.large:
        large(args)
        return

    spec = zoo.get_model(args.model)
    source = _source(spec)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = convert_to_onnx(source, spec, Path(tmp) / f"{spec.name}.onnx")
        from ai_edge_litert.interpreter import Interpreter

        size = tuple(int(d) for d in Interpreter(model_path=str(source)).get_input_details()[0]["shape"][1:3])
        runners = _runners(spec, onnx_path, source, _image(size, spec), args.threads)
        for run in runners.values():  # warm-up (allocations, kernel selection, weight packing)
            run()
            run()
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.runs):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"model {spec.name}, input {size[0]}x{size[1]}, {args.threads} threads, {args.runs} rounds")
    for name, value in medians.items():
        print(f"  {name:12s} median {value * 1000:8.1f} ms   (min {min(times[name]) * 1000:.1f} ms)")
    print(f"  ORT/TFLite = {medians['onnxruntime'] / medians['tflite']:.2f}")
    print(f"  ORT/torch  = {medians['onnxruntime'] / medians['torch']:.2f}")


if __name__ == "__main__":
    main()
