"""Running the application under uvicorn, with a SIGTERM that drains.

On the first SIGTERM (or Ctrl-C) the server stops taking work: new requests get 503 with Retry-After
and ``/readyz`` turns 503, while the requests already admitted finish. When none is left (or after the
per-request timeout at most) uvicorn closes the connections and the process exits with status 0. A
second signal stops it at once.
"""

from __future__ import annotations

import socket
import sys
import time
from types import FrameType

import uvicorn

from deeplab_cli.errors import UsageError
from deeplab_cli.serve.app import ServerState, create_app
from deeplab_cli.serve.config import ServeConfig

# Connections uvicorn keeps at once beyond the admitted requests (idle keep-alive clients, /metrics
# scrapers); past it uvicorn answers 503 itself, so idle connections cannot pile up either.
EXTRA_CONNECTIONS = 64


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); failures are one-line usage errors."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(256)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first exit signal drains (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.drain_deadline = 0.0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in ``_captured_signals``: uvicorn would re-raise it after shutdown, and a drained
        # server exits 0.
        if self.state.draining:
            self.should_exit = True
            self.force_exit = True
            return
        self.state.draining = True
        self.drain_deadline = time.monotonic() + self.state.config.timeout_s + 1.0
        print(
            f"deeplab: draining: {self.state.admitted} request(s) in progress; new ones get 503",
            file=sys.stderr,
            flush=True,
        )

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and (self.state.admitted == 0 or time.monotonic() > self.drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)


def serve(config: ServeConfig, sock: socket.socket, access_log: bool = False) -> None:
    """Serve ``config`` on the bound ``sock`` until a signal drains and stops it."""
    app = create_app(config)
    uv_config = uvicorn.Config(
        app,
        log_level="info" if access_log else "warning",
        access_log=access_log,
        lifespan="on",
        limit_concurrency=config.capacity + EXTRA_CONNECTIONS,
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    server = DrainingServer(uv_config, app.state.deeplab)
    server.run(sockets=[sock])
