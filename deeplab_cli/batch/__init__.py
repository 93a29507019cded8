"""The ``deeplab segment`` use case as a library: :func:`segment_files` does what the command does.

- :mod:`~deeplab_cli.batch.inputs`: files, folders, globs and stdin lists to a sorted input list; shards.
- :mod:`~deeplab_cli.batch.outputs`: output names, the output folder's marker and records log,
  :func:`write_outputs` (one image's files, each atomic).
- :mod:`~deeplab_cli.batch.records`: :class:`Record` (the ``--json`` line) and :class:`Summary`.
- :mod:`~deeplab_cli.batch.scheduler`: the overlapped read-ahead / inference / finish+write stages.

Usage from Python::

    from deeplab_cli.batch import SegmentOptions, segment_files
    from deeplab_cli.runtime import Segmenter

    summary = segment_files(["photos/"], Path("masks"), SegmentOptions(overlay=True), Segmenter())
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from deeplab_cli.batch.inputs import InputItem, expand_inputs, parse_shard, read_list, select_shard
from deeplab_cli.batch.marks import MARKER, OUTPUT_SUFFIXES
from deeplab_cli.batch.options import SCORE_KINDS, SegmentOptions, output_kinds
from deeplab_cli.batch.outputs import Job, check_output_dir, plan_outputs, write_outputs
from deeplab_cli.batch.records import Record, Summary
from deeplab_cli.batch.scheduler import Refiner, Scheduler, SegmenterLike
from deeplab_cli.errors import UsageError

__all__ = [
    "MARKER",
    "OUTPUT_SUFFIXES",
    "SCORE_KINDS",
    "InputItem",
    "Engine",
    "Job",
    "Record",
    "Refiner",
    "Scheduler",
    "SegmentOptions",
    "SegmenterLike",
    "Summary",
    "check_output_dir",
    "expand_inputs",
    "output_kinds",
    "parse_shard",
    "plan_jobs",
    "plan_outputs",
    "read_list",
    "segment_files",
    "select_shard",
    "write_outputs",
]


class Engine(Protocol):
    """What runs the planned jobs: :class:`Scheduler` here, ``deeplab_cli.ray.RayPipeline`` on Ray."""

    def run(self, jobs: Iterable[Job]) -> Summary: ...


class SkipNotices:
    """Collects what input expansion left out; :meth:`lines` gives one line per reason (count, example)."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[str]] = {}

    def __call__(self, path: str, reason: str) -> None:
        self.by_reason.setdefault(reason, []).append(path)

    def lines(self) -> list[str]:
        lines = []
        for reason, paths in self.by_reason.items():
            if len(paths) == 1:
                lines.append(f"skipped {paths[0]}: {reason}")
            else:
                lines.append(f"skipped {len(paths)} entries: {reason} (e.g. {paths[0]})")
        return lines


def plan_jobs(
    inputs: list[str],
    out: Path | None,
    options: SegmentOptions,
    on_notice: Callable[[str], None] | None = None,
) -> list[Job]:
    """Inputs -> this shard's jobs with their output paths (the output folder checked and marked)."""
    notices = SkipNotices()
    items = expand_inputs(
        inputs, stdin=options.stdin, exclude=[out] if out else [], null=options.null, on_skip=notices
    )
    for line in notices.lines():
        (on_notice or (lambda text: None))(line)
    if not items:
        raise UsageError("no input images found")
    if out is None:
        if len(items) > 1:
            raise UsageError(f"-o - needs exactly one input image, got {len(items)}")
        return [Job(index=0, item=item) for item in items]
    kinds = options.kinds
    jobs = select_shard(plan_outputs(items, out, kinds), options.shard)
    if kinds:
        check_output_dir(out)
    return jobs


def segment_files(
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
    engine: Callable[..., Engine] = Scheduler,
) -> Summary:
    """Segment ``inputs`` (files, folders, globs, ``-``) into ``out`` (None: the one mask to
    ``options.stdout_stream``); what ``deeplab segment`` does.

    ``crf``: a CRF runner (``deeplab_cli.crf.runner.CRFRunner``) to refine every image, or None.
    ``on_record``: each input's record, in input order; ``on_notice``: one-line notices (what was
    skipped while expanding folders and globs, and why); ``on_start(n)``: the number of jobs, before
    the first is read; ``on_progress(1)``: one more input done. Usage errors raise before any image is
    read; an interrupt propagates after every written output has been reported. ``engine``: made as
    ``engine(segmenter, options, crf=, on_record=, on_progress=)``, it runs the jobs (default: this
    machine's :class:`Scheduler`).
    """
    jobs = plan_jobs(inputs, out, options, on_notice)
    if on_start is not None:
        on_start(len(jobs))
    return engine(segmenter, options, crf=crf, on_record=on_record, on_progress=on_progress).run(jobs)
