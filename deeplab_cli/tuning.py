"""Dense-CRF parameter search (``deeplab crf tune``) and CRF parameter files.

The DeepLab papers chose the appearance kernel (w1 = ``bi_w``, sigma_alpha = ``bi_xy_std``, sigma_beta =
``bi_rgb_std``) by a coarse-to-fine grid search on 100 validation images, with the smoothness kernel fixed
(w2 = ``pos_w`` = 3, sigma_gamma = ``pos_xy_std`` = 3). We do the same, plus a unary scale (a softmax
temperature on the network's log-probabilities):

1. the network runs once per image; its log-probabilities (float16), the image and the ground truth are
   cached on disk (``<cache>/crf/cache/<key>/<id>.npz``) and reused by later runs with the same inputs;
2. stage "coarse" scores every combination of :data:`COARSE_GRID`;
3. stage "fine" scores a grid one step either side of the best coarse point (:data:`FINE_STEPS`);
4. stage "unary" scores :data:`UNARY_SCALES` at the best point.

Candidates run in parallel worker processes, one task per image scoring every candidate of a stage, so an
image is read once per stage. The score is the mIoU over the images (one confusion matrix per candidate).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deeplab_cli.errors import UsageError

FIXED = {"pos_w": 3.0, "pos_xy_std": 3.0}
COARSE_GRID: dict[str, tuple[float, ...]] = {
    "bi_w": (3.0, 5.0),
    "bi_xy_std": (30.0, 60.0, 90.0, 120.0),
    "bi_rgb_std": (3.0, 5.0),
}
FINE_STEPS: dict[str, float] = {"bi_w": 1.0, "bi_xy_std": 15.0, "bi_rgb_std": 1.0}
UNARY_SCALES: tuple[float, ...] = (0.6, 0.8, 1.0, 1.25)
PARAM_NAMES = ("iterations", "pos_w", "pos_xy_std", "bi_w", "bi_xy_std", "bi_rgb_std", "unary_scale")


# -- parameter files --------------------------------------------------------------------------------------


def _crf_params_class() -> Any:
    from deeplab_cli.crf.params import CRFParams

    return CRFParams


def make_params(values: Mapping[str, Any]) -> Any:
    """A ``CRFParams`` from a mapping (unknown keys ignored, missing ones take the class defaults)."""
    cls = _crf_params_class()
    known = {f.name for f in dataclasses.fields(cls)}
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known or value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UsageError(f"CRF parameter {key} must be a number, got {value!r}")
        clean[key] = int(value) if key == "iterations" and float(value).is_integer() else value
    try:
        return cls(**clean)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def params_to_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def load_crf_params(path: Path | str) -> Any:
    """Read CRF parameters from a JSON file: a ``deeplab crf tune`` result (its ``crf`` object) or a
    flat object with the parameter names (``bi_w``, ``bi_xy_std``, ...)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read CRF parameters {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("crf"), dict):
        data = data["crf"]
    if not isinstance(data, dict) or not any(name in data for name in PARAM_NAMES):
        raise UsageError(
            f"{path}: no CRF parameters found (expected keys such as bi_w, bi_xy_std, bi_rgb_std)"
        )
    return make_params(data)


