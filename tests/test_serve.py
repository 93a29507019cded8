"""``deeplab serve`` against real server processes on 127.0.0.1, with a real HTTP client (http.client).

Each server is started by the test on a free port (``--port 0``, the URL read from its first stderr
line) and stopped by it; every wait is bounded.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import onnxruntime
import pytest
from conftest import IMAGES, VOC2012, png_header_only
from PIL import Image
from segment_helpers import DM05, command, invoke, run_process

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")

START_TIMEOUT_S = 240  # first use converts the model (seconds) on a busy CI machine
VOC_IMAGE = VOC2012 / "JPEGImages" / "2007_000032.jpg"
SHARED_IMAGES = [IMAGES / "bird_segmentation.bmp", IMAGES / "segmentation_input_rotation0.jpg", VOC_IMAGE]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    stderr: list[str] = field(default_factory=list)

    def call(
        self,
        path: str,
        body: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
        method: str | None = None,
        timeout: float = 120,
    ) -> Reply:
        parts = urlsplit(self.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            chunked = body is not None and not isinstance(body, bytes)
            verb = method or ("GET" if body is None else "POST")
            connection.request(verb, path, body, headers or {}, encode_chunked=chunked)
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def segment(self, image: bytes, query: str = "", content_type: str = "image/jpeg") -> Reply:
        return self.call(f"/v1/segment{query}", image, {"Content-Type": content_type})

    def metric(self, name: str) -> float:
        for line in self.call("/metrics").body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")


def _read_lines(stream: io.BufferedReader, lines: list[str], first: queue.Queue[str]) -> None:
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)
        first.put(line)


@contextmanager
def running_server(*args: str, ready: bool = True) -> Iterator[Server]:
    """``deeplab serve --port 0 ARGS`` as a subprocess; waits for /readyz (when ``ready``); stops it."""
    process = subprocess.Popen(
        command(["serve", "--port", "0", *args]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    lines: list[str] = []
    seen: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stderr, lines, seen), daemon=True).start()
    try:
        url = _wait_for_url(seen, process)
        server = Server(url, process, lines)
        if ready:
            _wait_until(lambda: server.call("/readyz").status == 200, f"{url}/readyz never 200: {lines}")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _wait_for_url(lines: queue.Queue[str], process: subprocess.Popen) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                raise AssertionError(f"deeplab serve exited with {process.returncode}") from None
            continue
        if " on http://" in line:
            return line.split(" on ")[1].split()[0]
    raise AssertionError("deeplab serve printed no URL within 60 s")


def _wait_until(condition, message: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(message)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One server for the read-only tests: small queue and body limit, so the limits can be hit."""
    with running_server("-m", DM05, "--workers", "1", "--max-queue", "1", "--max-body-mb", "1") as running:
        yield running


