"""One ``POST /v1/segment`` request: its query, its image bytes, and the work done in a worker thread.

The work is the library's one path, as ``deeplab segment`` does it: :func:`deeplab_cli.files.read_image`
(same decoder and pixel guard), ``Segmenter.prepare -> run -> finish(crf=CRFRunner)``, and the encoders
of :mod:`deeplab_cli.files` and :mod:`deeplab_cli.palette`. So the label PNG of an image is byte for
byte the one ``deeplab segment IMAGE -o -`` writes.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from deeplab_cli import files
from deeplab_cli.errors import DeeplabError, ImageError, ImageTooLargeError, UsageError

if TYPE_CHECKING:
    from deeplab_cli.crf.params import CRFParams
    from deeplab_cli.runtime import Prediction, Segmenter

OUTPUTS = ("mask", "overlay", "scores", "json")
CRF_FIELDS = ("iterations", "pos_w", "pos_xy_std", "bi_w", "bi_xy_std", "bi_rgb_std", "unary_scale")
QUERY_KEYS = ("model", "output", "alpha", "crf", *(f"crf_{name}" for name in CRF_FIELDS))
RAW_TYPES = ("application/octet-stream", "application/x-www-form-urlencoded")  # the second: curl's default
OVERLAY_QUALITY = 90  # as ``deeplab segment --overlay``
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class RequestError(Exception):
    """A request that cannot be served: an HTTP status and one line for the client."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())  # one line, whatever the message held
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class SegmentQuery:
    """The query string of a segment request, checked."""

    model: str | None = None
    output: str = "mask"
    alpha: float = 0.5
    crf: bool = False
    crf_overrides: dict[str, float] = field(default_factory=dict)


def parse_query(params: Mapping[str, str]) -> SegmentQuery:
    """Check every query parameter (unknown ones are refused: a typo must not be silently ignored)."""
    if "url" in params:
        raise RequestError(400, "this server never fetches URLs: send the image bytes in the request body")
    unknown = sorted(set(params) - set(QUERY_KEYS))
    if unknown:
        raise RequestError(
            400, f"unknown query parameter(s): {', '.join(unknown)}; known: {', '.join(QUERY_KEYS)}"
        )
    output = params.get("output", "mask")
    if output not in OUTPUTS:
        raise RequestError(400, f"invalid output {output!r}: use one of {', '.join(OUTPUTS)}")
    alpha = _number(params, "alpha", 0.5)
    if not 0.0 <= alpha <= 1.0:
        raise RequestError(400, f"invalid alpha {alpha}: must be between 0 and 1")
    crf = _flag(params, "crf")
    overrides = {name: _number(params, f"crf_{name}") for name in CRF_FIELDS if f"crf_{name}" in params}
    if overrides and not crf:
        given = ", ".join(f"crf_{name}" for name in overrides)
        raise RequestError(400, f"{given} given without crf=true (add crf=true to refine)")
    if "iterations" in overrides and not float(overrides["iterations"]).is_integer():
        raise RequestError(400, f"crf_iterations must be an integer, got {params['crf_iterations']!r}")
    return SegmentQuery(params.get("model") or None, output, alpha, crf, overrides)


def _number(params: Mapping[str, str], key: str, default: float = 0.0) -> float:
    if key not in params:
        return default
    try:
        value = float(params[key])
    except ValueError:
        raise RequestError(400, f"invalid {key} {params[key]!r}: not a number") from None
    if not np.isfinite(value):
        raise RequestError(400, f"invalid {key} {params[key]!r}: not a finite number")
    return int(value) if key == "crf_iterations" and value.is_integer() else value


