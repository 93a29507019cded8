"""``/metrics`` in the Prometheus text format (version 0.0.4), written by hand: a handful of series do
not justify a dependency.

Series: ``deeplab_http_requests_total{path,status}``, ``deeplab_segment_latency_seconds`` (histogram of
``POST /v1/segment``, queueing included), ``deeplab_queue_waiting``, ``deeplab_inference_running``,
``deeplab_models_ready``, ``process_resident_memory_bytes`` (Linux).
"""

from __future__ import annotations

import os
import threading
from collections import Counter

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
KNOWN_PATHS = frozenset(
    ["/v1/segment", "/v1/models", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"]
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def resident_memory_bytes() -> int | None:
    """This process's resident set size now (from /proc; None where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Metrics:
    """Counters and the latency histogram, safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._buckets = [0] * len(LATENCY_BUCKETS)
        self._latency_sum = 0.0
        self._latency_count = 0

    def observe(self, path: str, status: int, seconds: float, timed: bool = False) -> None:
        """Count one finished request; ``timed`` ones (``POST /v1/segment``) go into the histogram."""
        label = path if path in KNOWN_PATHS else "other"  # bounded label values, whatever clients send
        with self._lock:
            self._requests[(label, status)] += 1
            if timed:
                self._latency_sum += seconds
                self._latency_count += 1
                for index, bound in enumerate(LATENCY_BUCKETS):
                    if seconds <= bound:
                        self._buckets[index] += 1

    def count(self, path: str, status: int) -> int:
        with self._lock:
            return self._requests[(path, status)]

    def render(self, waiting: int, running: int, models_ready: int) -> str:
        """The exposition text, with the gauges given by the caller."""
        with self._lock:
            requests = sorted(self._requests.items())
            buckets, total, count = list(self._buckets), self._latency_sum, self._latency_count
        lines = [
            "# HELP deeplab_http_requests_total HTTP requests answered, by path and status code.",
            "# TYPE deeplab_http_requests_total counter",
        ]
        lines += [
            f'deeplab_http_requests_total{{path="{path}",status="{status}"}} {value}'
            for (path, status), value in requests
        ]
        lines += [
            "# HELP deeplab_segment_latency_seconds POST /v1/segment latency, queueing included.",
            "# TYPE deeplab_segment_latency_seconds histogram",
        ]
        lines += [
            f'deeplab_segment_latency_seconds_bucket{{le="{bound}"}} {value}'
            for bound, value in zip(LATENCY_BUCKETS, buckets, strict=True)
        ]
        lines += [
            f'deeplab_segment_latency_seconds_bucket{{le="+Inf"}} {count}',
            f"deeplab_segment_latency_seconds_sum {total:.6f}",
            f"deeplab_segment_latency_seconds_count {count}",
        ]
        lines += _gauge("deeplab_queue_waiting", "Segment requests waiting for an inference worker.", waiting)
        lines += _gauge(
            "deeplab_inference_running", "Segment requests an inference worker runs now.", running
        )
        lines += _gauge("deeplab_models_ready", "Models loaded and on the device asked for.", models_ready)
        rss = resident_memory_bytes()
        if rss is not None:
            lines += _gauge("process_resident_memory_bytes", "Resident memory size in bytes.", rss)
        return "\n".join(lines) + "\n"


def _gauge(name: str, help_text: str, value: int) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
