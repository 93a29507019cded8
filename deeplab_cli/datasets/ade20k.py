"""ADE20K scene parsing (SceneParsing / ADEChallengeData2016 release).

Layout: ``ADEChallengeData2016/images/{training,validation}/<id>.jpg`` and
``annotations/{training,validation}/<id>.png`` with values 0..150, where 0 means "other objects" and is
not scored by the challenge. Splits ``train``/``val`` are accepted for ``training``/``validation``.

Convention: our ADE20K model predicts 151 classes, class 0 "others" included. Ground-truth 0 is turned
into the ignore label (255), classes 1..150 keep their index; a prediction of 0 on a labelled pixel counts
as an error for the true class, and class 0 itself is excluded from every mean (``exclude_classes``), so
the mIoU is the challenge's 150-class mean.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deeplab_cli.datasets.base import Dataset, Sample, check_samples, read_ids
from deeplab_cli.errors import DeeplabError, UsageError

NUM_CLASSES = 151
SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


def decode_ade(label: np.ndarray) -> np.ndarray:
    out = label.astype(np.uint8, copy=True)
    out[label == 0] = 255
    return out


def find_ade20k(root: Path) -> Path:
    root = Path(root).expanduser()
    for candidate in (root, root / "ADEChallengeData2016", root / "ade20k" / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise DeeplabError(f"no ADE20K data under {root} (expected ADEChallengeData2016/images and annotations)")


def open_ade20k(root: Path, split: str, ids_file: Path | None = None, allow_missing: bool = False) -> Dataset:
    base = find_ade20k(root)
    if split not in SPLITS:
        raise UsageError(f"ADE20K split {split!r} unknown (use one of: train, val)")
    folder = SPLITS[split]
    if ids_file is not None:
        ids = read_ids(ids_file)
    else:
        ids = [p.stem for p in sorted((base / "images" / folder).glob("*.jpg"))]
    candidates = [
        Sample(i, base / "images" / folder / f"{i}.jpg", base / "annotations" / folder / f"{i}.png")
        for i in ids
    ]
    samples, missing = check_samples(candidates, allow_missing, f"ADE20K {split}")
    if not samples:
        raise DeeplabError(f"ADE20K {split}: no images with annotations under {base}")
    return Dataset(
        "ade20k", split, base, samples, NUM_CLASSES, missing, exclude_classes=(0,), decode=decode_ade
    )
