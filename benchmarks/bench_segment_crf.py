"""End to end: ``deeplab segment DIR --crf`` with the default CRF backend against pydensecrf, and no CRF.

The real command (a subprocess each run) on the first ``--limit`` images of the shared VOC sample (100 by
default; linked into a temporary folder), with the model's own CRF parameters and the default core split
unless ``--crf-workers`` is given. The configurations run interleaved over ``--rounds`` rounds, so machine
load falls on all of them alike; medians of wall time and of the children's CPU time, images/s, and ratios
against ``--crf-backend pydensecrf`` are printed, plus the overhead of ``--crf`` over no CRF. Each round
checks that the two CRF backends' masks agree (pixel share printed).

    python benchmarks/bench_segment_crf.py [--limit 100] [--rounds 2] [--model NAME]
        [--configs default,pydensecrf,none] [--crf-workers N]

Config names: ``none`` (no CRF), ``default`` (``--crf``), or a backend name (``--crf --crf-backend B``);
``NAME:W`` adds ``--crf-workers W``. Needs the weights in the cache or a mirror (``$DEEPLAB_MIRROR``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DEEPLAB_SHARED", REPO.parent / "shared"))
VOC = SHARED / "voc" / "VOC2012"


def sample_images(limit: int, folder: Path) -> int:
    """Link the first ``limit`` sample images into ``folder``; returns how many."""
    ids = (VOC / "ImageSets" / "Segmentation" / "sample.txt").read_text().split()[:limit]
    for sid in ids:
        (folder / f"{sid}.jpg").symlink_to(VOC / "JPEGImages" / f"{sid}.jpg")
    return len(ids)


def command(config: str, images: Path, out: Path, model: str | None, workers: int | None) -> list[str]:
    name, _, own_workers = config.partition(":")
    args = [sys.executable, "-m", "deeplab_cli", "segment", str(images), "-o", str(out), "-q"]
    if model:
        args += ["--model", model]
    if name != "none":
        args.append("--crf")
        if name != "default":
            args += ["--crf-backend", name]
        chosen = own_workers or (str(workers) if workers is not None else "")
        if chosen:
            args += ["--crf-workers", chosen]
    return args


def timed_run(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the waited children) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(args, check=True, env={**os.environ, "DEEPLAB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def mask_agreement(a: Path, b: Path) -> float:
    """Share of pixels with equal labels over all masks of two output folders."""
    equal = total = 0
    for mask in sorted(a.glob("*.png")):
        x, y = np.asarray(Image.open(mask)), np.asarray(Image.open(b / mask.name))
        equal += int((x == y).sum())
        total += x.size
    return equal / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100, help="VOC sample images (default 100)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=None, help="default: the command's default model")
    parser.add_argument("--configs", default="default,pydensecrf,none")
    parser.add_argument("--crf-workers", type=int, default=None, help="for every CRF config")
    args = parser.parse_args()
    os.environ.setdefault("DEEPLAB_MIRROR", str(SHARED / "weights"))
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]

    with tempfile.TemporaryDirectory(prefix="bench-segment-crf-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        n = sample_images(args.limit, images)
        subprocess.run(command("none", images, Path(tmp) / "warm", args.model, None), check=True)  # cache
        walls: dict[str, list[float]] = {c: [] for c in configs}
        cpus: dict[str, list[float]] = {c: [] for c in configs}
        agreement: list[float] = []
        for round_ in range(args.rounds):
            outs = {}
            for config in configs:
                out = Path(tmp) / f"out-{round_}-{config.replace(':', '-')}"
                wall, cpu = timed_run(command(config, images, out, args.model, args.crf_workers))
                walls[config].append(wall)
                cpus[config].append(cpu)
                outs[config] = out
                print(f"round {round_ + 1}: {config:<14} {wall:7.1f} s wall {cpu:7.1f} s cpu", flush=True)
            crf = [c for c in configs if c != "none"]
            if len(crf) >= 2:
                agreement.append(mask_agreement(outs[crf[0]], outs[crf[1]]))

    load = os.getloadavg()[0]
    print(f"\n{n} VOC images, {os.cpu_count()} CPUs, {args.rounds} rounds (medians), load after {load:.1f}")
    print(f"  {'config':<14} {'wall s':>8} {'cpu s':>8} {'images/s':>9} {'wall ratio':>11} {'cpu ratio':>10}")
    base = "pydensecrf" if "pydensecrf" in configs else configs[0]
    base_wall, base_cpu = statistics.median(walls[base]), statistics.median(cpus[base])
    for config in configs:
        wall, cpu = statistics.median(walls[config]), statistics.median(cpus[config])
        print(
            f"  {config:<14} {wall:8.1f} {cpu:8.1f} {n / wall:9.2f} "
            f"{wall / base_wall:11.2f} {cpu / base_cpu:10.2f}"
        )
    if "none" in configs:
        plain = statistics.median(walls["none"])
        for config in configs:
            if config != "none":
                print(f"  --crf overhead ({config}): {statistics.median(walls[config]) / plain:.2f}x no CRF")
    if agreement:
        print(f"  masks equal between the first two CRF configs: {100 * min(agreement):.3f} % of pixels")


if __name__ == "__main__":
    main()
