"""Cityscapes fine annotations, scored on the 19 training classes (trainIds, 255 = ignored).

Layout: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
``gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png``. When only the official ``*_gtFine_labelIds.png``
exist (the trainId files are made by cityscapesScripts' ``createTrainIdLabelImgs``), label ids are mapped
to train ids with the official table (``LABEL_TO_TRAIN``). Ids are the stems (``frankfurt_000000_000294``);
an ids file may list stems or ``city/stem``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deeplab_cli.datasets.base import Dataset, Sample, check_samples, read_ids
from deeplab_cli.errors import DeeplabError, UsageError

NUM_CLASSES = 19

# labelId -> trainId (cityscapesScripts helpers/labels.py); every other id is ignored (255)
LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def label_ids_to_train_ids(label: np.ndarray) -> np.ndarray:
    """Map a labelIds image to trainIds (255 for every class that Cityscapes does not score)."""
    table = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN.items():
        table[label_id] = train_id
    return table[label.astype(np.uint8)]


def find_cityscapes(root: Path) -> Path:
    root = Path(root).expanduser()
    for candidate in (root, root / "cityscapes", root / "Cityscapes"):
        if (candidate / "leftImg8bit").is_dir():
            return candidate
    raise DeeplabError(f"no Cityscapes data under {root} (expected leftImg8bit/ and gtFine/)")


def _sample(base: Path, split: str, city: str, stem: str, gt_suffix: str) -> Sample:
    return Sample(
        stem,
        base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
        base / "gtFine" / split / city / f"{stem}{gt_suffix}",
    )


def open_cityscapes(
    root: Path, split: str, ids_file: Path | None = None, allow_missing: bool = False
) -> Dataset:
    base = find_cityscapes(root)
    image_dir = base / "leftImg8bit" / split
    if ids_file is not None:
        stems = [
            (i.split("/")[0] if "/" in i else i.split("_")[0], i.split("/")[-1]) for i in read_ids(ids_file)
        ]
    else:
        if not image_dir.is_dir():
            raise UsageError(f"Cityscapes split {split!r} not found: {image_dir}")
        stems = [
            (p.parent.name, p.name[: -len("_leftImg8bit.png")])
            for p in sorted(image_dir.glob("*/*_leftImg8bit.png"))
        ]
    train_ids = any((base / "gtFine" / split).glob("*/*_gtFine_labelTrainIds.png"))
    suffix = "_gtFine_labelTrainIds.png" if train_ids else "_gtFine_labelIds.png"
    candidates = [_sample(base, split, city, stem, suffix) for city, stem in stems]
    samples, missing = check_samples(candidates, allow_missing, f"Cityscapes {split}")
    if not samples:
        raise DeeplabError(f"Cityscapes {split}: no images with ground truth under {base}")
    decode = None if train_ids else label_ids_to_train_ids
    return Dataset("cityscapes", split, base, samples, NUM_CLASSES, missing, decode=decode)
