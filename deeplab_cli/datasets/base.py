"""What every dataset layout shares: samples, label decoding, id lists and the missing-file policy."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from deeplab_cli.errors import DeeplabError
from deeplab_cli.metrics import IGNORE_INDEX


@dataclass(frozen=True)
class Sample:
    """One image of a split and the file holding its ground truth."""

    id: str
    image_path: Path
    label_path: Path


@dataclass(frozen=True)
class Item:
    """A sample with its decoded ground truth (H x W uint8 class indices, 255 = ignored)."""

    id: str
    image_path: Path
    label: np.ndarray


def read_index_png(path: Path) -> np.ndarray:
    """A label PNG as its raw values: palette ("P") indices or grey ("L") levels, never colours."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise DeeplabError(
                    f"{path}: label image has mode {image.mode}; "
                    "expected a palette or greyscale PNG of class indices"
                )
            return np.asarray(image)
    except OSError as exc:
        raise DeeplabError(f"cannot read label file {path}: {exc}") from exc


def read_ids(path: Path) -> list[str]:
    """Ids from a list file: one per line (first column), blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DeeplabError(f"cannot read id list {path}: {exc.strerror or exc}") from exc
    ids = [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise DeeplabError(f"id list {path} is empty")
    return ids


def default_data_root() -> Path:
    """Where datasets live unless ``--data-root`` is given (see :func:`deeplab_cli.paths.data_root`)."""
    from deeplab_cli import paths

    return paths.data_root()


@dataclass
class Dataset:
    """A split of a segmentation dataset: its samples, class count and label decoding.

    Iterating yields :class:`Item` (id, image path, label array). ``missing`` lists the ids skipped for a
    missing image or label (only with ``allow_missing``; otherwise the constructor raised).
    """

    name: str
    split: str
    root: Path
    samples: list[Sample]
    num_classes: int
    missing: list[str] = field(default_factory=list)
    exclude_classes: tuple[int, ...] = ()
    ignore_index: int = IGNORE_INDEX
    decode: Callable[[np.ndarray], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def load_label(self, sample: Sample) -> np.ndarray:
        raw = read_index_png(sample.label_path)
        label = self.decode(raw) if self.decode else raw
        if label.dtype != np.uint8 and label.size and (label.min() < 0 or label.max() > 255):
            raise DeeplabError(f"{sample.label_path}: label values outside 0..255")
        return np.ascontiguousarray(label, dtype=np.uint8)

    def __iter__(self) -> Iterator[Item]:
        for sample in self.samples:
            yield Item(sample.id, sample.image_path, self.load_label(sample))

    def limit(self, n: int | None) -> Dataset:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None:
            return self
        return Dataset(**{**self.__dict__, "samples": self.samples[:n]})


def check_samples(
    candidates: Sequence[Sample], allow_missing: bool, what: str
) -> tuple[list[Sample], list[str]]:
    """Keep samples whose image and label exist; raise on the first missing one unless allowed."""
    present: list[Sample] = []
    missing: list[str] = []
    for sample in candidates:
        for kind, path in (("image", sample.image_path), ("ground truth", sample.label_path)):
            if not path.is_file():
                if not allow_missing:
                    raise DeeplabError(
                        f"{what}: {kind} for id {sample.id!r} not found: {path} "
                        "(use --allow-missing to skip it)"
                    )
                missing.append(sample.id)
                break
        else:
            present.append(sample)
    return present, missing
