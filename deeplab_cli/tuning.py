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

Candidates run in the CRF runner's worker processes (one task per image and candidate; an image is read
once per stage). The score is the mIoU over the images (one confusion matrix per candidate). The search
grid is validated before the network runs, so a typo costs nothing. Parameter files and their resolution
live in :mod:`deeplab_cli.crf.params`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deeplab_cli.crf.params import PARAM_NAMES, CRFParams
from deeplab_cli.errors import UsageError

if TYPE_CHECKING:
    from deeplab_cli.crf.runner import CRFRunner
    from deeplab_cli.datasets import Dataset
    from deeplab_cli.evaluate import ScoringModel

FIXED = {"pos_w": 3.0, "pos_xy_std": 3.0}
COARSE_GRID: dict[str, tuple[float, ...]] = {
    "bi_w": (3.0, 5.0),
    "bi_xy_std": (30.0, 60.0, 90.0, 120.0),
    "bi_rgb_std": (3.0, 5.0),
}
FINE_STEPS: dict[str, float] = {"bi_w": 1.0, "bi_xy_std": 15.0, "bi_rgb_std": 1.0}
UNARY_SCALES: tuple[float, ...] = (0.6, 0.8, 1.0, 1.25)


# -- candidates and their validation -------------------------------------------------------------------


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
    segmenter: ScoringModel,
    dataset: Dataset,
    cache_dir: Path,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[CachedImage], np.ndarray]:
    """Run the network once per image of ``dataset`` and cache its log-probabilities (or reuse them).

    Returns the cached images and the no-CRF confusion matrix (from the argmax of the float32 scores,
    cached as ``pred``).
    """
    from deeplab_cli.evaluate import read_ahead
    from deeplab_cli.files import write_npz
    from deeplab_cli.geometry import labels_of
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
            logits, _ = segmenter.scores(loaded.rgb, scales, flip)
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
    """Scores candidate lists over the cached images with the CRF runner (its workers, or inline)."""

    def __init__(self, items: list[CachedImage], dataset: Dataset, runner: CRFRunner):
        self.items, self.runner = items, runner
        self.num_classes, self.ignore = dataset.num_classes, dataset.ignore_index
        self.exclude = tuple(dataset.exclude_classes)

    def _matrix(self) -> Any:
        from deeplab_cli.metrics import ConfusionMatrix

        return ConfusionMatrix(self.num_classes, self.ignore, self.exclude)

    def score(
        self, candidates: list[dict[str, Any]], on_image: Callable[[], None] | None = None
    ) -> list[float]:
        """The mIoU of each candidate over every cached image."""
        from deeplab_cli.geometry import labels_of

        params = [CRFParams.from_dict(values) for values in candidates]
        totals = [self._matrix() for _ in candidates]
        pending: deque[tuple[int, np.ndarray, Future[np.ndarray]]] = deque()
        window = self.runner.in_flight

        def collect(keep: int) -> None:
            while len(pending) > keep:
                index, label, future = pending.popleft()
                totals[index].update(label, labels_of(future.result()))

        for item in self.items:
            image, probs, label = _read_cached(item.path)
            for index, candidate in enumerate(params):
                pending.append((index, label, self.runner.submit(image, probs, candidate)))
                collect(window)
            if on_image:
                on_image()
        collect(0)
        return [total.miou() for total in totals]


