"""The batch runner behind ``deeplab segment``: inputs -> decode -> inference -> upsample/CRF -> outputs.

Stages overlap: a pool of reader threads decodes images ahead of the network, the calling thread runs
ONNX Runtime on batches of inputs that share a padded size, and a pool of worker threads upsamples the
scores, runs the CRF (when asked) and writes the outputs. Every queue between stages is bounded, so
memory stays flat however many images go through.

Inputs (:func:`expand_inputs`): files; folders, walked recursively, where a file counts as an image when
its first bytes are an image signature or its extension is an image extension (so a corrupt ``.jpg``
is reported, not silently skipped; hidden files and folders are skipped); glob patterns; ``-`` for a
list of paths on stdin, one per line. The list is de-duplicated and sorted by path; ``--shard i/n``
keeps the inputs whose position in that order is ``i`` modulo ``n``.

Output names (:func:`plan_outputs`): the input's path relative to the common folder of all inputs (a
folder argument counts as itself, a file as its parent folder) is mirrored under OUT, with the image
extension replaced: ``photos/a/x.jpg -> OUT/a/x.png``. When two inputs in one folder share a stem
(``x.jpg``, ``x.png``), or an output would land on an input file, those inputs keep their extension:
``x.jpg.png``, ``x.png.png``. Per input, the outputs are ``<name>.png`` (label mask), with
``--overlay`` ``<name>.overlay.jpg``, with ``--scores logits`` ``<name>.logits.npy``, with
``--scores probs`` ``<name>.probs.npz``.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from deeplab_cli import files as dio
from deeplab_cli.errors import DeeplabError, UsageError

SCORE_KINDS = ("logits", "probs")
T = TypeVar("T")


# ------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputItem:
    """One input: its path as given (or found), the folder its output path is relative to, or an error."""

    path: str
    anchor: str
    error: str | None = None

    @property
    def abspath(self) -> str:
        return os.path.abspath(self.path)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None passes through."""
    if text is None:
        return None
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise UsageError(f"invalid --shard {text!r}: expected i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"invalid --shard {text!r}: need n >= 1 and 0 <= i < n")
    return index, count


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _walk(folder: str, exclude: set[str]) -> Iterator[str]:
    """Image files under ``folder`` (recursive, hidden entries and ``exclude`` folders skipped)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and os.path.abspath(os.path.join(root, d)) not in exclude
        )
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            if dio.has_image_extension(name) or dio.is_image_file(path):
                yield path


def expand_inputs(
    args: Iterable[str], stdin: IO[str] | None = None, exclude: Iterable[str | os.PathLike] = ()
) -> list[InputItem]:
    """Expand command-line inputs into a de-duplicated list sorted by path (see the module docstring).

    Inputs that do not exist become items with an ``error`` (reported per input, the run goes on).
    ``exclude``: folders not to walk into (the output folder, when it lies inside an input folder).
    """
    excluded = {os.path.abspath(os.fspath(p)) for p in exclude}
    items: list[InputItem] = []
    queue = list(args)
    stdin_used = False
    while queue:
        arg = queue.pop(0)
        if arg == "-":
            if stdin_used:
                continue
            stdin_used = True
            source = stdin if stdin is not None else sys.stdin
            queue.extend(line.strip() for line in source if line.strip() and line.strip() != "-")
            continue
        items.extend(_expand_one(arg, excluded))
    unique: dict[str, InputItem] = {}
    for item in items:
        unique.setdefault(item.abspath, item)
    return sorted(unique.values(), key=lambda item: item.abspath)


def _expand_one(arg: str, excluded: set[str]) -> list[InputItem]:
    if os.path.isdir(arg):
        return [InputItem(path, anchor=arg) for path in _walk(arg, excluded)]
    if os.path.exists(arg):
        return [InputItem(arg, anchor=os.path.dirname(arg) or ".")]
    if _is_glob(arg):
        found: list[InputItem] = []
        for match in sorted(glob.glob(arg, recursive=True)):
            if os.path.isdir(match):
                found.extend(InputItem(p, anchor=match) for p in _walk(match, excluded))
            elif not os.path.basename(match).startswith("."):
                found.append(InputItem(match, anchor=os.path.dirname(match) or "."))
        if found:
            return found
        return [InputItem(arg, anchor=".", error=f"{arg}: no files match this pattern")]
    return [InputItem(arg, anchor=os.path.dirname(arg) or ".", error=f"{arg}: no such file")]


def select_shard(items: list[T], shard: tuple[int, int] | None) -> list[T]:
    """The inputs of shard ``(i, n)``: positions ``i, i + n, i + 2n, ...`` of the sorted list."""
    if shard is None:
        return items
    index, count = shard
    return items[index::count]


# ------------------------------------------------------------------------------------------- outputs

OUTPUT_SUFFIXES = {"mask": ".png", "overlay": ".overlay.jpg", "logits": ".logits.npy", "probs": ".probs.npz"}


@dataclass
class Job:
    """One input with its planned outputs (kind -> path)."""

    index: int
    item: InputItem
    outputs: dict[str, Path] = field(default_factory=dict)


def output_kinds(mask: bool, overlay: bool, scores: str | None) -> list[str]:
    kinds = ["mask"] if mask else []
    if overlay:
        kinds.append("overlay")
    if scores:
        if scores not in SCORE_KINDS:
            raise UsageError(f"invalid --scores {scores!r}: use logits or probs")
        kinds.append(scores)
    return kinds


def plan_outputs(items: list[InputItem], out_dir: Path, kinds: list[str]) -> list[Job]:
    """Output paths for every input, mirroring the input folders under ``out_dir`` without collisions.

    Planned over the full (unsharded) input list, so every shard of a job array agrees on the names.
    """
    valid = [item for item in items if item.error is None]
    anchors = [os.path.abspath(item.anchor) for item in valid]
    base = os.path.commonpath(anchors) if anchors else os.path.abspath(".")
    relative = {item.abspath: os.path.relpath(item.abspath, base) for item in valid}
    stems: dict[tuple[str, str], int] = {}
    for rel in relative.values():
        key = (os.path.dirname(rel), os.path.splitext(os.path.basename(rel))[0])
        stems[key] = stems.get(key, 0) + 1
    inputs = set(relative)
    jobs = []
    for index, item in enumerate(items):
        job = Job(index=index, item=item)
        if item.error is None:
            rel = relative[item.abspath]
            folder, name = os.path.split(rel)
            stem = os.path.splitext(name)[0]
            if stems[(folder, stem)] > 1:
                stem = name
            job.outputs = _outputs_for(out_dir / folder, stem, kinds)
            if any(os.path.abspath(path) in inputs for path in job.outputs.values()):
                job.outputs = _outputs_for(out_dir / folder, name, kinds)
        jobs.append(job)
    return jobs


def _outputs_for(folder: Path, stem: str, kinds: list[str]) -> dict[str, Path]:
    return {kind: folder / f"{stem}{OUTPUT_SUFFIXES[kind]}" for kind in kinds}


def check_output_dir(out_dir: Path) -> None:
    """Fail early (usage error) when ``out_dir`` cannot be created or written to."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # a unique probe name: shards of a job array may share OUT
        handle, probe = tempfile.mkstemp(prefix=".deeplab-write-test-", dir=out_dir)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"cannot write to output folder {out_dir}: {reason}") from None