def resolve_crf_params(
    spec: Any, path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Any:
    """CRF parameters for a model: its registry defaults, then a parameter file, then explicit values."""
    values: dict[str, Any] = dict(spec.crf or {}) if spec is not None else {}
    if path is not None:
        values.update(params_to_dict(load_crf_params(path)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return make_params(values)


def default_output(model: str) -> Path:
    from deeplab_cli import paths

    return paths.crf_dir() / f"{model}.json"


# -- the probability cache --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedImage:
    id: str
    path: Path  # npz: log_probs (C x H x W float16), image (H x W x 3 uint8), label and pred (H x W)


def cache_key(
    model: str, dataset: str, split: str, ids: Sequence[str], scales: Sequence[float], flip: bool
) -> str:
    text = json.dumps([model, dataset, split, list(ids), list(scales), flip])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_probabilities(
    segmenter: Any,
    dataset: Any,
    cache_dir: Path,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[CachedImage], np.ndarray]:
    """Run the network once per image of ``dataset`` and cache its log-probabilities (or reuse them).

    Returns the cached images and the no-CRF confusion matrix (from the argmax of the float32 scores,
    cached as ``pred``).
    """
    from deeplab_cli.evaluate import labels_of, network_scores, read_ahead
    from deeplab_cli.files import write_npz
    from deeplab_cli.metrics import ConfusionMatrix

    cache_dir.mkdir(parents=True, exist_ok=True)
    baseline = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, dataset.exclude_classes)
    items: list[CachedImage] = []
    for loaded in read_ahead(dataset, width=1):
        path = cache_dir / f"{loaded.sample.id}.npz"
        if path.is_file():
            with np.load(path) as cached:
                pred = cached["pred"]
        else:
            logits = network_scores(segmenter, loaded.rgb, scales, flip).logits
            pred = labels_of(logits)
            log_probs = logits - logits.max(axis=0, keepdims=True)
            log_probs -= np.log(np.exp(log_probs).sum(axis=0, keepdims=True))
            log_probs = np.maximum(log_probs, -60000.0).astype(np.float16)
            arrays = {"log_probs": log_probs, "image": loaded.rgb, "label": loaded.label, "pred": pred}
            write_npz(path, arrays, compressed=False)
        baseline.update(loaded.label, pred)
        items.append(CachedImage(loaded.sample.id, path))
        if progress:
            progress(loaded.sample.id)
    return items, baseline.matrix


# -- candidates -------------------------------------------------------------------------------------------


def grid(axes: Mapping[str, Iterable[float]], base: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every combination of ``axes`` on top of ``base``."""
    names = list(axes)
    return [{**base, **dict(zip(names, combo, strict=True))} for combo in itertools.product(*axes.values())]


def fine_grid(best: Mapping[str, Any], steps: Mapping[str, float]) -> list[dict[str, Any]]:
    """One step either side of ``best`` along each axis (values kept positive)."""
    axes = {
        name: sorted({v for v in (best[name] - s, best[name], best[name] + s) if v > 0})
        for name, s in steps.items()
    }
    return grid(axes, best)


def _key(values: Mapping[str, Any]) -> tuple:
    return tuple(round(float(values[name]), 6) for name in PARAM_NAMES if name in values)


def _score_image(task: tuple[str, list[dict[str, Any]], int, int, tuple[int, ...], str]) -> list[np.ndarray]:
    """Worker: run every candidate's CRF on one cached image; one confusion matrix per candidate."""
    from deeplab_cli.crf import refine
    from deeplab_cli.evaluate import labels_of
    from deeplab_cli.metrics import ConfusionMatrix

    path, candidates, num_classes, ignore, exclude, backend = task
    with np.load(path) as cached:
        log_probs = cached["log_probs"].astype(np.float32)
        image = cached["image"]
        label = cached["label"]
    probs = np.exp(log_probs)
    probs /= probs.sum(axis=0, keepdims=True)
    matrices = []
    for values in candidates:
        refined = refine(image, probs, make_params(values), backend=backend, device="cpu")
        matrix = ConfusionMatrix(num_classes, ignore, exclude)
        matrix.update(label, labels_of(refined))
        matrices.append(matrix.matrix)
    return matrices


def _init_worker() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


@dataclass
class Candidate:
    params: dict[str, Any]
    stage: str
    miou: float


@dataclass
class TuneResult:
    model: str
    dataset: str
    split: str
    images: int
    baseline_miou: float
    best: Candidate
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def crf_helps(self) -> bool:
        return self.best.miou > self.baseline_miou

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "split": self.split,
            "images": self.images,
            "crf": self.best.params,
            "miou_crf": self.best.miou,
            "miou_no_crf": self.baseline_miou,
            "crf_helps": self.crf_helps,
            "candidates": [dataclasses.asdict(c) for c in self.candidates],
        }


class _Scorer:
    """Scores candidate lists over the cached images, in worker processes (or inline with 1 worker)."""

    def __init__(self, items: list[CachedImage], dataset: Any, backend: str, workers: int):
        self.items, self.backend, self.workers = items, backend, workers
        self.meta = (dataset.num_classes, dataset.ignore_index, tuple(dataset.exclude_classes))
        self.exclude = dataset.exclude_classes
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            import multiprocessing

            context = multiprocessing.get_context("spawn")  # no fork after torch/ORT threads started
            self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)

    def score(
        self, candidates: list[dict[str, Any]], on_image: Callable[[], None] | None = None
    ) -> list[float]:
        from deeplab_cli.metrics import ConfusionMatrix

        n = self.meta[0]
        totals = [np.zeros((n, n), dtype=np.int64) for _ in candidates]
        tasks = [(str(item.path), candidates, *self.meta, self.backend) for item in self.items]
        results = self.pool.map(_score_image, tasks) if self.pool else map(_score_image, tasks)
        for matrices in results:
            for total, matrix in zip(totals, matrices, strict=True):
                total += matrix
            if on_image:
                on_image()
        scores = []
        for total in totals:
            matrix = ConfusionMatrix(n, self.meta[1], self.exclude)
            matrix.matrix = total
            scores.append(matrix.miou())
        return scores

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def tune(
    segmenter: Any,
    dataset: Any,
    *,
    iterations: int = 10,
    coarse: Mapping[str, Sequence[float]] | None = None,
    fine_steps: Mapping[str, float] | None = None,
    unary_scales: Sequence[float] = UNARY_SCALES,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    backend: str = "auto",
    workers: int | None = None,
    cache_root: Path | None = None,
    log: Callable[[str], None] | None = None,
    on_image: Callable[[], None] | None = None,
) -> TuneResult:
    """Coarse-to-fine search of the CRF's appearance kernel and unary scale on ``dataset`` (module doc)."""
    from deeplab_cli.metrics import ConfusionMatrix

    log = log or (lambda _message: None)
    spec = segmenter.spec
    if spec.num_classes != dataset.num_classes:
        raise UsageError(
            f"model {spec.name} predicts {spec.num_classes} classes, {dataset.name} has {dataset.num_classes}"
        )
    ids = [s.id for s in dataset.samples]
    if cache_root is None:
        from deeplab_cli import paths

        cache_root = paths.crf_dir() / "cache"
    key = cache_key(spec.name, dataset.name, dataset.split, ids, scales, flip)
    items, baseline_matrix = cache_probabilities(segmenter, dataset, cache_root / key, scales, flip)
    baseline = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, dataset.exclude_classes)
    baseline.matrix = baseline_matrix
    log(f"cached network probabilities of {len(items)} images in {cache_root / key}")
    base = {**FIXED, "iterations": iterations, "unary_scale": 1.0}
    scorer = _Scorer(items, dataset, backend, workers if workers is not None else (os.cpu_count() or 1))
    seen: dict[tuple, Candidate] = {}

    def run_stage(stage: str, candidates: list[dict[str, Any]]) -> Candidate:
        fresh = [c for c in candidates if _key(c) not in seen]
        if fresh:
            log(f"{stage}: {len(fresh)} candidates x {len(items)} images")
            for values, miou in zip(fresh, scorer.score(fresh, on_image), strict=True):
                seen[_key(values)] = Candidate(dict(values), stage, miou)
        return max(seen.values(), key=lambda c: -1.0 if np.isnan(c.miou) else c.miou)  # first of ties

    try:
        best = run_stage("coarse", grid(coarse or COARSE_GRID, base))
        steps = fine_steps if fine_steps is not None else FINE_STEPS
        if steps:
            best = run_stage("fine", fine_grid(best.params, steps))
        if unary_scales:
            best = run_stage("unary", grid({"unary_scale": unary_scales}, best.params))
    finally:
        scorer.close()
    return TuneResult(
        model=spec.name,
        dataset=dataset.name,
        split=dataset.split,
        images=len(items),
        baseline_miou=baseline.miou(),
        best=best,
        candidates=list(seen.values()),
    )


def parse_grid(text: str) -> dict[str, tuple[float, ...]]:
    """``"bi_w=3,5;bi_xy_std=50,80;bi_rgb_std=3"`` -> axes of a coarse grid."""
    axes: dict[str, tuple[float, ...]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, _, values = part.partition("=")
        name = name.strip().replace("-", "_")
        if name not in PARAM_NAMES or not values:
            raise UsageError(
                f"bad grid axis {part!r}; expected NAME=V1,V2 with NAME in {', '.join(PARAM_NAMES)}"
            )
        try:
            axes[name] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise UsageError(f"bad grid values in {part!r}") from None
    if not axes:
        raise UsageError("empty grid")
    return axes


def save_result(path: Path, result: TuneResult) -> Path:
    from deeplab_cli.files import write_json

    return write_json(path, result.to_dict())


__all__ = [
    "COARSE_GRID",
    "FINE_STEPS",
    "UNARY_SCALES",
    "TuneResult",
    "load_crf_params",
    "resolve_crf_params",
    "save_result",
    "tune",
]
