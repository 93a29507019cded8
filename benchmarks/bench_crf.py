"""Dense CRF speed on the CPU: the numba backend vs pydensecrf2 (and torch), measured in one run.

A real 500x375 VOC image with the default model's probabilities (21 classes; ``--synthetic``: a smoothed
random field instead), 10 iterations, DeepLab-LargeFOV parameters. The backends run interleaved, so that
machine load affects them alike; medians of wall time and of process CPU time (``time.process_time``:
all threads of this process) and the ratios to pydensecrf (lower is better) are printed, both the ratio
of the medians and the median of each round's ratio (the steadier one on a drifting machine), then the
lattice build time alone, 151 classes (ADE20K) and one 2048x1024 frame (Cityscapes size, 19 classes).
"numba 1 thread" shows the per-core gain; "numba" uses all of numba's threads (``--threads``). The
machine's load average is printed with each table: on a shared machine, quote it with the numbers.

    python benchmarks/bench_crf.py [--repeats 5] [--threads N] [--synthetic] [--no-large]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI: spinning OpenMP threads steal the cores

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deeplab_cli.crf import CRFParams, available_backends, refine  # noqa: E402
from deeplab_cli.crf import numba_backend as nb  # noqa: E402

SHARED = Path(os.environ.get("DEEPLAB_SHARED", REPO.parent / "shared"))
VOC = SHARED / "voc" / "VOC2012"
LARGEFOV = CRFParams()  # 10 iterations, pos 3/3, bilateral 4/121/5


def load_image(size: tuple[int, int] = (375, 500)) -> tuple[np.ndarray, str]:
    """The first VOC sample image of ``size`` (H, W)."""
    for sid in (VOC / "ImageSets" / "Segmentation" / "sample.txt").read_text().split():
        im = np.asarray(Image.open(VOC / "JPEGImages" / f"{sid}.jpg").convert("RGB"))
        if im.shape[:2] == size:
            return im.copy(), sid
    raise SystemExit(f"no {size[1]}x{size[0]} image in the VOC sample")


def synthetic_probs(h: int, w: int, c: int = 21, seed: int = 0) -> np.ndarray:
    """Smooth random logits at stride 8, upsampled bilinearly and softmaxed (like a network's output)."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((c, h // 8 + 2, w // 8 + 2)).astype(np.float32) * 4
    up = np.stack([np.asarray(Image.fromarray(ch).resize((w, h), Image.BILINEAR)) for ch in low])
    e = np.exp(up - up.max(0))
    return (e / e.sum(0)).astype(np.float32)


def model_probs(image: np.ndarray) -> np.ndarray:
    """The default model's probabilities (its weights are converted once into the DEEPLAB_HOME cache)."""
    os.environ.setdefault("DEEPLAB_MIRROR", str(SHARED / "weights"))
    from deeplab_cli.runtime import Segmenter

    probs = Segmenter(device="cpu").predict(image, return_probs=True).probs
    return np.ascontiguousarray(probs, dtype=np.float32)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


Runs = dict[str, list[tuple[float, float]]]


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> Runs:
    """(wall, cpu) of every case in each of ``repeats`` rounds, each round running every case once."""
    runs: Runs = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            runs[name].append(timed(fn))
    return runs


def medians(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    """Median wall and median CPU time of a case's rounds."""
    return statistics.median(w for w, _ in rounds), statistics.median(c for _, c in rounds)


def table(title: str, runs: Runs, ref: str | None) -> None:
    """Medians per case and, against ``ref``, the ratio of the medians and the median of the per-round
    ratios (each case against the reference of its own round: robust to the machine's drift)."""
    print(f"\n{title}, load average after: {os.getloadavg()[0]:.1f}")
    header = f"  {'backend':24s} {'wall ms':>9s} {'cpu ms':>9s} {'wall ratio':>10s} {'cpu ratio':>9s}"
    print(header + (f" {'per-round wall':>14s}" if ref else ""))
    base = runs.get(ref) if ref else None
    for name, rounds in runs.items():
        wall, cpu = medians(rounds)
        ratios = ""
        if base:
            base_wall, base_cpu = medians(base)
            paired = statistics.median(w / b for (w, _), (b, _) in zip(rounds, base, strict=True))
            ratios = f"{wall / base_wall:10.2f} {cpu / base_cpu:9.2f} {paired:14.2f}"
        print(f"  {name:24s} {wall * 1000:9.1f} {cpu * 1000:9.1f} {ratios}")


def backend_cases(
    image: np.ndarray, probs: np.ndarray, threads: int, torch_too: bool
) -> dict[str, Callable[[], object]]:
    cases: dict[str, Callable[[], object]] = {}
    if "pydensecrf" in available_backends():
        cases["pydensecrf"] = lambda: refine(image, probs, LARGEFOV, backend="pydensecrf")
    cases[f"numba {threads} threads"] = lambda: nb.refine_numba(image, probs, LARGEFOV, threads=threads)
    if threads != 1:
        cases["numba 1 thread"] = lambda: nb.refine_numba(image, probs, LARGEFOV, threads=1)
    if torch_too:
        cases["torch"] = lambda: refine(image, probs, LARGEFOV, backend="torch", device="cpu")
    return cases


def agreement(image: np.ndarray, probs: np.ndarray) -> str:
    if "pydensecrf" not in available_backends():
        return "pydensecrf not installed: no agreement check"
    ref = refine(image, probs, LARGEFOV, backend="pydensecrf")
    got = nb.refine_numba(image, probs, LARGEFOV)
    labels = (got.argmax(0) == ref.argmax(0)).mean() * 100
    return f"numba vs pydensecrf: labels {labels:.3f} % equal, max |dQ| {np.abs(got - ref).max():.1e}"


def main() -> None:
    import numba

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--synthetic", action="store_true", help="synthetic probabilities, not the model's")
    ap.add_argument("--no-large", action="store_true", help="skip the 151-class and 2048x1024 cases")
    args = ap.parse_args()

    image, sid = load_image()
    probs = synthetic_probs(*image.shape[:2]) if args.synthetic else model_probs(image)
    t0 = time.perf_counter()
    nb.refine_numba(image[:32, :32].copy(), np.ascontiguousarray(probs[:, :32, :32]), LARGEFOV)
    first = time.perf_counter() - t0
    print(f"image {sid} {image.shape[1]}x{image.shape[0]}, {probs.shape[0]} classes, {LARGEFOV}")
    print(
        f"numba {numba.__version__} ({numba.threading_layer()} layer), threads {args.threads}, "
        f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}; first numba call {first:.1f} s "
        "(compile, or load from the disk cache)"
    )
    cases = backend_cases(image, probs, args.threads, torch_too=True)
    for fn in cases.values():  # warm-up: imports, allocators, cached smoothness lattices
        fn()
    table("500x375, 21 classes, 10 iterations (medians)", interleaved(cases, args.repeats), "pydensecrf")
    print("  " + agreement(image, probs))

    def lattices() -> None:
        nb.clear_cache()
        nb.lattices_for(image, LARGEFOV)

    wall, cpu = medians(interleaved({"lattices": lattices}, args.repeats)["lattices"])
    print(f"\nlattice build alone (both kernels): wall {wall * 1000:.1f} ms, cpu {cpu * 1000:.1f} ms")
    if args.no_large:
        return
    many = synthetic_probs(*image.shape[:2], c=151)
    big_image = np.asarray(Image.fromarray(image).resize((2048, 1024), Image.BILINEAR))
    big = synthetic_probs(1024, 2048, c=19)
    for title, im, p in (
        ("500x375, 151 classes (ADE20K), synthetic probabilities", image, many),
        ("2048x1024, 19 classes (Cityscapes frame), synthetic probabilities", big_image, big),
    ):
        cases = backend_cases(im, p, args.threads, torch_too=False)
        table(title + " (medians)", interleaved(cases, max(1, args.repeats // 2)), "pydensecrf")


if __name__ == "__main__":
    main()
