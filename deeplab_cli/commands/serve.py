"""``deeplab serve``: the models over HTTP (needs the ``[serve]`` extra)."""

from __future__ import annotations

import os

import click

from deeplab_cli.commands.options import crf_backend_option, device_option
from deeplab_cli.serve.config import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_TIMEOUT_S,
)


@click.command("serve")
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    help="A model to serve (registry name or .onnx file); repeat for several, the first is the default "
    "[default: the default model].",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: a free port."
)
@device_option
@click.option(
    "--workers",
    default=0,
    type=click.IntRange(min=0),
    help="Inference threads, one ONNX Runtime session each [default: 2 on a CPU with 2+ cores, 1 on CUDA].",
)
@click.option(
    "--max-queue",
    default=DEFAULT_MAX_QUEUE,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests that may wait for a worker; beyond it: 503 with Retry-After, at once.",
)
@click.option(
    "--max-body-mb",
    default=DEFAULT_MAX_BODY_BYTES / 2**20,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Request body limit in MiB (413 beyond).",
)
@click.option(
    "--max-pixels",
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    type=click.IntRange(min=1),
    help="Decoded image limit (width x height, read from the header before decoding; 413 beyond).",
)
@click.option(
    "--timeout",
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request may take, queueing included (504 beyond).",
)
@click.option(
    "--max-size",
    default=2048,
    show_default=True,
    type=click.IntRange(min=0),
    help="As `deeplab segment --max-size`: cap on the network input's longer side; 0 = none.",
)
@crf_backend_option
@click.option("--access-log", is_flag=True, help="Log every request on stderr.")
def serve(
    models: tuple[str, ...],
    host: str,
    port: int,
    device: str,
    workers: int,
    max_queue: int,
    max_body_mb: float,
    max_pixels: int,
    timeout: float,
    max_size: int,
    crf_backend: str,
    access_log: bool,
) -> None:
    """Serve models over HTTP: POST an image to /v1/segment, get its label mask.

    Binds 127.0.0.1 unless --host says otherwise. Models load in the background: /readyz answers 200
    once all are loaded on the device asked for. SIGTERM drains: requests in progress finish, new ones
    get 503, then the server exits 0.

    \b
    Examples:
      deeplab serve --port 8000
      curl -s -H 'Content-Type: image/jpeg' --data-binary @photo.jpg localhost:8000/v1/segment -o mask.png
      curl -s -F file=@photo.jpg 'localhost:8000/v1/segment?output=json'
    """
    from deeplab_cli.serve import require_extra

    require_extra()
    from deeplab_cli.crf.backends import choose_backend
    from deeplab_cli.device import parse_device
    from deeplab_cli.serve.config import ServeConfig
    from deeplab_cli.serve.models import check_model_names
    from deeplab_cli.serve.server import bind, url_of
    from deeplab_cli.serve.server import serve as run_server
    from deeplab_cli.zoo import default_model

    target = parse_device(device)
    target.onnx_providers()  # --device cuda without a CUDA provider: one line, exit 2, before binding
    if not workers:
        workers = 1 if target.wants_cuda else min(2, os.cpu_count() or 1)
    names = models or (default_model().name,)
    check_model_names(names)
    choose_backend(crf_backend, on_cuda=target.wants_cuda)
    config = ServeConfig(
        models=names,
        device=device,
        workers=workers,
        max_queue=max_queue,
        max_body_bytes=int(max_body_mb * 2**20),
        max_pixels=max_pixels,
        timeout_s=timeout,
        max_size=max_size,
        crf_backend=crf_backend,
    )
    sock = bind(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"deeplab: warning: listening on {host}: reachable from other machines", err=True)
    click.echo(
        f"deeplab: serving {', '.join(names)} on {url_of(sock)} ({workers} worker(s), queue {max_queue}); "
        "docs at /docs",
        err=True,
    )
    run_server(config, sock, access_log=access_log)
