"""Evaluate a model over a dataset split: confusion matrices without and with the dense CRF, trimap bands.

One pass over the split: each image is run once through the network (optionally at several scales and
mirrored); the probabilities feed both the plain argmax and the CRF, so the two scores compare the same
network output. Reading and decoding the image and its ground truth, and the trimap distance transform,
happen in a read-ahead thread while the network runs; CRF work goes to a pool of processes when one is
available.

Multi-scale inference follows DeepLab v2: the image is resized (Pillow, bilinear) by each scale, run, its
logits are upsampled to the original size (align-corners geometry of the padded input), and the score
maps are fused by their element-wise maximum. ``flip`` adds the left-right mirrored image at every scale
and averages its (mirrored back) logits with the unmirrored ones before fusion.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deeplab_cli.datasets import Dataset, Sample
from deeplab_cli.errors import DeeplabError, ImageError, UsageError
from deeplab_cli.metrics import TRIMAP_MAX_WIDTH, Band, ConfusionMatrix, TrimapAccumulator, trimap_band

READ_AHEAD = 3


@dataclass
class EvalOptions:
    """How to run the network and the CRF during evaluation."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    crf: Any = None  # deeplab_cli.crf.CRFParams, or None for no CRF
    crf_backend: str = "auto"
    crf_device: str = "cpu"
    crf_workers: int | None = None  # None: automatic; 0: run the CRF inline
    trimap_width: int = TRIMAP_MAX_WIDTH
    save_masks: Path | None = None


@dataclass
class Scores:
    """One (possibly fused) network output at the original image size."""

    logits: np.ndarray  # C x H x W float32
    infer_s: float  # seconds in the network
    upsample_s: float  # seconds upsampling and fusing


@dataclass
class Loaded:
    sample: Sample
    rgb: np.ndarray
    label: np.ndarray
    band: Band
    seconds: float  # decoding image + label and the trimap distance transform


@dataclass
class Split:
    """The confusion matrix and trimap bands of one variant (no CRF or CRF)."""

    matrix: ConfusionMatrix
    trimap: TrimapAccumulator

    def update(self, label: np.ndarray, pred: np.ndarray, band: Band) -> None:
        self.matrix.update(label, pred)
        self.trimap.update(label, pred, band)

    def summary(self, class_names: Sequence[str]) -> dict[str, Any]:
        return {**self.matrix.summary(class_names), "trimap": self.trimap.summary()}


@dataclass
class EvalResult:
    """Everything ``deeplab eval`` reports; :meth:`to_dict` is the ``--json`` document."""

    model: str
    dataset: str
    split: str
    class_names: tuple[str, ...]
    images: int
    missing: list[str]
    options: EvalOptions
    plain: Split
    crf: Split | None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        names = list(self.class_names)
        crf_params = None
        if self.options.crf is not None:
            crf_params = _params_dict(self.options.crf)
        wall = self.timings.get("wall_s", 0.0)
        return {
            "model": self.model,
            "dataset": self.dataset,
            "split": self.split,
            "images": self.images,
            "missing": self.missing,
            "scales": list(self.options.scales),
            "flip": self.options.flip,
            "crf_params": crf_params,
            "class_names": names,
            "no_crf": self.plain.summary(names),
            "crf": self.crf.summary(names) if self.crf else None,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "images_per_second": round(self.images / wall, 4) if wall else None,
        }


