"""Evaluate a model over a dataset split: confusion matrices without and with the dense CRF, trimap bands.

One pass over the split: each image is run once through the network (optionally at several scales and
mirrored, by ``Segmenter.scores``, which applies the model's upstream resize protocol); the probabilities
feed both the plain argmax and the CRF, so the two scores compare the same network output. Reading and
decoding the image and its ground truth, and the trimap distance transform, happen in a read-ahead thread
while the network runs; the CRF runs in a :class:`~deeplab_cli.crf.runner.CRFRunner` (worker processes,
inline or on a GPU) given by the caller, so it overlaps with the network.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from deeplab_cli.datasets import Dataset, Sample
from deeplab_cli.errors import DeeplabError, ImageError, UsageError
from deeplab_cli.files import probe_folder
from deeplab_cli.geometry import labels_of, softmax
from deeplab_cli.metrics import (
    TRIMAP_MAX_WIDTH,
    Band,
    ConfusionMatrix,
    LabelError,
    TrimapAccumulator,
    trimap_band,
)

if TYPE_CHECKING:
    from deeplab_cli.crf.runner import CRFRunner
    from deeplab_cli.zoo import ModelSpec

READ_AHEAD = 3


class ScoringModel(Protocol):
    """What evaluation needs of a model (``runtime.Segmenter``, or a fake one in tests)."""

    spec: ModelSpec

    def scores(
        self, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = False
    ) -> tuple[np.ndarray, dict[str, float]]: ...

    def describe_protocol(self) -> str: ...


@dataclass
class EvalOptions:
    """How to run the network during evaluation (the CRF is the runner passed to :func:`evaluate`)."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    trimap_width: int = TRIMAP_MAX_WIDTH
    save_masks: Path | None = None


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
    protocol: dict[str, Any] = field(default_factory=dict)
    crf_params: dict[str, Any] | None = None
    crf_backend: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        names = list(self.class_names)
        wall = self.timings.get("wall_s", 0.0)
        return {
            "model": self.model,
            "dataset": self.dataset,
            "split": self.split,
            "images": self.images,
            "missing": self.missing,
            "protocol": self.protocol,
            "scales": list(self.options.scales),
            "flip": self.options.flip,
            "crf_params": self.crf_params,
            "crf_backend": self.crf_backend,
            "class_names": names,
            "no_crf": self.plain.summary(names),
            "crf": self.crf.summary(names) if self.crf else None,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "images_per_second": round(self.images / wall, 4) if wall else None,
        }


def protocol_record(model: ScoringModel) -> dict[str, Any]:
    """The resize/padding protocol the model was run with (after any --resize override), for the JSON."""
    protocol = getattr(model, "protocol", None) or getattr(model.spec, "protocol", None)
    fields = dataclasses.asdict(protocol) if dataclasses.is_dataclass(protocol) else {}
    return {**fields, "text": model.describe_protocol()}


def check_writable(*paths: Path | None) -> None:
    """Fail now, with one line (exit 2), if a result could not be written to one of ``paths`` later.

    Expensive runs (a whole split, a parameter search) must not end in a lost result. The check creates
    and removes a temporary file in the target's folder (or its nearest existing ancestor, as the writer
    creates missing folders): permission bits alone do not tell a read-only mount or a path under a file.
    """
    for path in paths:
        if path is None:
            continue
        target = Path(path)
        if target.is_dir():
            raise UsageError(f"cannot write {target}: it is a folder")
        folder = target.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            if not folder.is_dir():
                raise NotADirectoryError(20, "not a folder", str(folder))
            probe_folder(folder)
        except OSError as exc:
            raise UsageError(f"cannot write {target}: {exc.strerror or exc}") from None
        if target.exists() and not os.access(target, os.W_OK):
            raise UsageError(f"cannot write {target}: permission denied")


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
    _check_label_range(label, dataset, sample.id)
    band = trimap_band(label, width, dataset.ignore_index)
    return Loaded(sample, rgb, label, band, time.perf_counter() - start)


