"""Run the CRF in worker processes so that it overlaps with network inference.

Usage in a batch pipeline::

    from deeplab_cli.crf import CRFParams
    from deeplab_cli.crf.workers import CRFWorkerPool

    with CRFWorkerPool(CRFParams(), backend="auto", processes=1, threads=1) as pool:
        futures = []
        for image, probs in batches_from_the_network():      # inference keeps running meanwhile
            futures.append(pool.submit(image, probs))       # -> concurrent.futures.Future
        for fut in futures:
            refined = fut.result()                           # C x H x W float32, input order kept
                                                             # by the caller; errors re-raised here

The pool uses ``ProcessPoolExecutor`` with the ``spawn`` start method (safe with threads, CUDA and
macOS/Windows), and each worker limits PyTorch (and BLAS/OpenMP) to ``threads`` threads so that
``processes * threads`` stays within the cores left to inference. Workers run on the CPU
(``device="cpu"``) unless told otherwise; for a GPU run, refine in the main process with
``refine_batch`` instead, which batches on the device. ``max_pending`` bounds the number of images in
flight: ``submit`` blocks when it is reached, so memory stays flat on long runs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from .params import CRFParams

__all__ = ["CRFWorkerPool"]

_WORKER_STATE: dict = {}


def _init_worker(params: dict, backend: str, device: str, threads: int) -> None:
    """Per-process setup: thread limits first, then the parameters."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    # Spinning OpenMP threads steal the CPU from inference on a shared machine (torch loads here first).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads)
    _WORKER_STATE.update(params=CRFParams.from_dict(params), backend=backend, device=device)


def _refine_in_worker(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    from .core import refine

    s = _WORKER_STATE
    return refine(image, probs, s["params"], backend=s["backend"], device=s["device"])


class CRFWorkerPool:
    """A pool of CRF worker processes; ``submit(image, probs)`` returns a Future of the refined probs."""

    def __init__(
        self,
        params: CRFParams | None = None,
        backend: str = "auto",
        processes: int = 1,
        threads: int = 1,
        device: str = "cpu",
        max_pending: int | None = None,
    ) -> None:
        if processes < 1 or threads < 1:
            raise ValueError(f"CRF workers need processes >= 1 and threads >= 1, got {processes}, {threads}")
        self.params = params or CRFParams()
        self.processes = processes
        self._slots = threading.BoundedSemaphore(max_pending or 2 * processes)
        self._executor = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.params.to_dict(), backend, device, threads),
        )

    def submit(self, image: np.ndarray, probs: np.ndarray) -> Future:
        """Queue one image (blocks while ``max_pending`` images are in flight)."""
        self._slots.acquire()
        try:
            fut = self._executor.submit(_refine_in_worker, image, probs)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _f: self._slots.release())
        return fut

    def map(self, images, probs_list) -> list[np.ndarray]:
        """Refine pairs and return the results in order."""
        futures = [self.submit(im, p) for im, p in zip(images, probs_list, strict=True)]
        return [f.result() for f in futures]

    def close(self, cancel: bool = False) -> None:
        """Stop the workers (waits for queued work unless ``cancel``)."""
        self._executor.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> CRFWorkerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)
