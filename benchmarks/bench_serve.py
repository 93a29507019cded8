"""Load test of ``deeplab serve`` on loopback, against ``deeplab segment`` on the same images.

    python benchmarks/bench_serve.py [--requests 2000] [--clients 4] [--images 50] [--model NAME]
                                     [--workers N] [--max-queue 8] [--overload-requests 400] [--rounds 3]

Starts a real server (``deeplab serve --port 0``, 127.0.0.1 only) and stops it at the end; every wait is
bounded. Three parts:

1. throughput, interleaved: each round runs ``deeplab segment`` (the real command, a subprocess, its own
   summary time, so model loading is excluded) over the first ``--images`` VOC images, then sends the
   same images to the server from ``--clients`` concurrent clients (``--requests / --rounds`` requests
   per round, cycling through the images). Prints the median images/s of each and the ratio.
2. the load run's latency (p50/p99 over all requests), status counts (any 5xx is a failure), and the
   server's resident memory (VmRSS, sampled every 50 ms) while the first and the last 10% of requests ran.
3. overload: ``4 x (workers + max_queue)`` clients sending back to back: 503s with Retry-After are
   expected, nothing else but 200; memory first vs last 10% again.

Needs the weights in the cache or a mirror ($DEEPLAB_HOME / $DEEPLAB_MIRROR, as for the tests). The
machine is shared: quote medians, and say how loaded it was.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "voc" / "VOC2012" / "JPEGImages"
START_TIMEOUT_S = 300


@dataclass
class LoadResult:
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    retry_after_missing: int = 0
    rss_first: float = 0.0
    rss_last: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses[200]


class Server:
    """``deeplab serve`` in a subprocess on a free loopback port."""

    def __init__(self, model: str, workers: int, max_queue: int) -> None:
        args = [sys.executable, "-m", "deeplab_cli", "serve", "--port", "0", "-m", model, "--device", "cpu"]
        args += ["--workers", str(workers), "--max-queue", str(max_queue)]
        self.process = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        line = self.process.stderr.readline()
        if " on http://" not in line:
            self.stop()
            raise SystemExit(f"server did not start: {line.strip()}")
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()
        host_port = line.split(" on http://")[1].split()[0]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.get("/readyz")[0] != 200:
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise SystemExit("server never became ready")
            time.sleep(0.2)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        except OSError:
            return 0, b""

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)


def load(server: Server, images: list[bytes], requests: int, clients: int) -> LoadResult:
    """``requests`` POSTs from ``clients`` threads, each on its own keep-alive connection."""
    result = LoadResult()
    counter = itertools.count()
    lock = threading.Lock()
    samples: list[tuple[int, float]] = []  # (requests done, RSS MB)
    done = [0]
    stop = threading.Event()

    def client() -> None:
        connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
        while (index := next(counter)) < requests:
            began = time.perf_counter()
            try:
                connection.request(
                    "POST", "/v1/segment", images[index % len(images)], {"Content-Type": "image/jpeg"}
                )
                response = connection.getresponse()
                response.read()
                status, retry = response.status, response.getheader("Retry-After")
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
            except OSError:
                status, retry = 0, None
                connection.close()
            seconds = time.perf_counter() - began
            with lock:
                result.statuses[status] += 1
                done[0] += 1
                if status == 200:
                    result.latencies.append(seconds)
                if status == 503 and retry is None:
                    result.retry_after_missing += 1
            if status == 503:
                time.sleep(
                    0.01
                )  # a real client would honour Retry-After; a short pause keeps the overload up
        connection.close()

    def monitor() -> None:
        while not stop.is_set():
            samples.append((done[0], server.rss_mb()))
            time.sleep(0.05)

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.elapsed = time.perf_counter() - start
    stop.set()
    watcher.join()
    tenth = max(1, requests // 10)
    first = [rss for count, rss in samples if count < tenth] or [samples[0][1]]
    last = [rss for count, rss in samples if count >= requests - tenth] or [samples[-1][1]]
    result.rss_first, result.rss_last = statistics.median(first), statistics.median(last)
    return result


def segment_command(paths: list[Path], model: str, out: Path) -> float:
    """images/s of ``deeplab segment`` on ``paths`` (its own summary time: start-up and loading excluded)."""
    args = [sys.executable, "-m", "deeplab_cli", "segment", *map(str, paths), "-o", str(out)]
    args += ["-m", model, "--device", "cpu"]
    began = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"deeplab segment failed: {result.stderr.strip()}")
    line = result.stderr.strip().splitlines()[-1]
    try:
        seconds = float(line.split(" in ")[1].split(" s")[0])
    except (IndexError, ValueError):
        seconds = wall  # the summary line changed: fall back to the wall time (start-up included)
    return len(paths) / seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--model", default="deeplabv3-mnv2-dm05-voc")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overload-requests", type=int, default=400)
    args = parser.parse_args()

    paths = sorted(args.image_dir.glob("*.jpg"))[: args.images]
    if not paths:
        raise SystemExit(f"no images in {args.image_dir}")
    images = [path.read_bytes() for path in paths]
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (shared machine: noisy)")
    server = Server(args.model, args.workers, args.max_queue)
    failures = []
    try:
        per_round = max(1, args.requests // args.rounds)
        command_rates, server_rates, runs = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            for round_index in range(args.rounds):
                command_rates.append(segment_command(paths, args.model, Path(tmp) / str(round_index)))
                run = load(server, images, per_round, args.clients)
                runs.append(run)
                server_rates.append(run.ok / run.elapsed)
        total = LoadResult()
        for run in runs:
            total.statuses.update(run.statuses)
            total.latencies += run.latencies
        cmd, srv = statistics.median(command_rates), statistics.median(server_rates)
        setup = f"{args.workers} worker(s), queue {args.max_queue}, {args.clients} clients"
        print(
            f"model {args.model}, {len(paths)} VOC images; server: {setup}; {args.rounds} x {per_round} req."
        )
        print(f"deeplab segment: {cmd:.2f} images/s (median of {args.rounds})")
        print(f"deeplab serve:   {srv:.2f} images/s (median of {args.rounds}) -> ratio {srv / cmd:.2f}")
        p50, p99 = percentile(total.latencies, 0.5), percentile(total.latencies, 0.99)
        print(f"latency: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; statuses {dict(total.statuses)}")
        print(
            f"server RSS, first vs last 10% of requests (last round): {runs[-1].rss_first:.0f} MB -> "
            f"{runs[-1].rss_last:.0f} MB"
        )
        if set(total.statuses) - {200, 503}:
            failures.append(f"unexpected statuses in the load run: {dict(total.statuses)}")

        overload_clients = 4 * (args.workers + args.max_queue)
        over = load(server, images, args.overload_requests, overload_clients)
        print(
            f"overload: {overload_clients} clients, {args.overload_requests} requests: {dict(over.statuses)},"
            f" {over.retry_after_missing} 503s without Retry-After; p99 of 200s "
            f"{percentile(over.latencies, 0.99) * 1000:.0f} ms; RSS {over.rss_first:.0f} MB -> "
            f"{over.rss_last:.0f} MB"
        )
        if set(over.statuses) - {200, 503} or over.retry_after_missing:
            failures.append(f"unexpected overload answers: {dict(over.statuses)}")
        if not over.statuses[503]:
            failures.append("the overload run got no 503: raise --overload-requests")
    finally:
        code = server.stop()
    print(f"server stopped with exit status {code}; load average after: {os.getloadavg()[0]:.2f}")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
