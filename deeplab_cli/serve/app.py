"""The HTTP application: FastAPI routes, the admission gate, errors as one-line JSON.

- ``POST /v1/segment``: the image as a raw ``image/*`` body or a multipart file; query ``model``,
  ``output`` (mask | overlay | scores | json), ``alpha``, ``crf`` and ``crf_<parameter>``.
- ``GET /v1/models``, ``GET /healthz`` (alive), ``GET /readyz`` (models loaded on the device asked for,
  not draining), ``GET /metrics`` (Prometheus text), ``/docs`` and ``/openapi.json`` (FastAPI's).

The :class:`Gate` (pure ASGI, outermost of ours) refuses work before any body byte is read: 503 while
draining or when ``workers + max_queue`` segment requests are already admitted, 413 when the declared
Content-Length is over the limit; it also cuts off bodies that grow past it and counts every answer.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deeplab_cli import __version__
from deeplab_cli.errors import UsageError
from deeplab_cli.serve import metrics as metrics_text
from deeplab_cli.serve.config import ServeConfig
from deeplab_cli.serve.metrics import Metrics
from deeplab_cli.serve.models import ModelSet
from deeplab_cli.serve.pool import InferencePool, QueueFull
from deeplab_cli.serve.segment import (
    CRF_FIELDS,
    OUTPUTS,
    RequestError,
    Work,
    check_content_type,
    crf_params,
    parse_query,
    run,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SEGMENT_PATH = "/v1/segment"
ALWAYS_OPEN = frozenset(["/healthz", "/readyz", "/metrics"])  # answered while draining too
# An over-limit body up to this size is read and discarded before the 413 (see _after_discarding);
# beyond it, the connection is reset.
DISCARD_LIMIT = 256 * 2**20


@dataclass
class ServerState:
    """What the routes, the gate and the signal handler share (all touched from the event loop only,
    except the pool and the models, which are thread-safe)."""

    config: ServeConfig
    models: ModelSet
    metrics: Metrics = field(default_factory=Metrics)
    pool: InferencePool | None = None
    draining: bool = False
    admitted: int = 0  # segment requests inside the gate now

    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.config.retry_after_s)}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


class Gate:
    """Admission and accounting in front of the application (see the module docstring)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        started: list[int] = []

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.append(message["status"])
            await send(message)

        try:
            await self._handle(scope, receive, send_counted)
        except Exception as exc:  # a bug must not reach the client as a traceback, nor kill the server
            where = f"{scope['method']} {scope['path']}"
            print(f"deeplab: error: {where}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            if not started:
                await error_response(500, f"internal error: {type(exc).__name__}")(
                    scope, receive, send_counted
                )
        finally:
            status = started[0] if started else 500
            timed = scope["path"] == SEGMENT_PATH and scope["method"] == "POST"
            self.state.metrics.observe(scope["path"], status, time.perf_counter() - start, timed)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        state, path = self.state, scope["path"]
        if state.draining and path not in ALWAYS_OPEN:
            headers = {**state.retry_after(), "Connection": "close"}
            refusal = error_response(503, "the server is shutting down", headers)
            await _after_discarding(refusal, state.config.max_body_bytes)(scope, receive, send)
            return
        if path != SEGMENT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        state.admitted += 1
        try:
            await self.app(scope, self._limited(receive), send)
        finally:
            state.admitted -= 1

    def _refusal(self, scope: Scope) -> ASGIApp | None:
        state, limit = self.state, self.state.config.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            response = error_response(413, _too_large(int(length), limit), {"Connection": "close"})
            return _after_discarding(response, DISCARD_LIMIT) if int(length) <= DISCARD_LIMIT else response
        if state.admitted >= state.config.capacity:
            message = f"busy: {state.admitted} requests in progress (workers + max queue); retry later"
            return _after_discarding(error_response(503, message, state.retry_after()), limit)
        return None

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` that raises a 413 once the body grows past the limit (chunked uploads)."""
        limit, seen = self.state.config.max_body_bytes, 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise RequestError(413, _too_large(seen, limit, more=True), {"Connection": "close"})
            return message

        return limited


def _after_discarding(response: Response, most: int) -> ASGIApp:
    """``response``, sent once the request body (up to ``most`` bytes) has been read and thrown away,
    chunk by chunk: clients that send the whole body before reading see the answer, not a reset."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0
        while seen <= most:
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        await response(scope, receive, send)

    return app


def _too_large(size: int, limit: int, more: bool = False) -> str:
    at_least = "more than " if more else ""
    return f"request body of {at_least}{size} bytes exceeds the limit of {limit} bytes"


# ------------------------------------------------------------------------------------------- the app


def create_app(config: ServeConfig, models: ModelSet | None = None) -> FastAPI:
    """The application for ``config``; models load in the background once it starts (see ``/readyz``)."""
    state = ServerState(config, models or ModelSet(config))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.pool = InferencePool(config.workers, config.max_queue)
        state.models.start_loading()
        try:
            yield
        finally:
            await asyncio.to_thread(state.pool.close, config.timeout_s)

    app = FastAPI(
        title="deeplab-cli",
        version=__version__,
        summary="Semantic segmentation with DeepLab models over HTTP.",
        lifespan=lifespan,
    )
    app.state.deeplab = state
    app.add_middleware(Gate, state=state)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(400, f"invalid request: {where}: {first.get('msg', 'invalid')}")


def _add_routes(app: FastAPI, state: ServerState) -> None:
    config = state.config

    @app.post(
        SEGMENT_PATH, openapi_extra=_SEGMENT_OPENAPI, response_class=Response, responses=_SEGMENT_RESPONSES
    )
    async def segment(request: Request) -> Response:
        """Segment one image: a palette label PNG (pixel value = class index) by default."""
        submitted = time.perf_counter()
        query = parse_query(request.query_params)
        try:
            served = state.models.get(query.model)
        except UsageError as exc:
            raise RequestError(400, str(exc)) from None
        if served.segmenter is None:
            why = f"failed to load: {served.error}" if served.error else "is still loading"
            raise RequestError(503, f"model {served.name} {why}", state.retry_after())
        segmenter = served.segmenter
        crf = crf_params(segmenter.spec.crf, query.crf_overrides) if query.crf else None
        data = await _read_image_bytes(request)
        work = Work(
            segmenter=segmenter,
            data=data,
            query=query,
            crf=crf,
            crf_backend=config.crf_backend,
            crf_device=config.crf_device,
            max_pixels=config.max_pixels,
            submitted=submitted,
        )
        assert state.pool is not None
        try:
            future = state.pool.submit(functools.partial(run, work))
        except QueueFull:
            raise RequestError(
                503, "busy: the inference queue is full; retry later", state.retry_after()
            ) from None
        remaining = config.timeout_s - (time.perf_counter() - submitted)
        try:
            reply = await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(remaining, 0.001))
        except TimeoutError:
            raise RequestError(
                504, f"the request took longer than the {config.timeout_s:g} s timeout"
            ) from None
        return Response(reply.body, media_type=reply.media_type, headers=reply.headers)

    @app.get("/v1/models")
    def list_models() -> list[dict[str, Any]]:
        """The registry and the models served here (``served``, ``status``), and which are in the cache."""
        return _models_listing(state.models)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is up (models may still be loading: see /readyz)."""
        return {"status": "draining" if state.draining else "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready: loading, failed, or draining"}})
    def readyz() -> JSONResponse:
        """Ready when every model is loaded on the device asked for (providers really granted) and the
        CRF backend is warmed up; 503 while loading, after a failure, and while draining."""
        ready = state.models.ready and not state.draining
        body = {
            "ready": ready,
            "draining": state.draining,
            "device": config.device,
            "models": state.models.report(),
            "crf": {"backend": config.crf_backend, "status": state.models.crf_status},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text format: requests by status, latency histogram, queue depth, resident memory."""
        pool = state.pool
        waiting, running = (pool.waiting, pool.running) if pool is not None else (0, 0)
        ready = sum(1 for served in state.models.models.values() if served.status == "ready")
        text = state.metrics.render(waiting, running, ready)
        return PlainTextResponse(text, media_type=metrics_text.CONTENT_TYPE)


async def _read_image_bytes(request: Request) -> bytes:
    """The image bytes of a raw body or of the (single) file part of a multipart body."""
    if check_content_type(request.headers.get("content-type", "")) == "multipart":
        async with request.form(max_files=1, max_fields=16) as form:
            uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
            if not uploads:
                raise RequestError(400, "the multipart body has no file part (e.g. curl -F file=@photo.jpg)")
            data = await uploads[0].read()
    else:
        data = await request.body()
    if not data:
        raise RequestError(
            400, "empty request body: send the image bytes (raw image/* body or a multipart file)"
        )
    return data


def _models_listing(models: ModelSet) -> list[dict[str, Any]]:
    from deeplab_cli import weights
    from deeplab_cli.zoo import list_models

    served_names = {}
    for served in models.models.values():
        name = served.segmenter.spec.name if served.segmenter is not None else served.name
        served_names[name] = served
    rows = []
    for spec in list_models():
        served = served_names.pop(spec.name, None)
        rows.append(
            _model_row(spec.name, spec.dataset, spec.class_names, served, models, weights.is_ready(spec))
        )
    for name, served in served_names.items():  # .onnx files given on the command line
        spec = served.segmenter.spec if served.segmenter is not None else None
        classes = spec.class_names if spec is not None else ()
        rows.append(_model_row(name, spec.dataset if spec else None, classes, served, models, True))
    return rows


def _model_row(
    name: str, dataset: str | None, classes: tuple[str, ...], served: Any, models: ModelSet, cached: bool
) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": dataset,
        "classes": list(classes),
        "cached": cached,
        "served": served is not None,
        "status": served.status if served is not None else None,
        "default": served is not None and served.name == models.default,
    }


def _query_parameter(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_SEGMENT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    },
    "parameters": [
        _query_parameter("model", {"type": "string"}, "A served model (default: the server's first)."),
        _query_parameter(
            "output",
            {"type": "string", "enum": list(OUTPUTS), "default": "mask"},
            "mask: palette label PNG; overlay: colour overlay JPEG; scores: float16 logits C x h x w as "
            ".npy (geometry in X-Deeplab-* headers); json: classes with fractions, size, timings.",
        ),
        _query_parameter("alpha", {"type": "number", "default": 0.5}, "Overlay opacity, 0..1."),
        _query_parameter("crf", {"type": "boolean", "default": False}, "Refine with the dense CRF."),
        *(
            _query_parameter(f"crf_{name}", {"type": "number"}, f"CRF {name} (default: the model's).")
            for name in CRF_FIELDS
        ),
    ],
}

_SEGMENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/png": {}, "image/jpeg": {}, "application/octet-stream": {}, "application/json": {}}
    },
    400: {"description": "bad query parameter, empty body, or not a decodable image"},
    413: {"description": "body or decoded image over the limits"},
    415: {"description": "unsupported Content-Type"},
    503: {"description": "queue full, model not ready, or shutting down (Retry-After)"},
    504: {"description": "request timed out"},
}
