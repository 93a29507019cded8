"""PASCAL VOC 2012 segmentation layout.

``root`` may be the ``VOC2012`` folder itself (holding ``JPEGImages/``, ``SegmentationClass/`` and
``ImageSets/Segmentation/<split>.txt``), the ``VOCdevkit`` folder holding it, or the folder holding
``VOCdevkit`` (where the official tar extracts). Ground truth is a palette PNG whose indices are the classes
0..20, with 255 = void (ignored).
"""

from __future__ import annotations

from pathlib import Path

from deeplab_cli.datasets.base import Dataset, Sample, check_samples, read_ids
from deeplab_cli.errors import DeeplabError, UsageError

NUM_CLASSES = 21


def find_voc2012(root: Path) -> Path:
    """The ``VOC2012`` folder under ``root`` (see the module docstring for the accepted layouts)."""
    root = Path(root).expanduser()
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012", root / "voc" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() or (candidate / "ImageSets").is_dir():
            return candidate
    raise DeeplabError(
        f"no PASCAL VOC 2012 data under {root} "
        "(expected VOC2012/JPEGImages or VOCdevkit/VOC2012/JPEGImages); "
        "run `deeplab data fetch voc` or pass --data-root"
    )


def open_voc(root: Path, split: str, ids_file: Path | None = None, allow_missing: bool = False) -> Dataset:
    """The VOC 2012 ``split`` (ids from ``ImageSets/Segmentation/<split>.txt`` unless ``ids_file``)."""
    base = find_voc2012(root)
    if ids_file is None:
        lists = base / "ImageSets" / "Segmentation"
        ids_file = lists / f"{split}.txt"
        if not ids_file.is_file():
            known = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
            raise UsageError(
                f"VOC split {split!r} not found: {ids_file} (available: {', '.join(known) or 'none'})"
            )
    candidates = [
        Sample(i, base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png")
        for i in read_ids(ids_file)
    ]
    samples, missing = check_samples(candidates, allow_missing, f"VOC {split}")
    if not samples:
        raise DeeplabError(
            f"VOC {split}: none of the {len(candidates)} ids in {ids_file} has its files under {base}"
        )
    return Dataset("voc", split, base, samples, NUM_CLASSES, missing)
