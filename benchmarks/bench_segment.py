"""Throughput and memory of ``deeplab segment DIR`` against a naive one-image-at-a-time Python loop.

    python benchmarks/bench_segment.py [--images DIR] [--model NAME] [--limit N] [--repeat-rss 1000]

1. naive: one process, ``Segmenter(model).predict(path)`` then ``write_label_png`` for each image, in order;
2. pipeline: ``deeplab segment DIR -o OUT`` (a subprocess, the real command) with the given batch size;
both on the same images, same model, CPU; prints images/s and the ratio.
3. memory: the pipeline over ``--repeat-rss`` inputs (the sample repeated through a folder of symlinks),
sampling VmRSS from /proc/<pid>/status in a monitoring thread; prints the median RSS while the first
100 and the last 100 inputs were processed, and the peak (VmHWM).

4. large photo (``--large``): one 6000 x 4000 JPEG made by upscaling a real VOC image (bicubic, with a
little noise so it compresses like a photo), segmented by the real command with: defaults, --overlay,
--scores probs, --crf; prints the wall time of each run and the peak RSS of its largest process
(``ru_maxrss`` of the waited children, measured by a small wrapper process per run, so the runs don't
mix), interleaved over ``--rounds``, medians.

Needs the weights in the cache or a mirror ($DEEPLAB_HOME / $DEEPLAB_MIRROR, as for the tests).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "voc" / "VOC2012" / "JPEGImages"


def naive(images: list[Path], model: str, out: Path) -> float:
    """Seconds for the plain Python API loop (model loading excluded)."""
    from deeplab_cli.files import write_label_png
    from deeplab_cli.runtime import Segmenter

    segmenter = Segmenter(model, device="cpu")
    segmenter.predict(images[0])  # warm-up, like the pipeline's first batch
    start = time.perf_counter()
    for path in images:
        prediction = segmenter.predict(path)
        write_label_png(out / f"{path.stem}.png", prediction.labels, segmenter.spec.palette)
    return time.perf_counter() - start


def command(folder: Path, out: Path, model: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "deeplab_cli", "segment", str(folder), "-o", str(out), "--model", model,
            "--device", "cpu", *extra]  # fmt: skip


def run_pipeline(folder: Path, out: Path, model: str, extra: list[str]) -> float:
    """Seconds of processing reported by the command itself (its summary line excludes start-up)."""
    args = command(folder, out, model, extra)
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    line = result.stderr.strip().splitlines()[-1]  # "deeplab: N inputs: ... in T s (R images/s)"
    return float(line.split(" in ")[1].split(" s ")[0])


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in kB of process ``pid``."""
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def memory_run(folder: Path, out: Path, model: str, extra: list[str], total: int) -> dict[str, float]:
    """Run the command over ``total`` inputs, sampling its RSS against the number of outputs written."""
    args = command(folder, out, model, [*extra, "--json", "-q"])
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    done = 0
    samples: list[tuple[int, int]] = []  # (inputs done, RSS kB)
    peak = 0
    stop = threading.Event()

    def monitor() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                rss, hwm = rss_kb(process.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            samples.append((done, rss))
            peak = max(peak, hwm)
            time.sleep(0.05)

    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    assert process.stdout is not None
    for _line in process.stdout:
        done += 1
    process.wait()
    stop.set()
    thread.join()
    first = [rss for n, rss in samples if 0 < n <= 100]
    last = [rss for n, rss in samples if n > total - 100]
    return {
        "first100_mb": statistics.median(first) / 1024 if first else float("nan"),
        "last100_mb": statistics.median(last) / 1024 if last else float("nan"),
        "peak_mb": peak / 1024,
        "inputs": done,
    }


LARGE_VARIANTS = {"default": [], "--overlay": ["--overlay"], "--scores probs": ["--scores", "probs"],
                  "--crf": ["--crf"]}  # fmt: skip
_PEAK_WRAPPER = (
    "import resource, subprocess, sys, time; start = time.perf_counter(); "
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(code, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def large_photo(source: Path, target: Path, size: tuple[int, int] = (6000, 4000)) -> Path:
    """A photo-like large JPEG: a real image upscaled, plus mild noise (JPEG size like a camera's)."""
    import numpy as np
    from PIL import Image

    image = Image.open(source).convert("RGB").resize(size, Image.BICUBIC)
    rng = np.random.default_rng(0)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(
        -6, 7, size=(size[1], size[0], 3), dtype=np.int16
    )
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target, quality=92)
    return target


def large_run(photo: Path, out: Path, model: str, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB of the largest process) of one ``deeplab segment`` run."""
    args = [sys.executable, "-c", _PEAK_WRAPPER, *command(photo, out, model, [*extra, "-q"])]
    code, seconds, peak_kb = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()
    if code != "0":
        raise SystemExit(f"deeplab segment {' '.join(extra)} failed with exit code {code}")
    return float(seconds), int(peak_kb) / 1024


def large_rows(source: Path, tmp_path: Path, model: str, rounds: int) -> None:
    photo = large_photo(source, tmp_path / "large.jpg")
    seconds: dict[str, list[float]] = {name: [] for name in LARGE_VARIANTS}
    peaks: dict[str, list[float]] = {name: [] for name in LARGE_VARIANTS}
    for index in range(rounds):
        for name, extra in LARGE_VARIANTS.items():
            wall, peak = large_run(photo, tmp_path / f"large-{index}", model, extra)
            seconds[name].append(wall)
            peaks[name].append(peak)
            print(f"round {index}: {name:15s} {wall:6.1f} s, peak {peak:6.0f} MB", flush=True)
    size_mb = photo.stat().st_size / 2**20
    print(
        f"large photo: 6000x4000 JPEG ({size_mb:.1f} MB) from {source.name}; model {model}; CPU, "
        f"{os.cpu_count()} cores; medians of {rounds}; wall time includes start-up and model load"
    )
    for name in LARGE_VARIANTS:
        print(
            f"  {name:15s} {statistics.median(seconds[name]):6.1f} s   "
            f"peak RSS {statistics.median(peaks[name]):6.0f} MB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--model", default="deeplabv3-mnv2-voc")
    parser.add_argument("--limit", type=int, default=0, help="use the first N images only")
    parser.add_argument("--args", default="", help="extra `deeplab segment` options, e.g. '--batch-size 4'")
    parser.add_argument("--rounds", type=int, default=1, help="alternate naive/pipeline runs; medians")
    parser.add_argument("--repeat-rss", type=int, default=1000, help="inputs in the memory run (0 = skip)")
    parser.add_argument("--large", action="store_true", help="only the large-photo rows (6000 x 4000)")
    args = parser.parse_args()

    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if args.limit:
        images = images[: args.limit]
    extra = args.args.split()
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as tmp:
        tmp_path = Path(tmp)
        if args.large:
            large_rows(images[0], tmp_path, args.model, args.rounds)
            return
        folder = tmp_path / "images"
        folder.mkdir()
        for path in images:
            os.symlink(path, folder / path.name)
        naive_times, pipe_times = [], []
        for index in range(args.rounds):
            (tmp_path / f"naive{index}").mkdir()
            naive_times.append(naive(images, args.model, tmp_path / f"naive{index}"))
            pipe_times.append(run_pipeline(folder, tmp_path / f"pipeline{index}", args.model, extra))
            print(
                f"round {index}: naive {naive_times[-1]:.1f} s, pipeline {pipe_times[-1]:.1f} s", flush=True
            )
        naive_s, pipe_s = statistics.median(naive_times), statistics.median(pipe_times)
        n = len(images)
        print(f"images: {n} from {args.images}; model {args.model}; CPU, {os.cpu_count()} cores")
        print(f"naive Python loop : {n / naive_s:6.2f} images/s ({naive_s:.1f} s, median of {args.rounds})")
        options = " ".join(extra) or "defaults"
        print(f"deeplab segment   : {n / pipe_s:6.2f} images/s ({pipe_s:.1f} s; options: {options})")
        print(f"speed-up          : {naive_s / pipe_s:.2f}x", flush=True)
        if args.repeat_rss:
            many = tmp_path / "many"
            many.mkdir()
            for index in range(args.repeat_rss):
                source = images[index % n]
                os.symlink(source, many / f"{index:06d}_{source.name}")
            stats = memory_run(many, tmp_path / "many-out", args.model, extra, args.repeat_rss)
            print(
                f"RSS over {stats['inputs']} inputs: first 100 median {stats['first100_mb']:.0f} MB, "
                f"last 100 median {stats['last100_mb']:.0f} MB, peak {stats['peak_mb']:.0f} MB"
            )


if __name__ == "__main__":
    main()
