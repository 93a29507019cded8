"""Batched DeepLab inference with ONNX Runtime: :class:`Segmenter`.

The protocol, per image (each model's registry row, :class:`~deeplab_cli.zoo.Protocol`, fixes it):

1. resize the image as the model was evaluated upstream (``geometry.network_input_size``): ADE20K with
   TF DeepLab's ``resize_to_range(513, 513, factor 16)`` by align-corners bilinear (TF's
   ``resize_bilinear(align_corners=True)``, no antialiasing), Cityscapes at native size, the VOC models
   by the rule their registry row records (with the measurements that chose it);
2. pad bottom/right with the model's mean colour to ``geometry.padded_size`` (``stride * k + 1``);
3. run the ONNX graph (it normalises internally) -> logits ``C x h x w`` at the output stride;
4. map every pixel of the ORIGINAL image to its place in the resized image (align-corners or pixel
   centres, matching step 1) and from there to the logit grid (align-corners on the padded input), and
   interpolate bilinearly; argmax -> labels; softmax -> probabilities when asked.

Step 4 is one separable linear map per axis (``geometry.Resampler``), evaluated in bands of rows, so a
6000 x 4000 label map never materialises C full-resolution float planes. With a dense CRF the
probabilities are computed on a grid of at most :data:`CRF_MAX_PIXELS` pixels (the image resized to it
with the same geometry), refined there, and resampled bilinearly to full size like the network's scores.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from deeplab_cli import geometry
from deeplab_cli.device import Device, parse_device
from deeplab_cli.errors import UsageError, WeightsError
from deeplab_cli.files import read_image
from deeplab_cli.geometry import Frame, Resampler, interpolation_matrix
from deeplab_cli.zoo import ModelSpec, Protocol, get_model

if TYPE_CHECKING:
    from deeplab_cli.crf.runner import CRFRunner

ImageLike = np.ndarray | Image.Image | str | os.PathLike

__all__ = [
    "CRF_MAX_PIXELS",
    "Prediction",
    "Prepared",
    "Segmenter",
    "create_session",
    "interpolation_matrix",
    "upsample",
    "upsample_labels",
]

# Bound on the float32 scratch of one band of upsampled scores (C x rows x W), in bytes.
BAND_BYTES = geometry.BAND_BYTES
# The dense CRF runs on a grid of at most this many pixels (the image and its probabilities resized to
# it, same aspect ratio); its output is resampled to full size. Bounds time and memory on huge photos.
CRF_MAX_PIXELS = 2048 * 1024
# ``resize`` values that are not a number: the registry's rule, or no resizing at all.
RESIZE_CHOICES = ("protocol", "native")


@dataclass
class Prediction:
    """The result for one image.

    ``labels``: H x W class indices at the original image size (``geometry.label_dtype``).
    ``probs``: C x H x W float32 softmax probabilities (only when asked for), same size as ``labels``;
    :meth:`iter_prob_bands` gives them in bands of rows instead, without holding all of them.
    ``logits``: C x h x w float32 raw scores at network resolution, for the padded network input.
    ``input_size``: (height, width) of the image as fed to the network (the protocol's resize);
    ``padded_size``: the padded network input; ``protocol``: the rule applied, in words.
    ``crf_probs``: the CRF's refined C x h' x w' probabilities, on its bounded grid, when one ran.
    """

    labels: np.ndarray
    logits: np.ndarray
    probs: np.ndarray | None
    image_size: tuple[int, int]
    input_size: tuple[int, int]
    padded_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)
    protocol: str = ""
    corners: bool = True
    crf_probs: np.ndarray | None = None

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        return (0, 0, self.input_size[0], self.input_size[1])

    @property
    def scale(self) -> float:
        """Network-input size over original size (1.0 unless the protocol resized the image)."""
        return self.input_size[0] / self.image_size[0] if self.image_size[0] else 1.0

    @property
    def frame(self) -> Frame:
        return Frame(self.image_size, self.input_size, self.padded_size, self.corners)

    def _resampler(self) -> tuple[Resampler, np.ndarray, bool]:
        """(resampler to full size, its source scores, whether those are already probabilities)."""
        if self.crf_probs is not None:
            source_hw = self.crf_probs.shape[1:]
            return Resampler.between(source_hw, self.image_size, self.corners), self.crf_probs, True
        return self.frame.resampler(self.logits.shape[1:]), self.logits, False

    def iter_prob_bands(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(top, C x rows x W float32)`` probabilities at full size, band by band, top to bottom.

        For writers of score files and overlays: only one band is ever held (default height: about
        ``BAND_BYTES`` of scratch). The CRF's refined probabilities when it ran, else the network's.
        """
        resampler, source, are_probs = self._resampler()
        for top, band in resampler.bands(source, rows):
            yield top, band if are_probs else geometry.softmax(band, out=band)

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
    """An image ready for the network: the protocol-resized input plus its geometry.

    ``rgb``: the network input, H' x W' x 3 (uint8, or float32 after an align-corners resize, which TF
    DeepLab does not round); ``source``: the image as given (uint8), kept for the CRF.
    """

    rgb: np.ndarray
    image_size: tuple[int, int]  # original (H, W)
    padded_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)
    source: np.ndarray | None = None
    protocol: str = ""
    corners: bool = True

    @property
    def input_size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]

    @property
    def frame(self) -> Frame:
        return Frame(self.image_size, self.input_size, self.padded_size, self.corners)


