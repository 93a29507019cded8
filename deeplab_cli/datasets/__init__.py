"""Dataset layouts (VOC 2012, Cityscapes, ADE20K) for evaluation."""

from __future__ import annotations

from pathlib import Path

from deeplab_cli.datasets.base import Dataset, Item, Sample, default_data_root
from deeplab_cli.errors import UsageError

DATASETS = ("voc", "cityscapes", "ade20k")

__all__ = ["DATASETS", "Dataset", "Item", "Sample", "default_data_root", "open_dataset"]


def open_dataset(
    name: str,
    root: Path | str | None,
    split: str,
    ids_file: Path | str | None = None,
    allow_missing: bool = False,
) -> Dataset:
    """Open split ``split`` of dataset ``name`` under ``root`` (default: :func:`default_data_root`).

    Missing images or labels raise a :class:`DeeplabError` naming the id, unless ``allow_missing``: then
    they are skipped and listed in ``Dataset.missing``.
    """
    root = Path(root) if root is not None else default_data_root()
    ids = Path(ids_file) if ids_file is not None else None
    if name == "voc":
        from deeplab_cli.datasets.voc import open_voc

        return open_voc(root, split, ids, allow_missing)
    if name == "cityscapes":
        from deeplab_cli.datasets.cityscapes import open_cityscapes

        return open_cityscapes(root, split, ids, allow_missing)
    if name == "ade20k":
        from deeplab_cli.datasets.ade20k import open_ade20k

        return open_ade20k(root, split, ids, allow_missing)
    raise UsageError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
