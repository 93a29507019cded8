"""One way to run the dense CRF next to inference: inline, in worker processes, or batched on a GPU.

``CRFRunner(params, backend, device, workers, threads)`` is what ``segment``, ``eval`` and ``crf tune`` use:

- the backend is resolved and checked when the runner is made, before any image is read (a missing
  package is one line naming its pip command, exit 2);
- on a CUDA device (the torch backend), images submitted together are refined as one batch on the GPU by a
  background thread;
- on the CPU with ``workers == 0`` the CRF runs inline in the caller's thread;
- with ``workers > 0`` it runs in a pool of ``spawn``-ed processes (fork after ONNX Runtime or numba
  threads started is unsafe). Workers ignore SIGINT and SIGTERM (the parent decides: Ctrl-C reaches the
  whole process group, and a worker that died of it would print a traceback), exit on their own when the
  parent dies (a watchdog thread polls ``os.getppid()``), and ``close(cancel=True)`` kills them at once.

:func:`default_crf_workers` decides how many cores the CRF gets next to the network (issue 12's core split).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from deeplab_cli.device import Device, parse_device
from deeplab_cli.errors import DeeplabError

from .backends import CPU_ONLY, choose_backend
from .params import CRFParams, CRFParamsError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess
    from types import TracebackType

    from .core import LogitsGrid

__all__ = ["CRFRunner", "CRFWorkerError", "default_crf_workers", "network_threads", "set_notices"]

WATCHDOG_PERIOD_S = 0.25
GPU_MAX_BATCH = 32
GPU_IN_FLIGHT = 8  # images a caller keeps queued for the GPU: batches without holding many C x H x W maps
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


MAX_CRF_WORKERS = 8  # each worker holds one image's lattices and label arrays (about 1 GB at the 2 MP cap)
COMPILING_NOTICE_AFTER_S = 2.0  # a warm-up slower than this is compiling the numba kernels (loading: ~0.5 s)
_NOTICES = {"on": True}


def set_notices(on: bool) -> bool:
    """Whether CRF workers say on stderr that their first start on this machine is compiling the numba
    kernels (a pause of about a minute, once); ``--quiet`` turns it off. Returns the previous setting."""
    previous, _NOTICES["on"] = _NOTICES["on"], bool(on)
    return previous


def default_crf_workers(cores: int, network_on_gpu: bool) -> tuple[int, int]:
    """How the CRF shares the machine with inference: ``(worker processes, threads per worker)``.

    Measured on VOC images with the default model (``benchmarks/bench_segment_crf.py``): the CRF costs
    about three times the network's CPU time per image (numba ~0.9 s, the network ~0.3 s at 500x375), and
    one-thread worker processes use a core better than threads inside one (two numba threads refine an
    image only 1.44x faster than one). So the CRF gets three quarters of the cores, rounded up, as
    one-thread processes; the network keeps the rest (at least one thread) and the operating system
    shares a core when the counts overlap. On 2 cores that is 2 workers beside the network: 20 VOC
    images in 15.6 s against 24.0 s with 1 worker (pydensecrf: 17.3 against 27.0 s).

    - 1 core: nothing to split; the CRF runs inline, one thread (``(0, 1)``).
    - network on the CPU: ``ceil(3/4 cores)`` one-thread workers (2 cores: ``(2, 1)``; 8 cores: ``(6, 1)``).
    - network on the GPU: the CPU only feeds the GPU (decode, write), so one core stays for that and the
      rest go to the CRF (2 cores: ``(1, 1)``; 8 cores: ``(7, 1)``).
    - at most :data:`MAX_CRF_WORKERS` processes (memory); cores beyond that become threads in them
      (64 cores, CPU network: ``(8, 6)``). When the CRF itself runs on the GPU these values are unused.
    """
    cores = max(1, int(cores))
    if cores == 1:
        return 0, 1
    crf_cores = cores - 1 if network_on_gpu else -(-3 * cores // 4)
    workers = min(MAX_CRF_WORKERS, crf_cores)
    return workers, max(1, crf_cores // workers)


def network_threads(cores: int, crf_workers: int, crf_threads: int) -> int | None:
    """Threads left to a CPU network beside CRF workers (None: no workers, so no split: the default)."""
    if crf_workers <= 0:
        return None
    return max(1, max(1, int(cores)) - crf_workers * crf_threads)


# -- worker processes -------------------------------------------------------------------------------------

_WORKER: dict[str, object] = {}


def _watch_parent(parent: int) -> None:
    """Exit this worker when its parent is gone (a killed parent must not leave workers at 100% CPU)."""
    while True:
        time.sleep(WATCHDOG_PERIOD_S)
        if os.getppid() != parent:
            os._exit(0)


def _init_worker(params: dict[str, object], backend: str, threads: int, parent: int, notices: bool) -> None:
    """Per-process setup: ignore the signals the parent handles, watch the parent, limit threads."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watchdog").start()
    for var in _THREAD_VARS:
        os.environ[var] = str(threads)
    # Spinning OpenMP threads steal the CPU from inference on a shared machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
    _WORKER.update(params=CRFParams.from_dict(params), backend=backend, threads=threads, notices=notices)


