"""Dense CRF speed: our torch backend vs pydensecrf2 on the same inputs, measured in one run.

A 500x375 VOC image, 21 classes of real-looking probabilities (a smoothed random field sharpened by a
softmax, or the real model's output with --tflite), 10 iterations, DeepLab-LargeFOV parameters. Runs of
the two backends are interleaved so that machine load affects both alike; medians and the ratio
(torch / pydensecrf, lower is better) are printed. "cold" rebuilds every lattice (the smoothness
lattice cache is cleared); "warm" keeps the cached smoothness lattice, as in a folder of same-size
images. With CUDA available it also times a batch of 32 images on the GPU (images/s, ms per image).

    python benchmarks/bench_crf.py [--repeats 7] [--threads N] [--tflite]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# libgomp's default (spinning) wait policy burns the CPU that scipy's threads and other processes need
# on a busy 2-core machine; the CLI sets the same default. Export OMP_WAIT_POLICY=ACTIVE to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deeplab_cli.crf import (  # noqa: E402
    CRFParams,
    available_backends,
    refine,
    refine_batch,
    torch_backend,  # noqa: E402
)

SHARED = Path(os.environ.get("DEEPLAB_SHARED", REPO.parent / "shared"))
VOC = SHARED / "voc" / "VOC2012"
TFLITE = SHARED / "weights" / "deeplabv3-mnv2-voc" / "lite-model_mobilenetv2-coco_dr_1.tflite"


def load_image(size=(375, 500)) -> tuple[np.ndarray, str]:
    ids = (VOC / "ImageSets" / "Segmentation" / "sample.txt").read_text().split()
    for sid in ids:
        im = np.asarray(Image.open(VOC / "JPEGImages" / f"{sid}.jpg").convert("RGB"))
        if im.shape[:2] == size:
            return im.copy(), sid
    raise SystemExit(f"no {size[1]}x{size[0]} image in the VOC sample")


def synthetic_probs(h: int, w: int, c: int = 21, seed: int = 0) -> np.ndarray:
    """Smooth random logits at stride 8, upsampled bilinearly and softmaxed (like a network's output)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, c, h // 8 + 2, w // 8 + 2, generator=g) * 4
    up = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
    return torch.softmax(up[0], 0).numpy()


def tflite_probs(image: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(TFLITE))
    it.allocate_tensors()
    h, w, _ = image.shape
    x = np.zeros((1, 513, 513, 3), np.float32)
    x[0, :h, :w] = image / 127.5 - 1
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    lo = torch.from_numpy(it.get_tensor(it.get_output_details()[0]["index"]).copy()).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(lo, size=(513, 513), mode="bilinear", align_corners=True)
    return torch.softmax(up[0, :, :h, :w], 0).numpy()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed_both(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (CPU time is steadier on a shared machine)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tflite", action="store_true", help="use the real model's probabilities")
    ap.add_argument("--engines", default="scipy,torch", help="CPU sparse engines to time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    image, sid = load_image()
    probs = tflite_probs(image) if args.tflite else synthetic_probs(*image.shape[:2])
    params = CRFParams()  # LargeFOV: 10 iterations, 3/3, 4/121/5
    print(f"image {sid} {image.shape[1]}x{image.shape[0]}, {probs.shape[0]} classes, {params}")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )

    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    cases = {}
    if "pydensecrf" in available_backends():
        cases["pydensecrf"] = lambda: refine(image, probs, params, backend="pydensecrf")
    for eng in args.engines.split(","):

        def cold(eng=eng):
            torch_backend.clear_cache()
            return torch_backend.refine_torch(image, probs, params, "cpu", eng)

        cases[f"torch[{eng}] cold"] = cold
        cases[f"torch[{eng}] warm"] = lambda eng=eng: torch_backend.refine_torch(
            image, probs, params, "cpu", eng
        )
    for fn in cases.values():  # warm-up (imports, allocator)
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            wall, used = timed_both(fn)
            runs.setdefault(name, []).append(wall)
            cpu.setdefault(name, []).append(used)
    ref = statistics.median(runs["pydensecrf"]) if "pydensecrf" in runs else None
    ref_cpu = statistics.median(cpu["pydensecrf"]) if "pydensecrf" in cpu else None
    for name, ts in runs.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
        ratio = f"  ratio {med / ref:.2f} (cpu {med_cpu / ref_cpu:.2f})" if ref else ""
        wall = f"wall median {med * 1000:7.1f} ms (min {min(ts) * 1000:6.1f})"
        print(f"{name:22s} {wall}, cpu {med_cpu * 1000:7.1f} ms{ratio}")
    if ref:
        out = {
            "pydensecrf": refine(image, probs, params, backend="pydensecrf"),
            "torch": refine(image, probs, params, backend="torch", device="cpu"),
        }
        d = np.abs(out["torch"] - out["pydensecrf"])
        agree = (out["torch"].argmax(0) == out["pydensecrf"].argmax(0)).mean()
        print(f"agreement torch vs pydensecrf: labels {agree * 100:.3f} %, max |dQ| {d.max():.2e}")

    if torch.cuda.is_available():
        dev = "cuda"
        images = [image] * 32
        probs_list = [probs] * 32
        refine_batch(images[:2], probs_list[:2], params, device=dev)
        ts, single = [], []
        for _ in range(3):
            torch.cuda.synchronize()
            ts.append(timed(lambda: refine_batch(images, probs_list, params, device=dev)))
            single.append(timed(lambda: refine(image, probs, params, device=dev)))
        med = statistics.median(ts)
        one = statistics.median(single)
        name = torch.cuda.get_device_name()
        print(f"cuda ({name}): batch of 32 {med * 1000:.0f} ms = {32 / med:.1f} images/s,")
        print(f"  {med / 32 * 1000:.1f} ms per image in a batch; single image {one * 1000:.1f} ms")


if __name__ == "__main__":
    main()