def _read_cached(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image, its probabilities (float32, renormalised) and its ground truth from the cache."""
    with np.load(path) as cached:
        log_probs = cached["log_probs"].astype(np.float32)
        image = cached["image"]
        label = cached["label"]
    probs = np.exp(log_probs, out=log_probs)
    probs /= probs.sum(axis=0, keepdims=True)
    return image, probs, label


def check_search(
    coarse: Mapping[str, Sequence[float]],
    fine_steps: Mapping[str, float],
    unary_scales: Sequence[float],
    iterations: int,
) -> None:
    """Reject a search that would fail (or search nothing) before hours of work: every coarse point and
    unary scale must be valid CRF parameters and every fine step positive."""
    base = {**FIXED, "iterations": iterations, "unary_scale": 1.0}
    for name, values in coarse.items():
        if not values:
            raise UsageError(f"grid axis {name} has no values")
    for name, step in fine_steps.items():
        if name not in PARAM_NAMES or name == "iterations" or not step > 0:
            raise UsageError(f"bad fine step {name}={step} (a positive step of a real-valued parameter)")
    for values in grid(coarse, base):
        CRFParams.from_dict(values)
    for scale in unary_scales:
        CRFParams.from_dict({**base, "unary_scale": scale})


def tune(
    segmenter: ScoringModel,
    dataset: Dataset,
    *,
    iterations: int = 10,
    coarse: Mapping[str, Sequence[float]] | None = None,
    fine_steps: Mapping[str, float] | None = None,
    unary_scales: Sequence[float] = UNARY_SCALES,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crf: CRFRunner | None = None,
    backend: str = "auto",
    workers: int | None = None,
    cache_root: Path | None = None,
    log: Callable[[str], None] | None = None,
    on_image: Callable[[], None] | None = None,
) -> TuneResult:
    """Coarse-to-fine search of the CRF's appearance kernel and unary scale on ``dataset`` (module doc).

    ``crf``: the runner that scores candidates (its parameters are replaced per candidate); without one,
    a runner is made from ``backend`` and ``workers`` (None: the machine's CPU split) and closed at the end.
    The search is validated before the network runs.
    """

    log = log or (lambda _message: None)
    coarse = coarse or COARSE_GRID
    steps = fine_steps if fine_steps is not None else FINE_STEPS
    check_search(coarse, steps, unary_scales, iterations)
    spec = segmenter.spec
    if spec.num_classes != dataset.num_classes:
        raise UsageError(
            f"model {spec.name} predicts {spec.num_classes} classes, {dataset.name} has {dataset.num_classes}"
        )
    own_runner = crf is None
    if crf is None:
        from deeplab_cli.crf.runner import CRFRunner

        crf = CRFRunner(CRFParams(), backend=backend, device="cpu", workers=workers)
    try:
        return _search(
            segmenter,
            dataset,
            crf,
            iterations,
            coarse,
            steps,
            unary_scales,
            scales,
            flip,
            cache_root,
            log,
            on_image,
        )
    except BaseException:
        crf.close(cancel=True)  # an error or Ctrl-C: stop the workers now
        raise
    finally:
        if own_runner:
            crf.close()


def _search(
    segmenter: ScoringModel,
    dataset: Dataset,
    crf: CRFRunner,
    iterations: int,
    coarse: Mapping[str, Sequence[float]],
    steps: Mapping[str, float],
    unary_scales: Sequence[float],
    scales: Sequence[float],
    flip: bool,
    cache_root: Path | None,
    log: Callable[[str], None],
    on_image: Callable[[], None] | None,
) -> TuneResult:
    from deeplab_cli.metrics import ConfusionMatrix

    spec = segmenter.spec
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
    scorer = _Scorer(items, dataset, crf)
    seen: dict[tuple, Candidate] = {}

    def run_stage(stage: str, candidates: list[dict[str, Any]]) -> Candidate:
        fresh = [c for c in candidates if _key(c) not in seen]
        if fresh:
            log(f"{stage}: {len(fresh)} candidates x {len(items)} images")
            for values, miou in zip(fresh, scorer.score(fresh, on_image), strict=True):
                seen[_key(values)] = Candidate(dict(values), stage, miou)
        return max(seen.values(), key=lambda c: -1.0 if np.isnan(c.miou) else c.miou)  # first of ties

    best = run_stage("coarse", grid(coarse, base))
    if steps:
        best = run_stage("fine", fine_grid(best.params, steps))
    if unary_scales:
        best = run_stage("unary", grid({"unary_scale": unary_scales}, best.params))
    return TuneResult(
        model=spec.name,
        dataset=dataset.name,
        split=dataset.split,
        images=len(items),
        baseline_miou=baseline.miou(),
        best=best,
        candidates=list(seen.values()),
    )


def parse_numbers(text: str) -> tuple[float, ...]:
    """``"0.5, 0.75,1"`` -> ``(0.5, 0.75, 1.0)``: the one comma-list parser (grids, scales, unary scales).

    Raises ValueError on a value that is not a number; empty items are ignored.
    """
    return tuple(float(value) for value in text.split(",") if value.strip())


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
            axes[name] = parse_numbers(values)
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
    "check_search",
    "parse_grid",
    "save_result",
    "tune",
]
