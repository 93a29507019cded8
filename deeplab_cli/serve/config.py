"""What a server is asked to do: its models, device, worker threads, queue and request limits."""

from __future__ import annotations

from dataclasses import dataclass

from deeplab_cli.errors import UsageError

DEFAULT_MAX_BODY_BYTES = 20 * 2**20
# 40 megapixels: a 7,300 x 5,500 photo. The decoded RGB is 120 MB; with the labels and the overlay a
# request peaks near 300 MB, so a few workers stay within a small machine's memory.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_QUEUE = 8
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeConfig:
    """A server's settings (the ``deeplab serve`` options).

    ``models``: registry names or .onnx files; the first is the default of ``POST /v1/segment``.
    ``workers``: inference threads (each request runs decode -> network -> upsample/CRF -> encode in
    one of them); the model keeps one ONNX Runtime session per worker. ``max_queue``: requests that may
    wait for a worker; at most ``workers + max_queue`` segment requests are admitted at once (reading
    their body, waiting or running), the next one gets 503 with Retry-After before its body is read.
    ``max_body_bytes``: request body limit (413). ``max_pixels``: decoded image limit, checked from the
    image header before decoding (413). ``timeout_s``: per request, queueing included (504).
    ``max_size``: the same network-input cap as ``deeplab segment --max-size`` (0 = none), so that the
    server and the command give the same labels for the same image.
    """

    models: tuple[str, ...]
    device: str = "auto"
    workers: int = 1
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_size: int = 2048
    crf_backend: str = "auto"
    retry_after_s: int = RETRY_AFTER_S

    def __post_init__(self) -> None:
        if not self.models:
            raise UsageError("serve needs at least one model")
        if len(set(self.models)) != len(self.models):
            raise UsageError(f"a model is listed twice: {', '.join(self.models)}")
        for name, value, least in (
            ("workers", self.workers, 1),
            ("max queue", self.max_queue, 1),
            ("max body", self.max_body_bytes, 1),
            ("max pixels", self.max_pixels, 1),
            ("max size", self.max_size, 0),
        ):
            if value < least:
                raise UsageError(f"{name} must be >= {least}, got {value}")
        if not self.timeout_s > 0:
            raise UsageError(f"timeout must be > 0 seconds, got {self.timeout_s}")

    @property
    def crf_device(self) -> str:
        """Where the CRF runs: the GPU asked for with ``--device cuda[:N]``, else the CPU (as ``segment``)."""
        from deeplab_cli.device import parse_device

        device = parse_device(self.device)
        return str(device) if device.wants_cuda else "cpu"

    @property
    def capacity(self) -> int:
        """Segment requests admitted at once: one running per worker, ``max_queue`` waiting."""
        return self.workers + self.max_queue
