"""``deeplab segment --engine ray`` against the local engine, on the same images, interleaved.

    python benchmarks/bench_ray.py [--limit 200] [--rounds 3] [--model NAME]
    python benchmarks/bench_ray.py --warm [--limit 200]   # Ray started once here; the runs join it
    python benchmarks/bench_ray.py --gpus-per-worker 0.5 [--limit 200]   # a GPU machine; "no GPU" elsewhere

Each round runs the real command twice as subprocesses, local engine then Ray engine (a local Ray
started and stopped by the command), on the first ``--limit`` VOC photos, and times the whole process
(wall, start-up included). Prints per engine the median wall time and images/s, the overhead ratio
(ray wall / local wall, goal <= 1.25), the start-up cost (the same on a single image: ray - local),
the time past start-up (each engine's many-image run minus its one-image run, and their ratio),
and the driver's peak memory (VmHWM of the command process, sampled from /proc; Ray's own daemons and
workers are separate processes and not counted). With ``--warm`` the benchmark starts one local Ray
itself and the Ray runs join it (``--ray-address``), as on a cluster that is already up: the ratio
then measures the engine, not Ray's start.

With ``--gpus-per-worker F`` the Ray run puts inference actors on GPUs and the CRF in CPU actors
(``--crf``), against the local engine with ``--device cuda --crf``; without a GPU it prints "no GPU"
and exits 0. Needs the weights in the cache or a mirror ($DEEPLAB_HOME / $DEEPLAB_MIRROR).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "voc" / "VOC2012" / "JPEGImages"


def has_gpu() -> bool:
    """A CUDA device ONNX Runtime can use (the GPU build installed and a driver present)."""
    if shutil.which("nvidia-smi") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def run(args: list[str]) -> tuple[float, int]:
    """(wall seconds, peak resident kB of the command process) for ``deeplab <args>``."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "deeplab_cli", *args], stderr=subprocess.PIPE, text=True
    )
    peak = 0
    while process.poll() is None:
        peak = max(peak, _hwm_kb(process.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    stderr = process.stderr.read() if process.stderr else ""
    if process.returncode != 0:
        raise SystemExit(f"deeplab {' '.join(args)} failed ({process.returncode}):\n{stderr}")
    return wall, peak


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def start_ray() -> str:
    """Start a local Ray in this process (shut down when it exits); its address for ``--ray-address``."""
    import logging

    import ray

    quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    ray.init(address="local", object_store_memory=2 * 2**30, **quiet)  # our own, even beside `ray start`
    return ray.get_runtime_context().gcs_address


def link_images(source: Path, count: int, folder: Path) -> int:
    images = sorted(source.glob("*.jpg"))[:count]
    folder.mkdir(parents=True)
    for path in images:
        (folder / path.name).symlink_to(path.resolve())
    return len(images)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="deeplabv3-mnv2-dm05-voc")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--warm", action="store_true", help="the Ray runs join a Ray started once here")
    options = parser.parse_args()
    gpu = options.gpus_per_worker > 0
    if gpu and not has_gpu():
        print("no GPU: nothing to measure (needs nvidia-smi and onnxruntime-gpu)")
        return
    local_extra = ["--device", "cuda", "--crf"] if gpu else ["--device", "cpu"]
    ray_extra = [
        "--engine",
        "ray",
        *(["--gpus-per-worker", str(options.gpus_per_worker), "--crf"] if gpu else []),
    ]
    if options.warm:
        ray_extra += ["--ray-address", start_ray()]
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as scratch:
        root = Path(scratch)
        count = link_images(options.images, options.limit, root / "many")
        link_images(options.images, 1, root / "one")
        walls: dict[str, list[float]] = {"local": [], "ray": []}
        peaks: dict[str, list[int]] = {"local": [], "ray": []}
        startup: dict[str, list[float]] = {"local": [], "ray": []}
        for round_number in range(options.rounds):
            for engine, extra in (("local", local_extra), ("ray", ray_extra)):
                base = ["segment", "--model", options.model, "-q", *extra]
                out = root / f"out-{engine}-{round_number}"
                wall, peak = run([*base, str(root / "many"), "-o", str(out)])
                walls[engine].append(wall)
                peaks[engine].append(peak)
                startup[engine].append(run([*base, str(root / "one"), "-o", f"{out}-one"])[0])
                print(f"round {round_number + 1} {engine:5s}: {wall:6.1f} s wall, peak {peak / 1024:.0f} MiB")
    local, ray = statistics.median(walls["local"]), statistics.median(walls["ray"])
    mode = f"GPU actors ({options.gpus_per_worker} GPU each) + CPU CRF" if gpu else "CPU"
    mode += ", joining a running Ray" if options.warm else ", a local Ray started by each run"
    print(f"\n{count} images, {options.model}, {mode}, {os.cpu_count()} CPUs; median of {options.rounds}")
    print(f"local engine : {local:6.1f} s wall, {count / local:6.2f} images/s")
    print(f"ray engine   : {ray:6.1f} s wall, {count / ray:6.2f} images/s")
    print(f"overhead     : {ray / local:.2f}x wall (goal <= 1.25x)")
    extra_start = statistics.median(startup["ray"]) - statistics.median(startup["local"])
    what = "joining, actors" if options.warm else "local Ray start, actors"
    print(f"start-up     : +{extra_start:.1f} s for the Ray engine on one image ({what})")
    marginal = {
        engine: statistics.median(w - one for w, one in zip(walls[engine], startup[engine], strict=True))
        for engine in walls
    }
    print(
        f"past start-up: local {marginal['local']:.1f} s, ray {marginal['ray']:.1f} s for the other "
        f"{count - 1} images, {marginal['ray'] / marginal['local']:.2f}x (many-image run minus one-image run)"
    )
    print(
        f"driver peak  : local {statistics.median(peaks['local']) / 1024:.0f} MiB, "
        f"ray {statistics.median(peaks['ray']) / 1024:.0f} MiB (VmHWM of the command process)"
    )


if __name__ == "__main__":
    main()