# ------------------------------------------------------------------------------------------- options


@dataclass
class SegmentOptions:
    """What to produce and how (the ``deeplab segment`` flags)."""

    out_dir: Path | None = None  # None: write the single mask to ``stdout_stream``
    mask: bool = True
    overlay: bool = False
    overlay_alpha: float = 0.5
    scores: str | None = None  # "logits" | "probs"
    skip_existing: bool = False
    batch_size: int = 1
    workers: int = 0  # reader/writer threads each; 0 = min(4, cores)
    crf: Any = None  # CRFParams or None
    crf_backend: str = "auto"
    crf_device: str | None = None
    fsync: bool = False
    stdout_stream: IO[bytes] | None = None

    @property
    def threads(self) -> int:
        return self.workers or min(4, os.cpu_count() or 1)

    @property
    def kinds(self) -> list[str]:
        return output_kinds(self.mask, self.overlay, self.scores)


@dataclass
class Record:
    """The outcome for one input (one JSON line with ``--json``)."""

    input: str
    status: str = "ok"  # ok | skipped | failed
    outputs: dict[str, str] = field(default_factory=dict)
    size: dict[str, int] | None = None
    classes: list[dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    scores: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"input": self.input, "status": self.status}
        for key in ("outputs", "size", "classes", "scores", "error"):
            value = getattr(self, key)
            if value:
                data[key] = value
        if self.timings:
            data["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        return data


@dataclass
class Summary:
    """Counts of a run (records themselves go to ``on_record`` and are not kept)."""

    ok: int = 0
    skipped: int = 0
    failed: int = 0
    elapsed: float = 0.0

    def add(self, record: Record) -> None:
        setattr(self, record.status, getattr(self, record.status) + 1)

    @property
    def total(self) -> int:
        return self.ok + self.skipped + self.failed


# ------------------------------------------------------------------------------------------- running


@dataclass
class _Slot:
    """One input's place in the output order: a ready record, or an image of a batch in flight."""

    record: Record | None = None
    batch: Future | None = None  # -> list of per-image futures or records
    offset: int = 0
    key: tuple[int, int] | None = None  # the padded size of its batch group

    @property
    def waiting_for_batch(self) -> bool:
        return self.record is None and self.batch is None

    def result(self, wait: bool) -> Record | None:
        """The record, or None when it is not ready and ``wait`` is false."""
        if self.record is not None:
            return self.record
        assert self.batch is not None
        if not wait and not self.batch.done():
            return None
        item = self.batch.result()[self.offset]
        if isinstance(item, Future):
            if not wait and not item.done():
                return None
            item = item.result()
        self.record = item
        return item

    def cancel(self) -> None:
        if self.batch is not None:
            self.batch.cancel()


@dataclass
class _Decoded:
    job: Job
    prepared: Any  # runtime.Prepared
    original: np.ndarray | None  # the full-size RGB image, kept when an output needs it


class Pipeline:
    """Run a :class:`~deeplab_cli.runtime.Segmenter` over many inputs with overlapped stages.

    ``on_record`` is called in input order, from the calling thread, once per input.
    """

    def __init__(
        self,
        segmenter: Any,
        options: SegmentOptions,
        on_record: Callable[[Record], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.options = options
        self.on_record = on_record or (lambda record: None)
        self.on_progress = on_progress or (lambda n: None)
        self._crf_pool: Any = None
        self._write_lock = threading.Lock()

    # -- main loop ---------------------------------------------------------------------------------------

    def run(self, jobs: Iterable[Job]) -> Summary:
        """Process every job, reporting each record (failures included) in input order."""
        options = self.options
        threads = options.threads
        sessions = getattr(self.segmenter, "sessions", 1)
        lookahead = max(2 * options.batch_size * sessions, 2 * threads)
        summary = Summary()
        pending: deque[_Slot] = deque()  # every input past decoding, in input order
        reads: deque[Future] = deque()  # decoding (or already failed/skipped) inputs, in input order
        groups: dict[tuple[int, int], list[tuple[_Decoded, _Slot]]] = {}  # decoded, waiting for a batch
        readers = ThreadPoolExecutor(threads, thread_name_prefix="deeplab-read")
        inferers = ThreadPoolExecutor(sessions, thread_name_prefix="deeplab-infer")
        writers = ThreadPoolExecutor(threads, thread_name_prefix="deeplab-write")

        def submit(size: tuple[int, int]) -> None:
            batch = groups.pop(size)
            future = inferers.submit(self._infer, [decoded for decoded, _ in batch], writers)
            for offset, (_, slot) in enumerate(batch):
                slot.batch, slot.offset = future, offset

        todo = iter(jobs)
        start = time.perf_counter()
        try:
            self._start_crf()
            while True:
                while len(reads) < lookahead and (job := next(todo, None)) is not None:
                    early = self._early_record(job)
                    reads.append(_done(early) if early is not None else readers.submit(self._decode, job))
                if not reads:
                    break
                result = reads.popleft().result()
                if isinstance(result, Record):
                    pending.append(_Slot(record=result))
                else:
                    size = result.prepared.padded_size
                    slot = _Slot(key=size)
                    pending.append(slot)
                    groups.setdefault(size, []).append((result, slot))
                    if len(groups[size]) >= options.batch_size:
                        submit(size)
                    elif sum(len(group) for group in groups.values()) >= lookahead:
                        submit(max(groups, key=lambda key: len(groups[key])))
                if not reads:  # nothing left decoding: flush the partial batches
                    for size in list(groups):
                        submit(size)
                self._drain(pending, summary, lookahead + options.batch_size * sessions, submit)
            self._drain(pending, summary, 0, submit)
        except BaseException:
            for future in reads:
                future.cancel()
            for slot in pending:
                slot.cancel()
            raise
        finally:
            readers.shutdown(wait=True, cancel_futures=True)
            inferers.shutdown(wait=True, cancel_futures=True)
            writers.shutdown(wait=True, cancel_futures=True)
            self._stop_crf()
        summary.elapsed = time.perf_counter() - start
        return summary

    def _drain(self, pending: deque[_Slot], summary: Summary, limit: int, submit: Callable) -> None:
        """Report finished records in input order; wait for the oldest while more than ``limit`` pend
        (submitting its partial batch first if it is still waiting for one)."""
        while pending:
            head = pending[0]
            wait = len(pending) > limit
            if head.waiting_for_batch:
                if not wait:
                    return
                submit(head.key)
            record = head.result(wait=wait)
            if record is None:
                return
            pending.popleft()
            summary.add(record)
            self.on_record(record)
            self.on_progress(1)

    # -- stages ------------------------------------------------------------------------------------------

    def _early_record(self, job: Job) -> Record | None:
        """A record without decoding: input errors and skipped inputs."""
        if job.item.error is not None:
            return Record(input=job.item.path, status="failed", error=job.item.error)
        if self.options.skip_existing and job.outputs and all(p.exists() for p in job.outputs.values()):
            return Record(input=job.item.path, status="skipped", outputs=_str_paths(job.outputs))
        return None

    def _decode(self, job: Job) -> _Decoded | Record:
        try:
            prepared = self.segmenter.prepare(job.item.path)
            original = None
            if self.options.overlay or self.options.crf is not None:
                same = prepared.input_size == prepared.image_size
                # shrunk for the network: the outputs need the full-size image, decoded again
                original = prepared.rgb if same else dio.read_image(job.item.path)
        except DeeplabError as exc:
            return Record(input=job.item.path, status="failed", error=str(exc))
        except Exception as exc:  # any other failure of one input must not stop the batch
            return Record(input=job.item.path, status="failed", error=f"{job.item.path}: {exc}")
        return _Decoded(job=job, prepared=prepared, original=original)

    def _infer(self, batch: list[_Decoded], writers: ThreadPoolExecutor) -> list[Future | Record]:
        """Run one batch, then hand each image to the writer pool (one future or record per image)."""
        start = time.perf_counter()
        try:
            logits = self.segmenter.run([item.prepared for item in batch])
        except Exception as exc:
            return [_failed(item.job.item.path, f"inference failed: {exc}") for item in batch]
        share = (time.perf_counter() - start) / len(batch)
        results: list[Future | Record] = []
        for offset, item in enumerate(batch):
            item.prepared.timings["infer"] = share
            results.append(writers.submit(self._finish, item, logits[offset]))
        return results

    def _finish(self, item: _Decoded, logits: np.ndarray) -> Record:
        path = item.job.item.path
        try:
            return self._finish_one(item, logits)
        except DeeplabError as exc:
            return Record(input=path, status="failed", error=str(exc))
        except OSError as exc:
            where = exc.filename or path
            return Record(input=path, status="failed", error=f"{path}: cannot write {where}: {exc.strerror}")
        except Exception as exc:
            return Record(input=path, status="failed", error=f"{path}: {type(exc).__name__}: {exc}")

    def _finish_one(self, item: _Decoded, logits: np.ndarray) -> Record:
        options, spec = self.options, self.segmenter.spec
        need_probs = options.scores == "probs" or options.crf is not None
        prediction = self.segmenter.finish(item.prepared, logits, return_probs=need_probs)
        timings = prediction.timings
        if options.crf is not None:
            start = time.perf_counter()
            prediction.probs = self._refine(item.original, prediction.probs)
            prediction.labels = prediction.probs.argmax(axis=0).astype(prediction.labels.dtype)
            timings["crf"] = time.perf_counter() - start
        start = time.perf_counter()
        outputs = item.job.outputs
        written: dict[str, str] = {}
        for kind, target in outputs.items():
            self._write(kind, target, item, prediction)
            written[kind] = str(target)
        if options.out_dir is None and options.stdout_stream is not None:
            data = dio.encode_label_png(prediction.labels, spec.palette)
            with self._write_lock:
                options.stdout_stream.write(data)
                options.stdout_stream.flush()
            written["mask"] = "-"
        timings["write"] = time.perf_counter() - start
        height, width = prediction.image_size
        record = Record(
            input=item.job.item.path,
            outputs=written,
            size={"width": width, "height": height},
            classes=prediction.class_fractions(spec.class_names),
            timings=timings,
        )
        if options.scores:
            record.scores = {
                "kind": options.scores,
                "shape": list(
                    prediction.logits.shape if options.scores == "logits" else prediction.probs.shape
                ),
                "input_size": list(prediction.input_size),
                "padded_size": list(prediction.padded_size),
                "crop_box": list(prediction.crop_box),
                "output_stride": spec.output_stride,
            }
        return record

    def _write(self, kind: str, target: Path, item: _Decoded, prediction: Any) -> None:
        spec, fsync = self.segmenter.spec, self.options.fsync
        if kind == "mask":
            dio.write_label_png(target, prediction.labels, spec.palette, fsync=fsync)
        elif kind == "overlay":
            from deeplab_cli.palette import overlay

            background = 0 if spec.class_names and spec.class_names[0] == "background" else None
            picture = overlay(
                item.original, prediction.labels, spec.palette, self.options.overlay_alpha, background
            )
            dio.write_image(target, picture, fsync=fsync)
        elif kind == "logits":
            dio.write_npy(target, prediction.logits.astype(np.float16), fsync=fsync)
        elif kind == "probs":
            dio.write_npz(target, {"probs": prediction.probs.astype(np.float16)}, fsync=fsync)

    # -- CRF -----------------------------------------------------------------------------------------------

    def _start_crf(self) -> None:
        """CPU CRF runs in worker processes (one per writer thread, one thread each); CUDA in-process."""
        options = self.options
        if options.crf is None or (options.crf_device or "cpu").startswith("cuda"):
            return
        from deeplab_cli.crf.workers import CRFWorkerPool

        self._crf_pool = CRFWorkerPool(
            options.crf, backend=options.crf_backend, processes=options.threads, threads=1, device="cpu"
        )

    def _stop_crf(self) -> None:
        if self._crf_pool is not None:
            self._crf_pool.close(cancel=True)
            self._crf_pool = None

    def _refine(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        if self._crf_pool is not None:
            return self._crf_pool.submit(image, probs).result()
        from deeplab_cli.crf import refine

        options = self.options
        return refine(image, probs, options.crf, backend=options.crf_backend, device=options.crf_device)


def _failed(path: str, reason: str) -> Record:
    return Record(input=path, status="failed", error=f"{path}: {reason}")


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _str_paths(paths: dict[str, Path]) -> dict[str, str]:
    return {kind: str(path) for kind, path in paths.items()}