def _check_label_range(label: np.ndarray, dataset: Dataset, sample_id: str) -> None:
    """A ground-truth label that is neither a class nor the ignore value is a broken dataset: one line."""
    values = np.unique(label)
    bad = [int(v) for v in values if v != dataset.ignore_index and (v < 0 or v >= dataset.num_classes)]
    if bad:
        raise LabelError(
            f"{sample_id}: ground truth has label(s) {', '.join(map(str, bad[:5]))} outside the class range "
            f"0..{dataset.num_classes - 1} (and not the ignore value {dataset.ignore_index})"
        )


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


# -- the loop ---------------------------------------------------------------------------------------------


def _new_split(num_classes: int, dataset: Dataset, width: int) -> Split:
    return Split(
        ConfusionMatrix(num_classes, dataset.ignore_index, dataset.exclude_classes),
        TrimapAccumulator(num_classes, width, dataset.ignore_index, dataset.exclude_classes),
    )


def evaluate(
    segmenter: ScoringModel,
    dataset: Dataset,
    options: EvalOptions | None = None,
    crf: CRFRunner | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalResult:
    """Run ``segmenter`` over ``dataset`` and score it, and its CRF refinement when ``crf`` is given.

    CRF work is submitted to the runner and collected a few images later, so the network keeps running
    while workers refine. On an error or an interrupt, queued CRF work is dropped and the workers stopped.
    """
    options = options or EvalOptions()
    spec = segmenter.spec
    num_classes = spec.num_classes
    if num_classes != dataset.num_classes:
        raise UsageError(
            f"model {spec.name} predicts {num_classes} classes but {dataset.name} has {dataset.num_classes}; "
            f"choose a {dataset.name} model"
        )
    plain = _new_split(num_classes, dataset, options.trimap_width)
    refined = _new_split(num_classes, dataset, options.trimap_width) if crf is not None else None
    timings = dict.fromkeys(("read_s", "infer_s", "upsample_s", "crf_s", "metrics_s", "save_s"), 0.0)
    pending: deque[tuple[Loaded, Future[np.ndarray]]] = deque()
    window = crf.in_flight if crf is not None else 0
    start = time.perf_counter()
    count = 0

    def collect(block: bool) -> None:
        while pending and (block or pending[0][1].done() or len(pending) > window):
            loaded, future = pending.popleft()
            tic = time.perf_counter()
            pred = labels_of(future.result())
            timings["crf_s"] += time.perf_counter() - tic  # time the main thread waits for the CRF
            tic = time.perf_counter()
            assert refined is not None
            refined.update(loaded.label, pred, loaded.band)
            timings["metrics_s"] += time.perf_counter() - tic
            _save(options.save_masks, "crf", loaded.sample.id, pred, spec.palette, timings)

    try:
        for loaded in read_ahead(dataset, options.trimap_width):
            timings["read_s"] += loaded.seconds
            logits, spent = segmenter.scores(loaded.rgb, options.scales, options.flip)
            timings["infer_s"] += spent.get("infer", 0.0)
            timings["upsample_s"] += spent.get("upsample", 0.0)
            tic = time.perf_counter()
            pred = labels_of(logits)
            plain.update(loaded.label, pred, loaded.band)
            timings["metrics_s"] += time.perf_counter() - tic
            _save(options.save_masks, None, loaded.sample.id, pred, spec.palette, timings)
            if crf is not None:
                tic = time.perf_counter()
                probs = softmax(logits, out=logits)
                timings["upsample_s"] += time.perf_counter() - tic
                tic = time.perf_counter()
                pending.append((loaded, crf.submit(loaded.rgb, probs)))
                timings["crf_s"] += time.perf_counter() - tic
                collect(block=False)
            count += 1
            if progress:
                progress(loaded.sample.id)
        collect(block=True)
    except BaseException:
        if crf is not None:
            crf.close(cancel=True)  # an error or Ctrl-C: drop queued CRF work, stop the workers now
        raise
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
        crf=refined,
        protocol=protocol_record(segmenter),
        crf_params=crf.params.to_dict() if crf is not None else None,
        crf_backend=crf.describe() if crf is not None else None,
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