def _warm_up() -> int:
    """Run the backend once on a tiny image so that imports and JIT compilation happen at start-up (for
    numba: all its kernels, compiled by one worker while the others wait to load them)."""
    if _WORKER["backend"] == "numba":
        from .numba_backend import warm_up

        warm_up(_say_compiling if _WORKER["notices"] else None, COMPILING_NOTICE_AFTER_S)
    else:
        tiny_image = np.zeros((4, 4, 3), dtype=np.uint8)
        tiny_probs = np.full((2, 4, 4), 0.5, dtype=np.float32)
        _refine_in_worker(tiny_image, tiny_probs, None)
    return os.getpid()


def _say_compiling() -> None:
    print(
        "deeplab: compiling the CRF (once per installation and numba version; about a minute)...",
        file=sys.stderr,
        flush=True,
    )


def _refine_in_worker(
    image: np.ndarray, scores: np.ndarray, params: CRFParams | None, grid: LogitsGrid | None = None
) -> np.ndarray:
    """Refine probabilities, or logits resampled by ``grid`` (see :func:`.core.refine_logits`)."""
    from .core import refine, refine_logits

    default, backend, threads = _WORKER["params"], _WORKER["backend"], _WORKER["threads"]
    assert isinstance(default, CRFParams) and isinstance(backend, str) and isinstance(threads, int)
    chosen = params or default
    if grid is not None:
        return refine_logits(image, scores, grid, chosen, backend=backend, device="cpu", threads=threads)
    return refine(image, scores, chosen, backend=backend, device="cpu", threads=threads)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread while children start: they inherit the mask, so a Ctrl-C
    during their start-up cannot kill them with a traceback; the parent gets it once unblocked."""
    wanted = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_main(
    conn: Connection, params: dict[str, object], backend: str, threads: int, parent: int, notices: bool
) -> None:
    """A CRF worker: set up, say ready, then refine what comes down the pipe until it closes."""
    try:
        _init_worker(params, backend, threads, parent, notices)
        conn.send(("ok", _warm_up()))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", _picklable(exc)))
        return
    while True:
        try:
            header = conn.recv()
            if header is None:
                return
            image, scores = _receive_arrays(conn, header[:2])
        except (EOFError, OSError):
            return
        except Exception as exc:  # noqa: BLE001 - e.g. no memory for the arrays: say so, then stop
            conn.send(("error", _picklable(exc)))
            return
        try:
            refined = _refine_in_worker(image, scores, header[2], header[3])
        except Exception as exc:  # noqa: BLE001 - re-raised in the parent by the Future
            conn.send(("error", _picklable(exc)))
            continue
        del image, scores
        conn.send(("ok", _array_spec(refined)))
        _send_arrays(conn, [refined])


_ArraySpec = tuple[tuple[int, ...], str] | None  # None: the array follows pickled


def _array_spec(array: np.ndarray) -> _ArraySpec:
    """Shape and dtype for a plain numeric array; None for anything else (object arrays hold pointers,
    which must never cross as bytes: they go pickled, and the worker's input check names them)."""
    if not isinstance(array, np.ndarray) or array.dtype.hasobject or array.dtype.kind not in "biufc":
        return None
    return array.shape, array.dtype.str


def _send_arrays(conn: Connection, arrays: Sequence[np.ndarray]) -> None:
    """The arrays that have a spec as raw bytes (no pickle: half the cost for 15 MB), others pickled."""
    for array in arrays:
        if _array_spec(array) is None:
            conn.send(array)
        else:
            conn.send_bytes(memoryview(np.ascontiguousarray(array)).cast("B"))


def _receive_arrays(conn: Connection, specs: Sequence[_ArraySpec]) -> list[np.ndarray]:
    """What :func:`_send_arrays` sent, raw bytes read into new arrays of the announced shape and dtype."""
    arrays = []
    for spec in specs:
        if spec is None:
            arrays.append(conn.recv())
            continue
        shape, dtype = spec
        array = np.empty(shape, dtype=np.dtype(dtype))
        if array.nbytes:
            conn.recv_bytes_into(memoryview(array).cast("B"))
        else:
            conn.recv_bytes()
        arrays.append(array)
    return arrays


def _picklable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling, else a one-line DeeplabError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any pickling failure
        return CRFWorkerError(f"{type(exc).__name__}: {exc}")
    return exc


class CRFWorkerError(DeeplabError):
    """A CRF worker process failed to start or stopped unexpectedly."""


# image, probabilities (or logits with their grid), per-image parameters, the caller's future
_Task = tuple[np.ndarray, np.ndarray, "LogitsGrid | None", "CRFParams | None", "Future[np.ndarray]"]


class _ProcessPool:
    """CRF worker processes, one pipe and one feeding thread each, a bounded number of images in flight.

    Arrays cross the pipe as raw bytes behind a small pickled header (shape, dtype), read straight into
    their destination: a 500x375 image's 21 probability planes (15 MB) each way cost about half of what
    pickling them did.

    Pipes rather than ``ProcessPoolExecutor``'s queues: they hold no named semaphores, so a process that
    exits at once on Ctrl-C (``os._exit``) leaves nothing for the resource tracker to complain about.
    """

    def __init__(self, params: CRFParams, backend: str, workers: int, threads: int, max_pending: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._broken: Exception | None = None
        self._running = workers
        self._workers: list[tuple[BaseProcess, Connection]] = []
        args = (params.to_dict(), backend, threads, os.getpid(), _NOTICES["on"])
        with _signals_blocked():  # children inherit the mask: no Ctrl-C traceback while they start
            for _ in range(workers):
                ours, theirs = context.Pipe()
                process = context.Process(
                    target=_worker_main, args=(theirs, *args), daemon=True, name="deeplab-crf"
                )
                process.start()
                theirs.close()
                self._workers.append((process, ours))
        self._ready: list[Future[int]] = [Future() for _ in range(workers)]
        self._feeders = [
            threading.Thread(target=self._feed, args=(index,), daemon=True, name=f"crf-feed-{index}")
            for index in range(workers)
        ]
        for feeder in self._feeders:
            feeder.start()

    def wait_ready(self) -> None:
        """Block until every worker has started and run the backend once (for timing start-up)."""
        for future in self._ready:
            future.result()

    def submit(
        self, image: np.ndarray, scores: np.ndarray, grid: LogitsGrid | None, params: CRFParams | None
    ) -> Future[np.ndarray]:
        if self._broken is not None:
            raise self._broken
        self._slots.acquire()
        future: Future[np.ndarray] = Future()
        future.add_done_callback(lambda _f: self._slots.release())
        self._tasks.put((image, scores, grid, params, future))
        return future

    def _feed(self, index: int) -> None:
        """Hand tasks to worker ``index`` one at a time; its death fails its task, not the caller."""
        process, conn = self._workers[index]
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):
            kind, value = (
                "error",
                CRFWorkerError(f"a CRF worker failed to start (exit code {process.exitcode})"),
            )
        if kind != "ok":
            self._ready[index].set_exception(value)
            self._stopped(value)
            return
        self._ready[index].set_result(value)
        while True:
            task = self._tasks.get()
            if task is None:
                with contextlib.suppress(OSError):
                    conn.send(None)
                return
            image, scores, grid, params, future = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                conn.send((_array_spec(image), _array_spec(scores), params, grid))
                _send_arrays(conn, [image, scores])
                kind, value = conn.recv()
                if kind == "ok":
                    (value,) = _receive_arrays(conn, [value])
            except (EOFError, OSError, TypeError):  # TypeError: a pipe closed under us on shutdown
                error = CRFWorkerError("a CRF worker process stopped unexpectedly")
                future.set_exception(error)
                self._stopped(error)
                return
            if kind == "ok":
                future.set_result(value)
            else:
                future.set_exception(value)

    def _stopped(self, error: Exception) -> None:
        """A feeder is gone; when none is left, fail what is still queued instead of hanging."""
        with self._lock:
            self._running -= 1
            if self._running > 0:
                return
            self._broken = error
        self._drain(error)

    def _drain(self, error: Exception | None) -> None:
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            if task is None:
                continue
            future = task[4]
            if error is None:
                future.cancel()
            elif future.set_running_or_notify_cancel():
                future.set_exception(error)

    def pids(self) -> list[int]:
        return [process.pid for process, _ in self._workers if process.pid is not None]

    def close(self, cancel: bool) -> None:
        if cancel:
            self._drain(None)
            for process, _ in self._workers:  # they ignore SIGTERM by design: the parent ends them
                if process.is_alive():
                    process.kill()
        for _ in self._workers:
            self._tasks.put(None)
        for process, _ in self._workers:
            process.join(timeout=None if not cancel else 5)
        for feeder in self._feeders:  # before the pipes close: a feeder may still be writing to one
            feeder.join(timeout=5)
        for _, conn in self._workers:
            conn.close()


# -- the GPU batcher --------------------------------------------------------------------------------------

_Item = tuple[np.ndarray, np.ndarray, CRFParams, "Future[np.ndarray]"]


class _GPUBatcher:
    """A thread that refines whatever has been submitted so far as one batch on the GPU."""

    def __init__(self, params: CRFParams, device: str, max_batch: int = GPU_MAX_BATCH):
        self.params, self.device, self.max_batch = params, device, max_batch
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=4 * max_batch)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="crf-gpu")
        self._thread.start()

    def submit(self, image: np.ndarray, probs: np.ndarray, params: CRFParams | None) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        self._queue.put((image, probs, params or self.params, future))
        return future

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            batch = [entry for entry in batch if entry[3].set_running_or_notify_cancel()]
            for params in dict.fromkeys(entry[2] for entry in batch):  # one run per parameter set
                self._run([entry for entry in batch if entry[2] == params], params)

    def _run(self, batch: list[_Item], params: CRFParams) -> None:
        from .core import refine_batch

        try:
            images, probs = [entry[0] for entry in batch], [entry[1] for entry in batch]
            results = refine_batch(images, probs, params, backend="torch", device=self.device)
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            for entry in batch:
                entry[3].set_exception(exc)
            return
        for entry, result in zip(batch, results, strict=True):
            entry[3].set_result(result)

    def close(self, cancel: bool) -> None:
        if cancel:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[3].cancel()
        self._queue.put(None)
        self._thread.join(timeout=None if not cancel else 10)