def upsample(
    logits: np.ndarray,
    image_size: tuple[int, int],
    input_size: tuple[int, int],
    padded_size: tuple[int, int],
    return_probs: bool = False,
    band_bytes: int = BAND_BYTES,
    corners: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (and optionally C x H x W softmax probabilities) at ``image_size`` from C x h x w logits.

    Kept for callers of the earlier API; it is ``geometry.Resampler`` underneath.
    """
    resampler = Frame(image_size, input_size, padded_size, corners).resampler(logits.shape[1:])
    labels = resampler.labels(logits)
    if not return_probs:
        return labels, None
    rows = max(1, band_bytes // max(1, logits.shape[0] * image_size[1] * 4))
    probs = np.empty((logits.shape[0], *image_size), dtype=np.float32)
    for top, band in resampler.bands(logits, rows):
        probs[:, top : top + band.shape[1]] = geometry.softmax(band, out=band)
    return labels, probs


def upsample_labels(
    logits: np.ndarray,
    image_size: tuple[int, int],
    input_size: tuple[int, int],
    padded_size: tuple[int, int],
    corners: bool = False,
) -> np.ndarray:
    """The exact argmax of the upsampled logits (``geometry.Resampler.labels``)."""
    return Frame(image_size, input_size, padded_size, corners).resampler(logits.shape[1:]).labels(logits)


# ------------------------------------------------------------------------------------------- sessions


def _resolve_model(model: str | ModelSpec | os.PathLike | None) -> tuple[ModelSpec | None, Path]:
    """(spec, onnx path) for a registry name, a spec, or a path to an exported .onnx file."""
    if isinstance(model, ModelSpec):
        return model, _ensure(model)
    if model is not None:
        candidate = Path(model)
        if isinstance(model, os.PathLike) or candidate.suffix.lower() == ".onnx":
            from deeplab_cli.export import read_spec

            # missing, unreadable, corrupt or not ours: one usage error (exit 2) before any image is read
            return read_spec(candidate), candidate
    spec = get_model(model)  # raises ModelNotFoundError (a usage error) for unknown names
    return spec, _ensure(spec)


def _ensure(spec: ModelSpec) -> Path:
    from deeplab_cli.weights import ensure_onnx

    return ensure_onnx(spec)


def _spec_from_session(session: Any, path: Path) -> ModelSpec:
    """The registry row embedded in an exported file (the key and format are ``export``'s)."""
    from deeplab_cli.export import spec_from_metadata

    return spec_from_metadata(session.get_modelmeta().custom_metadata_map, path)


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
        from deeplab_cli.weights import repair_hint

        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{path}: cannot load ONNX model ({reason}){repair_hint(Path(path))}") from exc
    target.check_granted(session.get_providers())
    return session


# ------------------------------------------------------------------------------------------- segmenter


def effective_protocol(base: Protocol, resize: str | int | None) -> Protocol:
    """The registry's protocol with the caller's ``resize`` override applied.

    ``"protocol"`` (or None): the row as it is. ``"native"``: no resizing, only padding. A number N:
    the longer side resized to exactly N (up or down) by the row's resize method.
    """
    if resize is None or resize == "protocol":
        return base
    if resize == "native":
        return replace(base, resize="none")
    try:
        longer = int(resize)
    except (TypeError, ValueError):
        raise UsageError(
            f"resize must be 'protocol', 'native' or a positive number of pixels, got {resize!r}"
        ) from None
    if longer < 1:
        raise UsageError(f"resize must be a positive number of pixels, got {longer}")
    return replace(base, resize="longer_side", resize_min=longer, resize_max=longer)


class Segmenter:
    """Run a DeepLab model on images.

    ``model``: a registry name (None = the default model), a :class:`ModelSpec`, or a path to an ONNX
    file exported by deeplab-cli (its spec is read from the file's metadata).
    ``device``: ``auto`` (CUDA when ONNX Runtime offers it), ``cpu``, ``cuda`` or ``cuda:N``; asking for
    CUDA without getting it raises :class:`DeviceError`.
    ``batch_size``: images per session run in :meth:`predict_batch` (only same-size inputs are batched).
    ``resize``: how images are resized before padding: ``"protocol"`` (default: the model's upstream
    rule from its registry row), ``"native"`` (never resized, only padded) or a number N (longer side
    resized to N). Labels and scores always come back at the image's own size.
    ``max_size``: a cap applied after ``resize``: a network input whose longer side still exceeds it is
    shrunk to it (bounds time and memory); None or 0 = no cap. (Before the registry recorded each
    model's rule this was the only resize; it keeps that meaning as a cap.)
    ``threads``: ONNX Runtime intra-op threads per session (default: ONNX Runtime's, one per physical
    core, for one session; the cores split evenly between several).
    ``sessions``: ONNX Runtime sessions that may run at once, for callers that infer from several threads
    (the batch pipeline). On a CPU, two single-threaded sessions working on two images outrun one
    two-threaded session; on CUDA one session is enough.
    """

    def __init__(
        self,
        model: str | ModelSpec | os.PathLike | None = None,
        device: str | Device = "auto",
        batch_size: int = 1,
        providers: list[Any] | None = None,
        max_size: int | None = None,
        threads: int | None = None,
        sessions: int = 1,
        resize: str | int | None = "protocol",
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {batch_size}")
        if max_size is not None and max_size < 0:
            raise UsageError(f"max size must be >= 0, got {max_size}")
        if sessions < 1:
            raise UsageError(f"sessions must be >= 1, got {sessions}")
        spec, path = _resolve_model(model)
        self.onnx_path = path
        self.device = device
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
        self.protocol: Protocol = effective_protocol(self.spec.protocol, resize)
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

    def describe_protocol(self) -> str:
        """The resize and padding rule applied, in words (recorded in predictions and eval JSON)."""
        text = self.protocol.describe()
        return f"{text}, capped at {self.max_size} px" if self.max_size else text

    # -- steps, usable separately by the batch pipeline ------------------------------------------------

    def prepare(self, image: ImageLike) -> Prepared:
        """Decode (if a path), convert to RGB and resize by the protocol; no network work."""
        start = time.perf_counter()
        rgb = self._as_rgb(image)
        height, width = rgb.shape[:2]
        if height == 0 or width == 0:
            raise UsageError("empty image (0 pixels)")
        decoded = time.perf_counter()
        size = geometry.network_input_size(height, width, self.protocol, self.max_size)
        prepared = self._prepared(rgb, size)
        prepared.timings = {"decode": decoded - start, "resize": time.perf_counter() - decoded}
        return prepared

    def _prepared(self, rgb: np.ndarray, size: tuple[int, int]) -> Prepared:
        method = self.protocol.resize_method
        return Prepared(
            rgb=geometry.resize_image(rgb, size, method),
            image_size=(rgb.shape[0], rgb.shape[1]),
            padded_size=geometry.padded_size(size[0], size[1], self.protocol),
            source=rgb,
            protocol=self.describe_protocol(),
            corners=method == geometry.ALIGN_CORNERS,
        )

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

    def finish(
        self,
        prepared: Prepared,
        logits: np.ndarray,
        return_probs: bool = False,
        crf: CRFRunner | None = None,
    ) -> Prediction:
        """One image's logits -> labels (+ probabilities) at its original size, optionally CRF-refined.

        With ``crf``, the probabilities are computed on a grid of at most :data:`CRF_MAX_PIXELS` pixels
        (the image resized to it, same aspect ratio) and refined there (``crf.refine_logits(image, logits,
        resampler)`` where the runner has it: the logits go to the CRF, not C x H x W probabilities), and
        the refined probabilities resampled bilinearly to full size; labels come from them by the exact
        banded fast path, so no C x H x W array at full size is ever made unless ``return_probs``.
        """
        start = time.perf_counter()
        timings = dict(prepared.timings)
        crf_probs = None
        if crf is None:
            resampler, source, are_probs = prepared.frame.resampler(logits.shape[1:]), logits, False
        else:
            crf_probs = self._refine(prepared, logits, crf, timings)
            resampler = Resampler.between(crf_probs.shape[1:], prepared.image_size, corners=False)
            source, are_probs = crf_probs, True
        labels = resampler.labels(source)
        probs = None
        if return_probs:
            probs = np.empty((source.shape[0], *prepared.image_size), dtype=np.float32)
            for top, band in resampler.bands(source):
                probs[:, top : top + band.shape[1]] = band if are_probs else geometry.softmax(band, out=band)
        timings["upsample"] = time.perf_counter() - start - timings.get("crf", 0.0)
        return Prediction(
            labels=labels,
            logits=logits,
            probs=probs,
            image_size=prepared.image_size,
            input_size=prepared.input_size,
            padded_size=prepared.padded_size,
            timings=timings,
            protocol=prepared.protocol,
            corners=prepared.corners,
            crf_probs=crf_probs,
        )

    @staticmethod
    def _refine(
        prepared: Prepared, logits: np.ndarray, crf: CRFRunner, timings: dict[str, float]
    ) -> np.ndarray:
        """The CRF's C x h' x w' probabilities on the bounded grid (the image resized by Pillow to it)."""
        if prepared.source is None:
            raise ValueError("this Prepared holds no source image; make it with Segmenter.prepare")
        height, width = prepared.image_size
        grid = geometry.fit_pixels(height, width, CRF_MAX_PIXELS)
        image = geometry.resize_image(prepared.source, grid, geometry.PILLOW_BILINEAR)
        resampler = prepared.frame.resampler(logits.shape[1:], grid)
        image = np.ascontiguousarray(image, dtype=np.uint8)
        refine_logits = getattr(crf, "refine_logits", None)  # CRFRunner: the runner resamples (see there)
        start = time.perf_counter()
        if refine_logits is not None:
            refined = refine_logits(image, logits, resampler)
        else:
            refined = crf.refine(image, resampler.dense_probs(logits))
        timings["crf"] = time.perf_counter() - start
        return np.asarray(refined, dtype=np.float32)

    # -- the public API ----------------------------------------------------------------------------------

    def predict(
        self, image: ImageLike, return_probs: bool = False, crf: CRFRunner | None = None
    ) -> Prediction:
        """Segment one image (H x W x 3 uint8 RGB array, PIL image, or path); see :meth:`finish`."""
        prepared = self.prepare(image)
        start = time.perf_counter()
        logits = self.run([prepared])[0]
        prepared.timings["infer"] = time.perf_counter() - start
        return self.finish(prepared, logits, return_probs, crf)

    def predict_batch(
        self, images: Iterable[ImageLike], return_probs: bool = False, crf: CRFRunner | None = None
    ) -> list[Prediction]:
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
                    results[index] = self.finish(prepared[index], logits[offset], return_probs, crf)
        return [result for result in results if result is not None]

    def scores(
        self, image: ImageLike, scales: Sequence[float] = (1.0,), flip: bool = False
    ) -> tuple[np.ndarray, dict[str, float]]:
        """C x H x W logits at the image's own size, fused over ``scales`` (max) and mirroring (mean).

        Multi-scale inference as DeepLab v2 evaluates: for each scale the protocol's network input is
        made ``scale`` times larger or smaller (from the original image, by the row's resize method),
        run with its mirror image in one batch when ``flip``, and upsampled to the original size; the
        mirrored scores are flipped back and averaged, the scales fused by an element-wise max. For
        ``deeplab eval`` and ``crf tune``. Timings: ``infer`` and ``upsample`` seconds.
        """
        rgb = self._as_rgb(image)
        height, width = rgb.shape[:2]
        if height == 0 or width == 0:
            raise UsageError("empty image (0 pixels)")
        base = geometry.network_input_size(height, width, self.protocol, self.max_size)
        fused: np.ndarray | None = None
        timings = {"infer": 0.0, "upsample": 0.0}
        for scale in scales:
            if scale <= 0:
                raise UsageError(f"scales must be positive, got {scale}")
            size = base if scale == 1.0 else geometry.scaled_size(base[0], base[1], scale)
            prepared = self._prepared(rgb, size)
            inputs = [prepared]
            if flip:
                inputs.append(replace(prepared, rgb=np.ascontiguousarray(prepared.rgb[:, ::-1])))
            start = time.perf_counter()
            logits = self.run(inputs)  # the image and its mirror share one padded size: one batch
            middle = time.perf_counter()
            resampler = prepared.frame.resampler(logits.shape[2:])
            scores = resampler.dense(logits[0])
            if flip:
                scores += resampler.dense(logits[1])[:, :, ::-1]
                scores *= 0.5
            fused = scores if fused is None else np.maximum(fused, scores, out=fused)
            timings["infer"] += middle - start
            timings["upsample"] += time.perf_counter() - middle
        if fused is None:
            raise UsageError("at least one scale is needed")
        return fused, timings

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
