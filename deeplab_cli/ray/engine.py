"""``deeplab segment --engine ray``: the local engine's jobs, outputs and records, run on Ray Data.

Early records (inputs that do not exist, outputs already there with ``--skip-existing``) are decided
on the driver, as locally; the rest flow decode -> infer -> finish through Ray Data (in one actor per
core on CPUs, in stages around GPU actors), which preserves their order, and are merged back so
``on_record`` sees every input once, in input order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pickle
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from deeplab_cli.batch import (
    Job,
    Record,
    Refiner,
    Scheduler,
    SegmenterLike,
    SegmentOptions,
    Summary,
    segment_files,
)
from deeplab_cli.errors import UsageError
from deeplab_cli.ray import stages
from deeplab_cli.ray.cluster import check_reachable, connected, require_ray

# Inputs per block of the source dataset: small blocks keep every stage streaming a few images at a time.
IMAGES_PER_BLOCK = 4
MAX_BLOCKS = 4096
DECODE_CPUS = 0.25  # per decoding task: reading a JPEG is light next to inference and the CRF
CRFChoiceLike = TypeVar("CRFChoiceLike")  # commands.options.CRFChoice (commands sit above us)
STDOUT_REFUSAL = "--engine ray writes to an output folder: -o - is for the local engine"


@dataclass
class RayOptions:
    """Where and how wide to run (the ``--ray-address``, ``--concurrency``, ``--gpus-per-worker`` flags)."""

    address: str | None = None  # None: start a local Ray for this run (or use the one this process joined)
    concurrency: int = 0  # inference actors; 0 = one per GPU share, else one per cpus_per_worker CPUs
    gpus_per_worker: float = 0.0  # > 0: inference actors on GPUs; the CRF and writing stay on CPUs
    cpus_per_worker: float = 1.0  # CPUs (and ONNX Runtime threads) per CPU inference actor
    num_cpus: int | None = None  # CPUs of a local Ray (default: this machine's)
    separate_stages: bool = False  # CPU inference in the GPU plan's stages (the tests' way to run that plan)


class RayPipeline:
    """The Ray counterpart of :class:`deeplab_cli.batch.Scheduler`: ``run(jobs) -> Summary``."""

    def __init__(
        self,
        segmenter: SegmenterLike,
        options: SegmentOptions,
        crf: Refiner | None = None,
        on_record: Callable[[Record], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
        ray_options: RayOptions | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.options = options
        self.crf = crf
        self.ray_options = ray_options or RayOptions()
        self.on_record = on_record or (lambda record: None)
        self.on_progress = on_progress or (lambda n: None)

    def run(self, jobs: Iterable[Job]) -> Summary:
        """Process every job; failures are records (exit 1 at the command), never an aborted run."""
        jobs = list(jobs)
        start = time.perf_counter()
        summary = Summary()
        local = Scheduler(self.segmenter, self.options)  # its skip and input-error rules, on the driver
        with connected(self.ray_options.address, self.ray_options.num_cpus) as ray:
            early = [local.early_record(job) for job in jobs]
            todo = [job for job, record in zip(jobs, early, strict=True) if record is None]
            finished = self._records(ray, todo)
            try:
                for record in early:
                    record = record or next(finished)
                    summary.add(record)
                    self.on_record(record)
                    self.on_progress(1)
            finally:
                finished.close()  # an interrupt stops the dataset's execution (on a cluster we joined too)
        summary.elapsed = time.perf_counter() - start
        return summary

    def _records(self, ray: Any, jobs: list[Job]) -> Generator[Record, None, None]:
        """The records of ``jobs``, in their order, as the dataset yields them."""
        if not jobs:
            return
        dataset = build_dataset(ray, jobs, self.segmenter, self.options, self.crf, self.ray_options)
        for row in dataset.iter_rows():
            yield pickle.loads(row["blob"])["record"]


def build_dataset(
    ray: Any,
    jobs: list[Job],
    segmenter: Any,
    options: SegmentOptions,
    crf: Refiner | None,
    ray_options: RayOptions,
) -> Any:
    """The lazy Ray dataset of the jobs' records.

    On CPUs, one actor per ``cpus_per_worker`` cores runs decode -> infer -> finish and write for its
    images (every stage would compete for the same cores anyway; separate stages only add trips through
    the object store). With GPUs: decode (CPU tasks) -> infer (GPU actors) -> finish and write (CPU
    actors), so the GPU actors never wait on the CRF.
    """
    model = stages.ModelShipment.from_segmenter(segmenter)
    options = dataclasses.replace(options, stdin=None, stdout_stream=None)  # streams stay on the driver
    rows = [stages.pack(position, job=job) for position, job in enumerate(jobs)]
    blocks = min(MAX_BLOCKS, math.ceil(len(rows) / IMAGES_PER_BLOCK))
    dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    finish_kwargs = {
        "model": model,
        "options": options,
        "crf": getattr(crf, "params", None),
        "crf_backend": getattr(crf, "backend", "auto"),
    }
    threads = max(1, int(ray_options.cpus_per_worker))
    gpu = ray_options.gpus_per_worker > 0
    if not gpu and not ray_options.separate_stages:
        actors, cpus = cpu_actors(ray, ray_options)
        return dataset.map_batches(
            stages.Segment,
            fn_constructor_kwargs={**finish_kwargs, "threads": threads},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(actors, blocks)),  # no idle actors
            num_cpus=cpus,
            batch_format="numpy",
            zero_copy_batch=True,
        )
    infer_actors, infer_cpus, finish_actors, finish_cpus = stage_pools(ray, ray_options, crf is not None)
    dataset = dataset.map(stages.decode_row, num_cpus=DECODE_CPUS)
    dataset = dataset.map_batches(
        stages.Infer,
        fn_constructor_kwargs={"model": model, "device": "cuda" if gpu else "cpu", "threads": threads},
        batch_size=max(segmenter.batch_size, 1),
        compute=ray.data.ActorPoolStrategy(size=min(infer_actors, blocks)),
        num_cpus=infer_cpus,
        num_gpus=ray_options.gpus_per_worker if gpu else None,
        batch_format="numpy",
        zero_copy_batch=True,
    )
    return dataset.map_batches(
        stages.Finish,
        fn_constructor_kwargs=finish_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(finish_actors, blocks)),
        num_cpus=finish_cpus,
        batch_format="numpy",
        zero_copy_batch=True,
    )


def cpu_actors(ray: Any, ray_options: RayOptions) -> tuple[int, float]:
    """(actors, CPUs each) with CPU inference: one per ``cpus_per_worker`` cores of the cluster, each
    running that many ONNX Runtime threads and, inline, one CRF thread (as the local engine runs one
    single-threaded session per core)."""
    cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
    per_worker = ray_options.cpus_per_worker
    return ray_options.concurrency or max(1, int(cpus / per_worker)), per_worker


def stage_pools(ray: Any, ray_options: RayOptions, crf: bool) -> tuple[int, float, int, float]:
    """(inference actors, CPUs each, finish actors, CPUs each) for the plan in separate stages.

    GPU inference: one actor per ``gpus_per_worker`` share of the cluster's GPUs, reserving no CPU. CPU
    inference (``separate_stages``): ``concurrency`` actors (default 1) of half a CPU. The CPUs left
    after them and the decoding tasks go to the finish actors: a whole core each with the CRF, which
    costs more than the network, half one without.
    """
    resources = ray.cluster_resources()
    cpus = max(1.0, float(resources.get("CPU", 1)))
    if ray_options.gpus_per_worker > 0:
        gpus = resources.get("GPU", 0)
        infer, infer_cpus = ray_options.concurrency or max(1, int(gpus / ray_options.gpus_per_worker)), 0.0
    else:
        infer, infer_cpus = ray_options.concurrency or 1, 0.5
    free = max(cpus - infer * infer_cpus - DECODE_CPUS, DECODE_CPUS)
    finish = max(1, int(free / (1.0 if crf else 0.5)))
    return infer, infer_cpus, finish, free / finish


def segment_files_ray(
    inputs: list[str],
    out: Path | None,
    options: SegmentOptions,
    segmenter: SegmenterLike,
    crf: Refiner | None = None,
    on_record: Callable[[Record], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    *,
    ray_options: RayOptions | None = None,
) -> Summary:
    """:func:`deeplab_cli.batch.segment_files` on Ray: same inputs, names, records and skip rules.

    ``crf``: a ``CRFRunner`` whose parameters and backend the finish actors use (each runs it inline,
    one thread); create it with ``workers=0``, the driver does no CRF work itself.
    """
    if out is None:
        raise UsageError(STDOUT_REFUSAL)
    engine = functools.partial(RayPipeline, ray_options=ray_options)
    return segment_files(
        inputs, out, options, segmenter, crf, on_record, on_notice, on_progress, on_start, engine=engine
    )


def command_engine(
    output: str,
    device: str,
    crf: CRFChoiceLike,
    address: str | None,
    concurrency: int,
    gpus_per_worker: float,
) -> tuple[Callable[..., Summary], str, int, CRFChoiceLike]:
    """What ``deeplab segment --engine ray`` swaps in: (segment_files, driver device, driver sessions, crf).

    Checked before anything is converted, read or written: Ray installed (exit 2 with the pip command),
    an output folder, a cluster listening at ``address``. The driver only plans and merges records, so
    its model and CRF stay on one CPU.
    """
    require_ray()
    if output == "-":
        raise UsageError(STDOUT_REFUSAL)
    if address:
        check_reachable(address)  # before OUT is made: a wrong address leaves nothing behind
    if device.strip().lower().startswith("cuda") and not gpus_per_worker:
        raise UsageError("with --engine ray, ask for GPUs with --gpus-per-worker F (each actor gets its own)")
    ray_options = RayOptions(address, concurrency=concurrency, gpus_per_worker=gpus_per_worker)
    segment = functools.partial(segment_files_ray, ray_options=ray_options)
    return segment, "cpu", 1, dataclasses.replace(crf, workers=0)