# -- the runner -------------------------------------------------------------------------------------------


class CRFRunner:
    """Refines images with the dense CRF: ``refine`` (blocking) or ``submit`` (a Future); thread-safe.

    ``backend``: ``auto``, ``numba``, ``torch`` or ``pydensecrf`` (checked now: a missing one is a
    :class:`~deeplab_cli.crf.backends.BackendUnavailableError`). ``device``: where the torch backend runs
    (``cuda:N`` keeps its index; numba and pydensecrf always run on the CPU). ``workers``: 0 = inline in
    the caller's thread, N > 0 = N worker processes, None = :func:`default_crf_workers` for this machine
    (with ``network_on_gpu`` telling it whether inference leaves the CPU free). ``threads``: threads per
    worker (or inline); None = the split's value for pools, the backend's default inline.
    """

    def __init__(
        self,
        params: CRFParams,
        backend: str = "auto",
        device: str | Device = "cpu",
        workers: int | None = 0,
        threads: int | None = None,
        *,
        network_on_gpu: bool = False,
        max_pending: int | None = None,
    ) -> None:
        if not isinstance(params, CRFParams):
            raise CRFParamsError(f"CRF params must be a CRFParams, got {type(params).__name__}")
        if workers is not None and workers < 0:
            raise CRFParamsError(f"CRF workers must be >= 0, got {workers}")
        if threads is not None and threads < 1:
            raise CRFParamsError(f"CRF threads must be >= 1, got {threads}")
        self.params = params
        self.device = parse_device(device)
        explicit_cpu = (backend or "").strip().lower() in CPU_ONLY
        self.torch_device = "cpu" if explicit_cpu else self.device.torch_device_name()
        on_cuda = self.torch_device.startswith("cuda")
        self.backend = choose_backend(backend, on_cuda=on_cuda)
        if workers is None:
            workers, auto_threads = default_crf_workers(os.cpu_count() or 1, network_on_gpu)
            threads = threads or auto_threads
        self.workers = 0 if on_cuda else workers
        self.threads = threads
        self._pool: _ProcessPool | None = None
        self._gpu: _GPUBatcher | None = None
        self._closed = False
        if on_cuda:
            self._gpu = _GPUBatcher(params, self.torch_device)
        elif self.workers > 0:
            pending = max_pending or 2 * self.workers
            self._pool = _ProcessPool(params, self.backend, self.workers, threads or 1, pending)
        elif threads is not None and self.backend == "torch":
            import torch

            torch.set_num_threads(threads)

    @property
    def mode(self) -> str:
        """``gpu``, ``processes`` or ``inline``: how images are refined."""
        return "gpu" if self._gpu else "processes" if self._pool else "inline"

    @property
    def in_flight(self) -> int:
        """How many images a caller should keep submitted to keep this runner busy (a GPU batches them,
        workers each need one queued behind the one they refine)."""
        return GPU_IN_FLIGHT if self._gpu else 2 * self.workers if self._pool else 1

    def describe(self) -> str:
        """One line for logs, e.g. ``numba, 1 worker x 1 thread``."""
        if self._gpu:
            return f"{self.backend} on {self.torch_device}"
        if self._pool:
            return f"{self.backend}, {self.workers} worker(s) x {self.threads or 1} thread(s)"
        return f"{self.backend}, inline"

    def refine(self, image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
        """CRF-refined C x H x W float32 probabilities of one image (blocks until done).

        ``params`` overrides the runner's parameters for this image (``crf tune`` scores candidates so).
        """
        if self._pool is None and self._gpu is None:
            self._check_open()
            from .core import refine

            chosen = params or self.params
            return refine(image, probs, chosen, backend=self.backend, device="cpu", threads=self.threads)
        return self.submit(image, probs, params).result()

    def refine_logits(
        self, image: np.ndarray, logits: np.ndarray, grid: LogitsGrid, params: CRFParams | None = None
    ) -> np.ndarray:
        """:meth:`refine` of ``grid.dense_probs(logits)`` (the network's C x h x w logits resampled onto
        the image's grid, softmaxed), made where the CRF runs: a worker gets the small logits instead of
        C x H x W probabilities, and the numba backend goes from logits to its unary in one pass."""
        self._check_open()
        if self._gpu is not None:
            return self._gpu.submit(image, grid.dense_probs(logits), params).result()
        if self._pool is not None:
            return self._pool.submit(image, logits, grid, params).result()
        from .core import refine_logits

        chosen = params or self.params
        return refine_logits(
            image, logits, grid, chosen, backend=self.backend, device="cpu", threads=self.threads
        )

    def refine_many(self, images: Sequence[np.ndarray], probs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Refine several images (batched on a GPU, in parallel in a pool); results in input order."""
        futures = [self.submit(im, p) for im, p in zip(images, probs, strict=True)]
        return [future.result() for future in futures]

    def submit(
        self, image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None
    ) -> Future[np.ndarray]:
        """Queue one image; the Future holds the refined probabilities or the error.

        Inline, the work is done before this returns. With a pool, this blocks while ``max_pending``
        images are in flight, so memory stays flat however fast images come.
        """
        self._check_open()
        if self._pool is not None:
            return self._pool.submit(image, probs, None, params)
        if self._gpu is not None:
            return self._gpu.submit(image, probs, params)
        future: Future[np.ndarray] = Future()
        try:
            future.set_result(self.refine(image, probs, params))
        except Exception as exc:  # noqa: BLE001 - the caller reads it from the Future
            future.set_exception(exc)
        return future

    def wait_ready(self) -> None:
        """Block until worker processes have started (no-op inline); for timing and tests."""
        if self._pool is not None:
            self._pool.wait_ready()

    def worker_pids(self) -> list[int]:
        """The worker processes' ids (empty inline or on a GPU)."""
        return self._pool.pids() if self._pool is not None else []

    def close(self, cancel: bool = False) -> None:
        """Finish queued work (or, with ``cancel``, drop it and kill the workers at once). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.close(cancel)
        if self._gpu is not None:
            self._gpu.close(cancel)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the CRF runner is closed")

    def __enter__(self) -> CRFRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(cancel=exc_type is not None)
