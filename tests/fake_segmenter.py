"""A tiny stand-in for ``runtime.Segmenter`` (prepare/run/finish/spec/class_names): no ONNX model.

Its "network" scores three classes by colour: the logits of a pixel are its R, G and B values divided by
16, at the image's own size (stride 1, no padding), so the label of a pixel is its dominant channel. A test
can compute the expected mask from the image alone. Images share a padded size when they share a size,
like the real one, so the scheduler's batching is exercised.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deeplab_cli import files

CLASSES = ("red", "green", "blue")


@dataclass(frozen=True)
class FakeSpec:
    name: str = "fake-rgb"
    class_names: tuple[str, ...] = CLASSES
    palette: str = "voc"
    output_stride: int = 1
    crf: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakePrepared:
    rgb: np.ndarray
    source: np.ndarray
    image_size: tuple[int, int]
    padded_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.image_size


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


@dataclass
class FakePrediction:
    labels: np.ndarray
    logits: np.ndarray
    probs: np.ndarray | None
    image_size: tuple[int, int]
    input_size: tuple[int, int]
    padded_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)
    refined: np.ndarray | None = None

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        return (0, 0, *self.input_size)

    def iter_prob_bands(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        step = rows or 7
        source = self.refined if self.refined is not None else softmax(self.logits)
        for top in range(0, self.image_size[0], step):
            yield top, source[:, top : top + step].astype(np.float32)

    def class_fractions(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        counts = np.bincount(self.labels.reshape(-1), minlength=len(CLASSES))
        rows = [
            {"id": int(i), "name": CLASSES[i], "fraction": round(float(counts[i]) / self.labels.size, 6)}
            for i in np.argsort(-counts, kind="stable")
            if counts[i]
        ]
        return rows


class FakeSegmenter:
    """Colour "segmentation" with the Segmenter interface; counts the images it ran."""

    def __init__(self, delay: float = 0.0) -> None:
        self.spec = FakeSpec()
        self.sessions = 1
        self.delay = delay
        self.ran = 0

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def prepare(self, image: str) -> FakePrepared:
        rgb = files.read_image(image)
        size = (rgb.shape[0], rgb.shape[1])
        return FakePrepared(rgb=rgb, source=rgb, image_size=size, padded_size=size)

    def run(self, prepared: list[FakePrepared]) -> np.ndarray:
        time.sleep(self.delay)
        self.ran += len(prepared)
        return np.stack([item.rgb.transpose(2, 0, 1).astype(np.float32) / 16 for item in prepared])

    def finish(
        self, prepared: FakePrepared, logits: np.ndarray, return_probs: bool = False, crf: Any = None
    ) -> FakePrediction:
        refined = None
        if crf is not None:
            refined = np.asarray(crf.refine(prepared.source, softmax(logits)), dtype=np.float32)
        scores = refined if refined is not None else logits
        return FakePrediction(
            labels=scores.argmax(axis=0).astype(np.uint8),
            logits=logits,
            probs=softmax(logits) if return_probs else None,
            image_size=prepared.image_size,
            input_size=prepared.image_size,
            padded_size=prepared.padded_size,
            timings=dict(prepared.timings, upsample=0.0),
            refined=refined,
        )


def expected_labels(path: str) -> np.ndarray:
    """The fake's mask for an image: the dominant colour channel of each pixel (first on ties)."""
    return files.read_image(path).argmax(axis=2).astype(np.uint8)