def _flag(params: Mapping[str, str], key: str) -> bool:
    value = params.get(key, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise RequestError(400, f"invalid {key} {params[key]!r}: use true or false")


def crf_params(model_defaults: Mapping[str, float], overrides: Mapping[str, float]) -> CRFParams:
    """The model's CRF parameters with the request's values on top (a bad value is a 400)."""
    from deeplab_cli.crf.params import CRFParams, resolve

    try:
        return resolve(CRFParams.from_dict(dict(model_defaults)), None, overrides)
    except (UsageError, ValueError) as exc:
        raise RequestError(400, str(exc)) from None


def check_content_type(content_type: str) -> str:
    """``multipart`` or ``raw`` for the body's media type; anything else is a 415."""
    media = content_type.split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return "multipart"
    if media.startswith("image/") or media in RAW_TYPES or not media:
        return "raw"
    raise RequestError(
        415,
        f"unsupported Content-Type {media!r}: send the image as a raw image/* (or "
        "application/octet-stream) body, or as a multipart/form-data file",
    )


# ------------------------------------------------------------------------------------------- the work


@dataclass
class Reply:
    """What goes back to the client: the body, its media type and headers."""

    body: bytes
    media_type: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Work:
    """Everything a worker thread needs for one request."""

    segmenter: Segmenter
    data: bytes
    query: SegmentQuery
    crf: CRFParams | None
    crf_backend: str
    crf_device: str
    max_pixels: int
    submitted: float


def run(work: Work) -> Reply:
    """Decode, segment and encode one image (in a worker thread); every failure is a :class:`RequestError`."""
    try:
        return _run(work)
    except RequestError:
        raise
    except ImageTooLargeError as exc:
        raise RequestError(413, _strip_name(str(exc))) from None
    except ImageError as exc:
        raise RequestError(400, _strip_name(str(exc))) from None
    except UsageError as exc:
        raise RequestError(400, str(exc)) from None
    except DeeplabError as exc:
        raise RequestError(500, str(exc)) from None
    except MemoryError:
        raise RequestError(503, "out of memory for this image; retry later or send a smaller one") from None


def _strip_name(message: str) -> str:
    return message.removeprefix("upload: ")


def _run(work: Work) -> Reply:
    started = time.perf_counter()
    timings = {"queue": started - work.submitted}
    stream = io.BytesIO(work.data)
    stream.name = "upload"  # what the decoder's messages call it
    rgb = files.read_image(stream, max_pixels=work.max_pixels)
    decoded = time.perf_counter()
    segmenter = work.segmenter
    prepared = segmenter.prepare(rgb)
    prepared.timings["decode"] = decoded - started
    start = time.perf_counter()
    logits = segmenter.run([prepared])[0]
    prepared.timings["infer"] = time.perf_counter() - start
    if work.crf is None:
        prediction = segmenter.finish(prepared, logits)
    else:
        from deeplab_cli.crf.runner import CRFRunner

        with CRFRunner(work.crf, work.crf_backend, device=work.crf_device, workers=0) as runner:
            prediction = segmenter.finish(prepared, logits, crf=runner)
    timings.update(prediction.timings)
    start = time.perf_counter()
    body, media_type = _encode(work.query, segmenter, rgb, prediction, timings)
    timings["encode"] = time.perf_counter() - start
    height, width = prediction.image_size
    headers = {"X-Deeplab-Model": segmenter.spec.name, "X-Deeplab-Size": f"{width}x{height}"}
    if work.query.output == "scores":
        headers.update(_scores_headers(segmenter, prediction))
    if work.query.output == "json":
        body = _json_body(segmenter, prediction, work, timings, time.perf_counter() - work.submitted)
    return Reply(body, media_type, headers)


def _encode(
    query: SegmentQuery, segmenter: Segmenter, rgb: np.ndarray, prediction: Prediction, timings: dict
) -> tuple[bytes, str]:
    spec = segmenter.spec
    if query.output == "mask":
        return files.encode_label_png(prediction.labels, spec.palette), "image/png"
    if query.output == "overlay":
        from PIL import Image

        from deeplab_cli.palette import overlay

        background = 0 if spec.class_names and spec.class_names[0] == "background" else None
        picture = overlay(rgb, prediction.labels, spec.palette, query.alpha, background)
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="JPEG", quality=OVERLAY_QUALITY)
        return buffer.getvalue(), "image/jpeg"
    if query.output == "scores":
        buffer = io.BytesIO()
        np.save(buffer, prediction.logits.astype(np.float16))
        return buffer.getvalue(), "application/octet-stream"
    return b"", "application/json"


def _scores_headers(segmenter: Segmenter, prediction: Prediction) -> dict[str, str]:
    """Where the C x h x w logits sit: the network input inside the padded input, and the stride."""
    return {
        "Content-Disposition": 'attachment; filename="logits.npy"',
        "X-Deeplab-Input-Size": "{}x{}".format(*prediction.input_size[::-1]),
        "X-Deeplab-Padded-Size": "{}x{}".format(*prediction.padded_size[::-1]),
        "X-Deeplab-Output-Stride": str(segmenter.spec.output_stride),
    }


def _json_body(
    segmenter: Segmenter, prediction: Prediction, work: Work, timings: dict[str, float], total: float
) -> bytes:
    height, width = prediction.image_size
    data = {
        "model": segmenter.spec.name,
        "size": {"width": width, "height": height},
        "classes": prediction.class_fractions(segmenter.spec.class_names),
        "crf": work.crf.to_dict() if work.crf is not None else None,
        "protocol": segmenter.describe_protocol(),
        "providers": segmenter.providers,
        "timings": {key: round(value, 4) for key, value in {**timings, "total": total}.items()},
    }
    return json.dumps(data).encode()
