"""Inference off the event loop: a few worker threads fed by a bounded queue.

``submit`` never blocks and never grows memory: when the queue is full it raises :class:`QueueFull`
at once (the server answers 503 with Retry-After). A job cancelled while it waits (its request timed
out) is dropped without running.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
_Item = tuple[Callable[[], object], "Future[object]"]


class QueueFull(Exception):
    """Every worker is busy and ``max_queue`` jobs are already waiting."""


class InferencePool:
    """``workers`` threads running submitted callables, at most ``max_queue`` waiting."""

    def __init__(self, workers: int, max_queue: int) -> None:
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._running = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"deeplab-serve-{index}", daemon=True)
            for index in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def waiting(self) -> int:
        """Jobs in the queue, not yet taken by a worker."""
        return self._queue.qsize()

    @property
    def running(self) -> int:
        """Jobs a worker is running now."""
        return self._running

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Queue ``job``; raises :class:`QueueFull` instead of waiting when the queue is full."""
        future: Future[T] = Future()
        try:
            self._queue.put_nowait((job, future))  # type: ignore[arg-type]
        except queue.Full:
            raise QueueFull from None
        return future

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._running += 1
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to the request that waits for it
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._running -= 1

    def close(self, timeout: float | None = None) -> None:
        """Let the workers finish what they run, cancel what waits, and stop them."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].cancel()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)