def _params_dict(params: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(params):
        return dataclasses.asdict(params)
    return dict(vars(params))


# -- network output ---------------------------------------------------------------------------------------


def upsample_logits(
    logits: np.ndarray, image_size: tuple[int, int], input_size: tuple[int, int], padded_size: tuple[int, int]
) -> np.ndarray:
    """C x h x w logits of a padded network input -> C x H x W at the original image size.

    Bilinear with align-corners geometry on the padded input, cropped to the ``input_size`` box and (when
    the image was resized) resampled by pixel centres to ``image_size``: the runtime's geometry.
    """
    from deeplab_cli.runtime import interpolation_matrix

    channels, lh, lw = logits.shape
    ry = interpolation_matrix(image_size[0], input_size[0], padded_size[0], lh)
    rx_t = np.ascontiguousarray(interpolation_matrix(image_size[1], input_size[1], padded_size[1], lw).T)
    columns = (np.ascontiguousarray(logits, dtype=np.float32).reshape(channels * lh, lw) @ rx_t).reshape(
        channels, lh, image_size[1]
    )
    out = np.empty((channels, image_size[0], image_size[1]), dtype=np.float32)
    for c in range(channels):  # one BLAS call per class: faster than numpy's broadcast matmul
        np.matmul(ry, columns[c], out=out[c])
    return out


def softmax(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    """Softmax along ``axis`` (float32, numerically stable)."""
    shifted = scores - scores.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


def network_scores(
    segmenter: Any, rgb: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = False
) -> Scores:
    """Logits at the original size, fused over ``scales`` (max) and mirroring (mean)."""
    height, width = rgb.shape[:2]
    fused: np.ndarray | None = None
    infer_s = upsample_s = 0.0
    for scale in scales:
        if scale <= 0:
            raise UsageError(f"scales must be positive, got {scale}")
        scaled = rgb
        if scale != 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            scaled = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
        inputs = [scaled, np.ascontiguousarray(scaled[:, ::-1])] if flip else [scaled]
        prepared = [segmenter.prepare(image) for image in inputs]
        start = time.perf_counter()
        logits = segmenter.run(prepared)  # the image and its mirror share one padded size: one batch
        middle = time.perf_counter()
        maps = [
            upsample_logits(logits[k], (height, width), item.input_size, item.padded_size)
            for k, item in enumerate(prepared)
        ]
        if flip:
            maps[0] += maps[1][:, :, ::-1]
            maps[0] *= 0.5
        fused = maps[0] if fused is None else np.maximum(fused, maps[0], out=fused)
        infer_s += middle - start
        upsample_s += time.perf_counter() - middle
    assert fused is not None
    return Scores(fused, infer_s, upsample_s)


def labels_of(scores: np.ndarray) -> np.ndarray:
    """Argmax over classes as uint8 (uint16 above 256 classes)."""
    dtype = np.uint8 if scores.shape[0] <= 256 else np.uint16
    return scores.argmax(axis=0).astype(dtype)


# -- reading ----------------------------------------------------------------------------------------------


def read_rgb(path: Path) -> np.ndarray:
    """An evaluation image as stored (no EXIF rotation: ground truth is aligned with the stored pixels)."""
    from deeplab_cli.files import to_rgb

    try:
        with Image.open(path) as image:
            return np.array(to_rgb(image), order="C")  # a writable copy (Pillow's arrays are read-only)
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from exc


def _load(dataset: Dataset, sample: Sample, width: int) -> Loaded:
    start = time.perf_counter()
    rgb = read_rgb(sample.image_path)
    label = dataset.load_label(sample)
    if label.shape != rgb.shape[:2]:
        raise DeeplabError(
            f"{sample.id}: image {rgb.shape[1]}x{rgb.shape[0]} and ground truth "
            f"{label.shape[1]}x{label.shape[0]} differ in size"
        )
    band = trimap_band(label, width, dataset.ignore_index)
    return Loaded(sample, rgb, label, band, time.perf_counter() - start)


def read_ahead(dataset: Dataset, width: int, depth: int = READ_AHEAD) -> Iterator[Loaded]:
    """Loaded samples in order, decoded by a background thread ``depth`` items ahead."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deeplab-read") as pool:
        pending: deque[Future[Loaded]] = deque()
        samples = iter(dataset.samples)
        for sample in samples:
            pending.append(pool.submit(_load, dataset, sample, width))
            if len(pending) >= depth:
                break
        while pending:
            loaded = pending.popleft().result()
            nxt = next(samples, None)
            if nxt is not None:
                pending.append(pool.submit(_load, dataset, nxt, width))
            yield loaded


# -- CRF --------------------------------------------------------------------------------------------------


class _InlineCRF:
    """Runs the CRF in the calling thread (no worker processes)."""

    def __init__(self, params: Any, backend: str, device: str):
        from deeplab_cli.crf import refine

        self._refine = refine
        self.params, self.backend, self.device = params, backend, device

    def submit(self, image: np.ndarray, probs: np.ndarray) -> Future[np.ndarray]:
        future: Future[np.ndarray] = Future()
        future.set_result(self._refine(image, probs, self.params, backend=self.backend, device=self.device))
        return future

    def close(self, cancel: bool = False) -> None:
        pass


def _crf_runner(options: EvalOptions) -> Any:
    """A CRF worker pool (processes) when more than one worker is useful, else inline."""
    workers = options.crf_workers
    if workers is None:
        import os

        workers = (os.cpu_count() or 1) if options.crf_device == "cpu" else 0
    if workers and workers > 1:
        try:
            from deeplab_cli.crf.workers import CRFWorkerPool
        except ImportError:
            pass
        else:
            return _PoolCRF(CRFWorkerPool, options, workers)
    return _InlineCRF(options.crf, options.crf_backend, options.crf_device)


class _PoolCRF:
    """CRF in worker processes (:class:`deeplab_cli.crf.workers.CRFWorkerPool`), one thread each."""

    def __init__(self, pool_class: Any, options: EvalOptions, workers: int):
        self.pool = pool_class(
            options.crf, backend=options.crf_backend, processes=workers, threads=1, device=options.crf_device
        )
        self.workers = workers

    def submit(self, image: np.ndarray, probs: np.ndarray) -> Future[np.ndarray]:
        return self.pool.submit(image, probs)

    def close(self, cancel: bool = False) -> None:
        self.pool.close(cancel=cancel)


# -- the loop ---------------------------------------------------------------------------------------------


def _new_split(num_classes: int, dataset: Dataset, width: int) -> Split:
    return Split(
        ConfusionMatrix(num_classes, dataset.ignore_index, dataset.exclude_classes),
        TrimapAccumulator(num_classes, width, dataset.ignore_index, dataset.exclude_classes),
    )


def evaluate(
    segmenter: Any,
    dataset: Dataset,
    options: EvalOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalResult:
    """Run ``segmenter`` over ``dataset`` and score it (and its CRF refinement when ``options.crf``)."""
    options = options or EvalOptions()
    spec = segmenter.spec
    num_classes = spec.num_classes
    if num_classes != dataset.num_classes:
        raise UsageError(
            f"model {spec.name} predicts {num_classes} classes but {dataset.name} has {dataset.num_classes}; "
            f"choose a {dataset.name} model"
        )
    plain = _new_split(num_classes, dataset, options.trimap_width)
    crf = _new_split(num_classes, dataset, options.trimap_width) if options.crf is not None else None
    timings = dict.fromkeys(("read_s", "infer_s", "upsample_s", "crf_s", "metrics_s", "save_s"), 0.0)
    runner = _crf_runner(options) if options.crf is not None else None
    pending: deque[tuple[Loaded, Future[np.ndarray], float]] = deque()
    window = max(2, getattr(runner, "workers", 2) * 2) if runner else 0
    start = time.perf_counter()
    count = 0

    def finish_crf(block: bool) -> None:
        while pending and (block or pending[0][1].done() or len(pending) > window):
            loaded, future, _ = pending.popleft()
            tic = time.perf_counter()
            refined = future.result()
            timings["crf_s"] += time.perf_counter() - tic  # time the main thread waits for the CRF
            pred = labels_of(refined)
            tic = time.perf_counter()
            crf.update(loaded.label, pred, loaded.band)
            timings["metrics_s"] += time.perf_counter() - tic
            _save(options.save_masks, "crf", loaded.sample.id, pred, spec.palette, timings)

    try:
        for loaded in read_ahead(dataset, options.trimap_width):
            timings["read_s"] += loaded.seconds
            scores = network_scores(segmenter, loaded.rgb, options.scales, options.flip)
            timings["infer_s"] += scores.infer_s
            timings["upsample_s"] += scores.upsample_s
            tic = time.perf_counter()
            pred = labels_of(scores.logits)
            plain.update(loaded.label, pred, loaded.band)
            timings["metrics_s"] += time.perf_counter() - tic
            _save(options.save_masks, None, loaded.sample.id, pred, spec.palette, timings)
            if runner is not None:
                tic = time.perf_counter()
                probs = softmax(scores.logits)
                timings["upsample_s"] += time.perf_counter() - tic
                tic = time.perf_counter()
                pending.append((loaded, runner.submit(loaded.rgb, probs), tic))
                timings["crf_s"] += time.perf_counter() - tic
                finish_crf(block=False)
            count += 1
            if progress:
                progress(loaded.sample.id)
        finish_crf(block=True)
    except BaseException:
        if runner is not None:
            runner.close(cancel=True)  # an error or Ctrl-C: drop queued CRF work
        raise
    if runner is not None:
        runner.close()
    timings["wall_s"] = time.perf_counter() - start
    return EvalResult(
        model=spec.name,
        dataset=dataset.name,
        split=dataset.split,
        class_names=tuple(spec.class_names),
        images=count,
        missing=list(dataset.missing),
        options=options,
        plain=plain,
        crf=crf,
        timings=timings,
    )


def _save(
    folder: Path | None, sub: str | None, image_id: str, labels: np.ndarray, palette: str, timings: dict
) -> None:
    """Write ``folder/[sub/]<id>.png`` (palette PNG of class indices) when saving masks."""
    if folder is None:
        return
    from deeplab_cli.files import write_label_png

    tic = time.perf_counter()
    target = Path(folder) / sub if sub else Path(folder)
    write_label_png(target / f"{image_id}.png", labels, palette)
    timings["save_s"] += time.perf_counter() - tic