def assert_one_line_error(reply: Reply, status: int, words: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"] == "application/json"
    assert b"\n" not in reply.body.strip()
    data = reply.json()
    assert list(data) == ["error"] and words in data["error"], data


# ------------------------------------------------------------------------------------------- results


def test_labels_byte_identical_to_segment_command(server: Server, tmp_path: Path) -> None:
    result = run_process(["segment", *SHARED_IMAGES, "-o", tmp_path, "-m", DM05, "-q"])
    assert result.code == 0, result.stderr
    for path in SHARED_IMAGES:
        raw = server.segment(path.read_bytes(), content_type="application/octet-stream")
        assert raw.status == 200, raw.body
        assert raw.headers["content-type"] == "image/png"
        written = list(tmp_path.rglob(f"{path.stem}.png"))
        assert len(written) == 1 and raw.body == written[0].read_bytes(), path.name
    multipart = _multipart(VOC_IMAGE.read_bytes(), "photo.jpg")
    reply = server.call("/v1/segment", multipart[1], {"Content-Type": multipart[0]})
    assert reply.status == 200 and reply.body == server.segment(VOC_IMAGE.read_bytes()).body


def _multipart(data: bytes, filename: str) -> tuple[str, bytes]:
    boundary = "deeplab-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return f"multipart/form-data; boundary={boundary}", body


def test_overlay_scores_and_json_describe_the_same_labels(server: Server) -> None:
    data = VOC_IMAGE.read_bytes()
    width, height = Image.open(VOC_IMAGE).size
    labels = np.asarray(Image.open(io.BytesIO(server.segment(data).body)))
    overlay = server.segment(data, "?output=overlay&alpha=0.7")
    assert overlay.status == 200 and overlay.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(overlay.body)).size == (width, height)
    scores = server.segment(data, "?output=scores")
    logits = np.load(io.BytesIO(scores.body))
    assert logits.dtype == np.float16 and logits.shape[0] == 21
    padded_w, padded_h = (int(v) for v in scores.headers["x-deeplab-padded-size"].split("x"))
    stride = int(scores.headers["x-deeplab-output-stride"])
    assert logits.shape[1:] == ((padded_h - 1) // stride + 1, (padded_w - 1) // stride + 1)
    described = server.segment(data, "?output=json").json()
    assert described["size"] == {"width": width, "height": height}
    assert described["model"] == DM05 and described["timings"]["infer"] > 0
    counts = np.bincount(labels.ravel(), minlength=21) / labels.size
    for row in described["classes"]:
        assert row["fraction"] == pytest.approx(counts[row["id"]], abs=1e-6)
    assert {row["id"] for row in described["classes"]} == set(np.flatnonzero(counts))


def test_crf_query_refines_with_the_requested_parameters(server: Server) -> None:
    data = VOC_IMAGE.read_bytes()
    reply = server.segment(data, "?crf=true&crf_iterations=1&crf_bi_w=5&output=json")
    assert reply.status == 200, reply.body
    described = reply.json()
    assert described["crf"]["iterations"] == 1 and described["crf"]["bi_w"] == 5.0
    assert "crf" in described["timings"]


# ------------------------------------------------------------------------------------------- bad inputs


def test_each_bad_input_gets_its_4xx_and_the_server_keeps_serving(server: Server) -> None:
    jpeg = VOC_IMAGE.read_bytes()
    chunked = {"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"}  # no Content-Length
    cases = [
        (server.call("/v1/segment", b"", {"Content-Type": "image/jpeg"}), 400, "empty request body"),
        (server.segment(b"this is not an image"), 400, "not an image"),
        (server.segment(jpeg[: len(jpeg) // 3]), 400, "truncated"),
        (server.segment(png_header_only(100_000, 100_000), content_type="image/png"), 413, "100000x100000"),
        (server.segment(jpeg, "?model=no-such-model"), 400, "no-such-model"),
        (server.segment(jpeg, "?crf=true&crf_bi_w=-1"), 400, "bi_w"),
        (server.segment(jpeg, "?crf=true&crf_iterations=lots"), 400, "not a number"),
        (server.segment(jpeg, "?crf_bi_w=3"), 400, "without crf=true"),
        (server.segment(jpeg, "?outptu=json"), 400, "unknown query parameter"),
        (server.segment(jpeg, "?output=tiff"), 400, "invalid output"),
        (server.segment(jpeg, "?url=http://169.254.169.254/"), 400, "never fetches URLs"),
        (server.segment(os.urandom(3 * 2**20)), 413, "exceeds the limit of 1048576 bytes"),
        (server.call("/v1/segment", iter([b"x" * 2**16] * 24), chunked), 413, "more than"),
        (server.segment(jpeg, content_type="text/plain"), 415, "unsupported Content-Type"),
        (
            server.call("/v1/segment", b"--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x"}),
            400,
            "",
        ),
        (server.call("/v1/nothing"), 404, "no such endpoint"),
        (server.call("/v1/segment"), 405, "not allowed"),
    ]
    for reply, status, words in cases:
        assert_one_line_error(reply, status, words)
    assert server.segment(jpeg).status == 200
    assert server.process.poll() is None


def test_full_queue_answers_503_with_retry_after_at_once(server: Server) -> None:
    data = VOC_IMAGE.read_bytes()
    start = threading.Barrier(10)
    replies: list[tuple[Reply, float]] = []

    def client() -> None:
        start.wait()
        began = time.perf_counter()
        reply = server.segment(data)
        replies.append((reply, time.perf_counter() - began))

    threads = [threading.Thread(target=client) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    statuses = sorted(reply.status for reply, _ in replies)
    assert len(replies) == 10 and set(statuses) <= {200, 503}, statuses
    busy = [(reply, seconds) for reply, seconds in replies if reply.status == 503]
    assert busy and statuses.count(200) >= 1, statuses
    slowest_ok = max(seconds for reply, seconds in replies if reply.status == 200)
    for reply, seconds in busy:
        assert_one_line_error(reply, 503, "busy")
        assert reply.headers["retry-after"] == "1"
        assert seconds < slowest_ok  # refused at once, not after waiting
    assert server.segment(data).status == 200
    text = server.call("/metrics").body.decode()
    assert 'deeplab_http_requests_total{path="/v1/segment",status="503"}' in text


# ------------------------------------------------------------------------------------------- operations


def test_readyz_reports_granted_providers_and_metrics_are_prometheus_text(server: Server) -> None:
    assert server.url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
    assert server.call("/healthz").json() == {"status": "ok"}
    ready = server.call("/readyz")
    assert ready.status == 200
    report = ready.json()
    assert report["ready"] is True and report["draining"] is False
    assert report["models"][DM05]["providers"] == ["CPUExecutionProvider"]
    assert report["models"][DM05]["status"] == "ready" and report["crf"]["status"] == "ready"
    server.segment(VOC_IMAGE.read_bytes())
    metrics = server.call("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.body.decode()
    for series in (
        "# TYPE deeplab_http_requests_total counter",
        'deeplab_http_requests_total{path="/v1/segment",status="200"}',
        "# TYPE deeplab_segment_latency_seconds histogram",
        'deeplab_segment_latency_seconds_bucket{le="+Inf"}',
        "deeplab_queue_waiting 0",
        "deeplab_models_ready 1",
    ):
        assert series in text
    assert server.metric("process_resident_memory_bytes") > 50 * 2**20
    assert server.metric("deeplab_segment_latency_seconds_count") >= 1
    models = {row["name"]: row for row in server.call("/v1/models").json()}
    assert models[DM05]["served"] and models[DM05]["status"] == "ready" and models[DM05]["default"]
    assert not models["deeplabv3-mnv2-voc"]["served"]
    assert "/v1/segment" in server.call("/openapi.json").json()["paths"]


def test_a_failed_model_makes_the_server_not_ready_and_slow_requests_get_504(tmp_path: Path) -> None:
    """One server for both (each start costs seconds): a healthy model and a broken one, a tiny timeout."""
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    big = tmp_path / "big.png"
    Image.open(VOC_IMAGE).resize((2000, 1400)).save(big)
    args = ("-m", DM05, "-m", str(broken), "--workers", "1", "--timeout", "0.05")
    with running_server(*args, ready=False) as running:

        def status() -> str:
            return running.call("/readyz").json()["models"][str(broken)]["status"]

        _wait_until(lambda: status() == "failed", "never reported failed", 120)
        ready = running.call("/readyz")
        assert ready.status == 503 and ready.json()["ready"] is False
        assert "ONNX" in ready.json()["models"][str(broken)]["error"]
        assert ready.json()["models"][DM05]["status"] == "ready"
        assert running.call("/healthz").status == 200
        query = f"?model={broken}"
        assert_one_line_error(running.segment(VOC_IMAGE.read_bytes(), query), 503, "failed to load")
        assert_one_line_error(running.segment(big.read_bytes(), "", "image/png"), 504, "0.05 s timeout")
        assert running.call("/healthz").status == 200
        assert 'status="504"' in running.call("/metrics").body.decode()


def test_readiness_demands_the_gpu_that_was_asked_for() -> None:
    from deeplab_cli.serve.models import granted_ok

    assert not granted_ok("cuda", ["CPUExecutionProvider"])
    assert not granted_ok("cuda:1", ["CPUExecutionProvider"])
    assert granted_ok("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert granted_ok("auto", ["CPUExecutionProvider"]) and granted_ok("cpu", ["CPUExecutionProvider"])


def test_sigterm_lets_requests_in_progress_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    big = tmp_path / "big.png"  # ~4 megapixels: a request that is still running when SIGTERM comes
    Image.open(VOC_IMAGE).resize((2000, 1400)).save(big)
    with running_server("-m", DM05, "--workers", "1") as running:
        result: list[Reply] = []
        worker = threading.Thread(
            target=lambda: result.append(running.segment(big.read_bytes(), "", "image/png"))
        )
        worker.start()
        _wait_until(lambda: running.metric("deeplab_inference_running") == 1, "the request never ran", 60)
        running.process.send_signal(signal.SIGTERM)
        _wait_until(lambda: running.call("/healthz").json()["status"] == "draining", "never drained", 10)
        refused = running.segment(VOC_IMAGE.read_bytes())
        assert_one_line_error(refused, 503, "shutting down")
        assert refused.headers["retry-after"] == "1"
        assert running.call("/readyz").status == 503
        worker.join(120)
        assert result and result[0].status == 200
        assert Image.open(io.BytesIO(result[0].body)).size == (2000, 1400)
        assert running.process.wait(30) == 0
        assert any("draining" in line for line in running.stderr)


# ------------------------------------------------------------------------------------------- command line


def test_start_up_errors_are_one_line_with_exit_2() -> None:
    unknown = invoke(["serve", "-m", "no-such-model", "--port", "0"])
    assert unknown.code == 2 and unknown.stderr.count("\n") == 1 and "no-such-model" in unknown.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = invoke(["serve", "-m", DM05, "--port", port])
    assert busy.code == 2 and busy.stderr.startswith(f"deeplab: error: cannot listen on 127.0.0.1:{port}")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        gpu = invoke(["serve", "-m", DM05, "--device", "cuda", "--port", "0"])
        assert gpu.code == 2 and "CUDA" in gpu.stderr and gpu.stderr.count("\n") == 1


def test_without_the_extra_the_command_names_the_pip_install() -> None:
    code = "import sys; sys.modules['fastapi'] = None; from deeplab_cli.cli import main; main(['serve'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == 'deeplab: error: deeplab serve needs fastapi: pip install "deeplab-cli[serve]"'
    )
