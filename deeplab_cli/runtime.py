"""Batched DeepLab inference with ONNX Runtime: :class:`Segmenter`.

The protocol (DESIGN.md section 1), per image:

1. optionally shrink the image so its longer side is at most ``max_size`` (antialiased, Pillow);
2. pad bottom/right with the model's mean colour to ``geometry.padded_size`` (``stride * k + 1``);
3. run the ONNX graph (it normalises internally) -> logits ``C x h x w`` at the output stride;
4. upsample the logits bilinearly with align-corners geometry to the padded size, crop the image's
   box, and (when the image was shrunk) resample to the original size; argmax -> labels; softmax ->
   probabilities when asked.

Step 4 is one separable linear map per axis (two small interpolation matrices), evaluated in bands of
rows, so a 6000 x 4000 label map never materialises 21 full-resolution float planes: only the labels
(and the probabilities, when asked for) are full size.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deeplab_cli import geometry
from deeplab_cli.device import Device, parse_device
from deeplab_cli.errors import UsageError, WeightsError
from deeplab_cli.files import read_image
from deeplab_cli.zoo import ModelSpec, get_model

ImageLike = np.ndarray | Image.Image | str | os.PathLike

# Bound on the float32 scratch of one band of upsampled scores (C x rows x W), in bytes.
BAND_BYTES = 64 * 2**20
# Default bound on the longer side fed to the network (see ``Segmenter``); 0/None disables it.
DEFAULT_MAX_SIZE = 2048


@dataclass
class Prediction:
    """The result for one image.

    ``labels``: H x W class indices at the original image size (uint8, uint16 above 256 classes).
    ``probs``: C x H x W float32 softmax probabilities (only when asked for), same size as ``labels``.
    ``logits``: C x h x w float32 raw scores at network resolution, for the padded network input.
    ``input_size``: (height, width) of the image as fed to the network (smaller than ``image_size``
    when ``max_size`` shrank it); ``padded_size``: the padded network input; ``crop_box``:
    (top, left, bottom, right) of the image inside the padded input, in network-input pixels.
    """

    labels: np.ndarray
    logits: np.ndarray
    probs: np.ndarray | None
    image_size: tuple[int, int]
    input_size: tuple[int, int]
    padded_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        return (0, 0, self.input_size[0], self.input_size[1])

    @property
    def scale(self) -> float:
        """Network-input size over original size (1.0 unless ``max_size`` shrank the image)."""
        return self.input_size[0] / self.image_size[0] if self.image_size[0] else 1.0

    def class_fractions(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Classes present, most frequent first: ``{"id", "name", "fraction"}``."""
        counts = np.bincount(self.labels.reshape(-1), minlength=1)
        total = max(int(self.labels.size), 1)
        rows = []
        for index in np.argsort(-counts, kind="stable"):
            if counts[index] == 0:
                break
            name = class_names[index] if class_names and index < len(class_names) else str(index)
            rows.append({"id": int(index), "name": name, "fraction": round(float(counts[index]) / total, 6)})
        return rows


@dataclass
class Prepared:
    """An image ready for the network: resized (if needed) RGB array plus its geometry."""

    rgb: np.ndarray  # the network-input image (after max_size), H' x W' x 3 uint8
    image_size: tuple[int, int]  # original (H, W)
    padded_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


# ------------------------------------------------------------------------------------------- sessions


def _resolve_model(model: str | ModelSpec | os.PathLike | None) -> tuple[ModelSpec | None, Path]:
    """(spec, onnx path) for a registry name, a spec, or a path to an exported .onnx file."""
    if isinstance(model, ModelSpec):
        return model, _ensure(model)
    if model is not None:
        candidate = Path(model)
        if isinstance(model, os.PathLike) or candidate.suffix.lower() == ".onnx":
            if not candidate.is_file():
                raise UsageError(f"model file not found: {candidate}")
            return None, candidate
    spec = get_model(model)  # raises ModelNotFoundError (a usage error) for unknown names
    return spec, _ensure(spec)


def _ensure(spec: ModelSpec) -> Path:
    from deeplab_cli.weights import ensure_onnx

    return ensure_onnx(spec)


def _spec_from_session(session: Any, path: Path) -> ModelSpec:
    meta = session.get_modelmeta().custom_metadata_map
    if "deeplab.spec" not in meta:
        raise WeightsError(f"{path}: ONNX file has no 'deeplab.spec' metadata (not exported by deeplab-cli)")
    return ModelSpec.from_json(meta["deeplab.spec"])


