"""The overlapped batch scheduler: read-ahead -> inference -> finish (upsample, CRF) + write.

A pool of reader threads decodes images ahead of the network, inference threads (one per ONNX Runtime
session) run batches of inputs that share a padded size, and a pool of writer threads upsamples the
scores, runs the CRF (when asked) and writes the outputs. Every queue between stages is bounded, so
memory stays flat however many images go through. Records reach ``on_record`` in input order.

On an interrupt (Ctrl-C, or SIGTERM turned into one by the CLI) queued work is cancelled, the writes in
flight finish (each is atomic), and every input whose outputs were written is still reported before the
interrupt propagates: nothing written goes unreported.
"""

from __future__ import annotations

import contextlib
import inspect
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from deeplab_cli import files
from deeplab_cli.batch.options import SegmentOptions
from deeplab_cli.batch.outputs import Job, skipped_record, write_outputs
from deeplab_cli.batch.records import Record, Summary
from deeplab_cli.errors import DeeplabError

if TYPE_CHECKING:
    from deeplab_cli.runtime import Prediction, Prepared
    from deeplab_cli.zoo import ModelSpec

T = TypeVar("T")


class Refiner(Protocol):
    """What the scheduler needs of :class:`deeplab_cli.crf.runner.CRFRunner`."""

    def refine(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray: ...


class SegmenterLike(Protocol):
    """What the scheduler needs of :class:`deeplab_cli.runtime.Segmenter` (tests use a small fake)."""

    spec: ModelSpec
    sessions: int

    def prepare(self, image: str) -> Prepared: ...

    def run(self, prepared: list[Prepared]) -> np.ndarray: ...

    def finish(
        self, prepared: Prepared, logits: np.ndarray, return_probs: bool = False, crf: Refiner | None = None
    ) -> Prediction: ...


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
        if self.batch is None or (not wait and not self.batch.done()):
            return None
        item = self.batch.result()[self.offset]
        if isinstance(item, Future):
            if not wait and not item.done():
                return None
            item = item.result()
        self.record = item
        return item

    def finished(self) -> Record | None:
        """The record if it is ready now (cancelled work has none)."""
        with contextlib.suppress(CancelledError):
            return self.result(wait=False)
        return None

    def cancel(self) -> None:
        if self.batch is not None:
            self.batch.cancel()


@dataclass
class Decoded:
    job: Job
    prepared: Prepared
    original: np.ndarray | None  # the full-size RGB image, kept when an output needs it


class Scheduler:
    """Run a segmenter over many jobs with overlapped stages (see the module docstring)."""

    def __init__(
        self,
        segmenter: SegmenterLike,
        options: SegmentOptions,
        crf: Refiner | None = None,
        on_record: Callable[[Record], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.options = options
        self.crf = crf
        self.on_record = on_record or (lambda record: None)
        self.on_progress = on_progress or (lambda n: None)
        self._finish_runs_crf = crf is not None and "crf" in inspect.signature(segmenter.finish).parameters

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
        groups: dict[tuple[int, int], list[tuple[Decoded, _Slot]]] = {}  # decoded, waiting for a batch
        readers = ThreadPoolExecutor(threads, thread_name_prefix="deeplab-read")
        inferers = ThreadPoolExecutor(sessions, thread_name_prefix="deeplab-infer")
        writers = ThreadPoolExecutor(threads, thread_name_prefix="deeplab-write")
        pools = (readers, inferers, writers)

        def submit(size: tuple[int, int]) -> None:
            batch = groups.pop(size)
            future = inferers.submit(self._infer, [decoded for decoded, _ in batch], writers)
            for offset, (_, slot) in enumerate(batch):
                slot.batch, slot.offset = future, offset

        todo = iter(jobs)
        start = time.perf_counter()
        try:
            while True:
                while len(reads) < lookahead and (job := next(todo, None)) is not None:
                    early = self.early_record(job)
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
            self._stop_crf()  # a refine in flight would hold its writer (and the exit) for seconds
            _shutdown(pools)  # the writes in flight complete (atomically)
            self._report_written(pending)
            raise
        finally:
            _shutdown(pools)
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
            with _signals_deferred():  # reported and dequeued together, or neither: none lost on Ctrl-C
                self.on_record(record)
                pending.popleft()
            summary.add(record)
            self.on_progress(1)

    def _stop_crf(self) -> None:
        """Interrupted: stop the CRF workers now (the refines waiting on them fail, nothing is written)."""
        close = getattr(self.crf, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close(cancel=True)

    def _report_written(self, pending: deque[_Slot]) -> None:
        """After an interrupt: report every input whose outputs were written (in input order)."""
        for slot in pending:
            record = slot.finished()
            if record is not None and record.outputs:
                with contextlib.suppress(Exception):  # e.g. stdout gone: the interrupt wins
                    self.on_record(record)

    # -- stages ------------------------------------------------------------------------------------------

    def early_record(self, job: Job) -> Record | None:
        """A record without decoding: input errors, refused outputs and skipped inputs."""
        if job.error is not None:
            return Record(input=job.item.path, status="failed", error=job.error)
        if self.options.skip_existing and job.outputs and all(p.exists() for p in job.outputs.values()):
            return skipped_record(job)
        return None

    def _decode(self, job: Job) -> Decoded | Record:
        try:
            prepared = self.segmenter.prepare(job.item.path)
            original = None
            if self.options.overlay or (self.crf is not None and not self._finish_runs_crf):
                original = _full_size_image(prepared, job.item.path)
        except DeeplabError as exc:
            return Record(input=job.item.path, status="failed", error=str(exc))
        except Exception as exc:  # any other failure of one input must not stop the batch
            return _failed(job.item.path, f"{type(exc).__name__}: {exc}")
        return Decoded(job=job, prepared=prepared, original=original)

    def _infer(self, batch: list[Decoded], writers: ThreadPoolExecutor) -> list[Future | Record]:
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
            results.append(writers.submit(self.finish, item, logits[offset]))
        return results

    def finish(self, item: Decoded, logits: np.ndarray) -> Record:
        path = item.job.item.path
        try:
            prediction = self._predict(item, logits)
            return write_outputs(item.job, item.original, prediction, self.options, self.segmenter.spec)
        except DeeplabError as exc:
            return Record(input=path, status="failed", error=str(exc))
        except OSError as exc:
            return _failed(path, exc.strerror or str(exc))
        except Exception as exc:
            return _failed(path, f"{type(exc).__name__}: {exc}")

    def _predict(self, item: Decoded, logits: np.ndarray) -> Prediction:
        """Upsample (and refine with the CRF when asked): the runtime's ``finish`` does both when it can."""
        # a .probs.npz is written from the prediction's bands (iter_prob_bands): C x H x W is never held
        finish = self.segmenter.finish
        if self.crf is None:
            return finish(item.prepared, logits)
        if self._finish_runs_crf:
            return finish(item.prepared, logits, crf=self.crf)
        prediction = finish(item.prepared, logits, return_probs=True)
        start = time.perf_counter()
        assert item.original is not None and prediction.probs is not None
        prediction.probs = self.crf.refine(item.original, prediction.probs)
        prediction.labels = prediction.probs.argmax(axis=0).astype(prediction.labels.dtype)
        prediction.timings["crf"] = time.perf_counter() - start
        return prediction


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the duration of the block, then deliver them to their handlers.

    In the main thread only (elsewhere signals never arrive); a no-op when the handlers cannot be set.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for signum in caught:
            signal.raise_signal(signum)


def _full_size_image(prepared: Prepared, path: str) -> np.ndarray:
    """The image at its own size, for overlays: kept by ``prepare`` when it can, else decoded again."""
    source = getattr(prepared, "source", None)
    if source is not None:
        return source
    if prepared.input_size == prepared.image_size:
        return prepared.rgb
    return files.read_image(path)


def _shutdown(pools: Iterable[ThreadPoolExecutor]) -> None:
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def _failed(path: str, reason: str) -> Record:
    return Record(input=path, status="failed", error=f"{path}: {reason}")


def _done(value: T) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