def create_session(
    path: Path, device: str | Device = "auto", threads: int | None = None, providers: list[Any] | None = None
) -> Any:
    """An ONNX Runtime session on ``device``; asking for CUDA and not getting it raises DeviceError."""
    import onnxruntime as ort

    target = parse_device(device)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, one thread per physical core
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if providers is None:
        providers = target.onnx_providers()
    try:
        session = ort.InferenceSession(os.fspath(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise WeightsError(f"{path}: cannot load ONNX model: {exc}") from exc
    target.check_granted(session.get_providers())
    return session


# ------------------------------------------------------------------------------------------- geometry


def _axis_positions(out_n: int, input_n: int, padded_n: int, logits_n: int) -> np.ndarray:
    """Positions, in logit cells, of the output pixels along one axis (see :func:`interpolation_matrix`)."""
    y = np.arange(out_n, dtype=np.float64)
    if out_n != input_n:
        y = np.clip((y + 0.5) * (input_n / out_n) - 0.5, 0.0, input_n - 1)
    if padded_n <= 1 or logits_n <= 1:
        return np.zeros_like(y)
    return y * ((logits_n - 1) / (padded_n - 1))


def _taps(
    out_n: int, input_n: int, padded_n: int, logits_n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low index, high index, fraction) of the two logits each output pixel interpolates."""
    position = _axis_positions(out_n, input_n, padded_n, logits_n)
    low = np.clip(np.floor(position).astype(np.int64), 0, logits_n - 1)
    high = np.minimum(low + 1, logits_n - 1)
    return low, high, (position - low).astype(np.float32)


def interpolation_matrix(out_n: int, input_n: int, padded_n: int, logits_n: int) -> np.ndarray:
    """The (out_n x logits_n) bilinear weights mapping logits to output pixels along one axis.

    Logits sit on padded-input pixels ``j * (padded_n - 1) / (logits_n - 1)`` (align-corners). Output
    pixel ``y`` is network-input pixel ``y`` when ``out_n == input_n``; otherwise (the image was shrunk
    to ``input_n``) pixel centres are mapped: ``(y + 0.5) * input_n / out_n - 0.5``.
    """
    low, high, frac = _taps(out_n, input_n, padded_n, logits_n)
    weights = np.zeros((out_n, logits_n), dtype=np.float32)
    rows = np.arange(out_n)
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def upsample(
    logits: np.ndarray,
    image_size: tuple[int, int],
    input_size: tuple[int, int],
    padded_size: tuple[int, int],
    return_probs: bool = False,
    band_bytes: int = BAND_BYTES,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (and optionally softmax probabilities) at ``image_size`` from C x h x w logits.

    Equivalent to ``interpolate(logits, padded_size, bilinear, align_corners=True)``, cropping the
    ``input_size`` box and resampling to ``image_size``. Labels alone take the fast exact path of
    :func:`upsample_labels`; probabilities are computed densely, in bands of rows.
    """
    if not return_probs:
        return upsample_labels(logits, image_size, input_size, padded_size), None
    import torch

    channels, lh, lw = logits.shape
    height, width = image_size
    ry = torch.from_numpy(interpolation_matrix(height, input_size[0], padded_size[0], lh))
    rx_t = torch.from_numpy(interpolation_matrix(width, input_size[1], padded_size[1], lw)).T.contiguous()
    scores = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    labels = np.empty((height, width), dtype=_label_dtype(channels))
    probs = np.empty((channels, height, width), dtype=np.float32)
    band = max(1, band_bytes // max(1, channels * width * 4))
    with torch.inference_mode():
        for top in range(0, height, band):
            bottom = min(height, top + band)
            rows = torch.matmul(torch.matmul(ry[top:bottom], scores), rx_t)  # C x band x W
            band_probs = torch.softmax(rows, dim=0).numpy()
            probs[:, top:bottom] = band_probs
            labels[top:bottom] = band_probs.argmax(axis=0)
    return labels, probs


def _label_dtype(channels: int) -> type:
    return np.uint8 if channels <= 256 else np.uint16


def upsample_labels(
    logits: np.ndarray,
    image_size: tuple[int, int],
    input_size: tuple[int, int],
    padded_size: tuple[int, int],
    chunk_bytes: int = 16 * 2**20,
) -> np.ndarray:
    """The argmax of the bilinearly upsampled logits, exactly, without upsampling every class plane.

    A bilinear value is a convex combination of the four surrounding logits, so where one class wins at
    all four corners of a logit cell it wins everywhere inside the cell. Those pixels take the cell's
    label directly; only pixels of cells on class borders are interpolated (C values each, in chunks).
    """
    channels, lh, lw = logits.shape
    height, width = image_size
    y0, y1, fy = _taps(height, input_size[0], padded_size[0], lh)
    x0, x1, fx = _taps(width, input_size[1], padded_size[1], lw)
    coarse = logits.argmax(axis=0).astype(_label_dtype(channels))
    below = np.vstack([coarse[1:], coarse[-1:]])
    uniform = (coarse == below) & (coarse == np.hstack([coarse[:, 1:], coarse[:, -1:]]))
    uniform &= coarse == np.hstack([below[:, 1:], below[:, -1:]])
    labels = np.empty((height, width), dtype=coarse.dtype)
    table = np.ascontiguousarray(logits.reshape(channels, -1).T, dtype=np.float32)  # cells x C
    chunk = max(4096, chunk_bytes // (channels * 4))  # border pixels per step: bounds the C-wide temporaries
    band = max(1, chunk // max(1, width))  # rows per band: bounds the masks and index arrays
    for first in range(0, height, band):
        ys = slice(first, min(height, first + band))
        labels[ys] = coarse[y0[ys]][:, x0]
        rows, cols = np.nonzero(~uniform[y0[ys]][:, x0])
        rows += first
        for start in range(0, rows.size, chunk):
            r, c = rows[start : start + chunk], cols[start : start + chunk]
            wy, wx = fy[r][:, None], fx[c][:, None]
            top = table[y0[r] * lw + x0[c]] * (1 - wx) + table[y0[r] * lw + x1[c]] * wx
            bottom = table[y1[r] * lw + x0[c]] * (1 - wx) + table[y1[r] * lw + x1[c]] * wx
            labels[r, c] = (top * (1 - wy) + bottom * wy).argmax(axis=1)
    return labels


# ------------------------------------------------------------------------------------------- segmenter


class Segmenter:
    """Run a DeepLab model on images.

    ``model``: a registry name (None = the default model), a :class:`ModelSpec`, or a path to an ONNX
    file exported by deeplab-cli (its spec is read from the ``deeplab.spec`` metadata).
    ``device``: ``auto`` (CUDA when ONNX Runtime offers it), ``cpu``, ``cuda`` or ``cuda:N``; asking for
    CUDA without getting it raises :class:`DeviceError`.
    ``batch_size``: images per session run in :meth:`predict_batch` (only same-size inputs are batched).
    ``max_size``: images whose longer side exceeds it are shrunk for the network and the scores
    resampled to the original size (bounds time and memory for huge photos); None or 0 = never.
    ``threads``: ONNX Runtime intra-op threads per session (default: ONNX Runtime's, one per physical
    core, for one session; the cores split evenly between several).
    ``sessions``: ONNX Runtime sessions that may run at once, for callers that infer from several threads
    (the batch pipeline). On a CPU, two single-threaded sessions working on two images outrun one
    two-threaded session (measured: see the segment report); on CUDA one session is enough.
    """

    def __init__(
        self,
        model: str | ModelSpec | os.PathLike | None = None,
        device: str = "auto",
        batch_size: int = 1,
        providers: list[Any] | None = None,
        max_size: int | None = DEFAULT_MAX_SIZE,
        threads: int | None = None,
        sessions: int = 1,
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {batch_size}")
        if max_size is not None and max_size < 0:
            raise UsageError(f"max size must be >= 0, got {max_size}")
        spec, path = _resolve_model(model)
        self.onnx_path = path
        self.device = device
        if sessions < 1:
            raise UsageError(f"sessions must be >= 1, got {sessions}")
        per_session = threads or (max(1, (os.cpu_count() or 1) // sessions) if sessions > 1 else None)
        self.session = create_session(path, device=device, threads=per_session, providers=providers)
        if sessions > 1 and "CUDAExecutionProvider" in self.session.get_providers():
            sessions = 1
        self.sessions = sessions
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pool.put(self.session)
        for _ in range(sessions - 1):
            self._pool.put(create_session(path, device=device, threads=per_session, providers=providers))
        self.spec: ModelSpec = spec or _spec_from_session(self.session, path)
        self.batch_size = batch_size
        self.max_size = max_size or None
        self._input_name = self.session.get_inputs()[0].name

    def __repr__(self) -> str:
        return f"Segmenter({self.spec.name!r}, providers={self.providers})"

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    # -- steps, usable separately by the batch pipeline ------------------------------------------------

    def prepare(self, image: ImageLike) -> Prepared:
        """Decode (if a path), convert to RGB and shrink to ``max_size``; no network work."""
        start = time.perf_counter()
        rgb = self._as_rgb(image)
        height, width = rgb.shape[:2]
        if height == 0 or width == 0:
            raise UsageError("empty image (0 pixels)")
        decoded = time.perf_counter()
        if self.max_size and max(height, width) > self.max_size:
            scale = self.max_size / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
        padded = geometry.padded_size(rgb.shape[0], rgb.shape[1], self.spec.protocol)
        timings = {"decode": decoded - start, "resize": time.perf_counter() - decoded}
        return Prepared(rgb=rgb, image_size=(height, width), padded_size=padded, timings=timings)

    def run(self, prepared: Sequence[Prepared]) -> np.ndarray:
        """One session run on same-padded-size inputs: N x C x h x w float32 logits."""
        sizes = {item.padded_size for item in prepared}
        if len(sizes) != 1:
            raise ValueError(f"a batch must share one padded size, got {sorted(sizes)}")
        batch = geometry.pad_batch([item.rgb for item in prepared], sizes.pop(), self.spec)
        session = self._pool.get()  # one run at a time per session; up to ``sessions`` runs at once
        try:
            (logits,) = session.run(None, {self._input_name: batch})
        finally:
            self._pool.put(session)
        return logits

    def finish(self, prepared: Prepared, logits: np.ndarray, return_probs: bool = False) -> Prediction:
        """Upsample one image's logits to its original size: labels (+ probabilities)."""
        start = time.perf_counter()
        labels, probs = upsample(
            logits, prepared.image_size, prepared.input_size, prepared.padded_size, return_probs
        )
        timings = dict(prepared.timings, upsample=time.perf_counter() - start)
        return Prediction(
            labels=labels,
            logits=logits,
            probs=probs,
            image_size=prepared.image_size,
            input_size=prepared.input_size,
            padded_size=prepared.padded_size,
            timings=timings,
        )

    # -- the public API ----------------------------------------------------------------------------------

    def predict(self, image: ImageLike, return_probs: bool = False) -> Prediction:
        """Segment one image (H x W x 3 uint8 RGB array, PIL image, or path)."""
        prepared = self.prepare(image)
        start = time.perf_counter()
        logits = self.run([prepared])[0]
        prepared.timings["infer"] = time.perf_counter() - start
        return self.finish(prepared, logits, return_probs)

    def predict_batch(self, images: Iterable[ImageLike], return_probs: bool = False) -> list[Prediction]:
        """Segment several images, batching those of the same padded size; results in input order."""
        prepared = [self.prepare(image) for image in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(prepared):
            groups.setdefault(item.padded_size, []).append(index)
        results: list[Prediction | None] = [None] * len(prepared)
        for indices in groups.values():
            for first in range(0, len(indices), self.batch_size):
                chunk = indices[first : first + self.batch_size]
                start = time.perf_counter()
                logits = self.run([prepared[i] for i in chunk])
                elapsed = (time.perf_counter() - start) / len(chunk)
                for offset, index in enumerate(chunk):
                    prepared[index].timings["infer"] = elapsed
                    results[index] = self.finish(prepared[index], logits[offset], return_probs)
        return [result for result in results if result is not None]

    @staticmethod
    def _as_rgb(image: ImageLike) -> np.ndarray:
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            if image.ndim != 3 or image.shape[2] not in (3, 4):
                raise UsageError(f"expected an H x W x 3 RGB array, got shape {image.shape}")
            if image.dtype != np.uint8:
                raise UsageError(f"expected a uint8 image array, got {image.dtype}")
            return np.ascontiguousarray(image[:, :, :3])
        if isinstance(image, Image.Image):
            from deeplab_cli.files import to_rgb

            return to_rgb(image)
        return read_image(image)
