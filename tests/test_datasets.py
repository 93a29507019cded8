"""Dataset layouts: the real VOC sample in ../shared, missing ids, and small Cityscapes/ADE20K trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import VOC2012, VOC_ROOT, voc_sample_ids
from PIL import Image

from deeplab_cli.datasets import open_dataset
from deeplab_cli.datasets.cityscapes import label_ids_to_train_ids
from deeplab_cli.errors import DeeplabError, UsageError


def test_voc_sample_split_reads_real_masks():
    dataset = open_dataset("voc", VOC_ROOT, "sample")
    assert len(dataset) == len(voc_sample_ids()) == 330
    assert dataset.num_classes == 21 and dataset.missing == []
    items = iter(dataset.limit(3))
    for item, expected_id in zip(items, voc_sample_ids(3), strict=True):
        assert item.id == expected_id
        assert item.label.dtype == np.uint8
        with Image.open(item.image_path) as image:
            assert item.label.shape == (image.height, image.width)
        values = set(np.unique(item.label).tolist())
        assert values <= set(range(21)) | {255}
        assert 255 in values and len(values - {0, 255}) >= 1  # void borders and at least one object


@pytest.mark.parametrize("layout", ["voc2012", "devkit", "parent"])
def test_voc_root_layouts(tmp_path: Path, layout: str):
    if layout == "voc2012":
        root = VOC2012
    elif layout == "devkit":
        root = VOC_ROOT  # holds VOC2012/
    else:
        (tmp_path / "VOCdevkit").mkdir()
        (tmp_path / "VOCdevkit" / "VOC2012").symlink_to(VOC2012)
        root = tmp_path
    dataset = open_dataset("voc", root, "sample")
    assert dataset.root.resolve() == VOC2012.resolve()


def test_voc_data_root_from_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DEEPLAB_DATA", str(VOC_ROOT))
    assert len(open_dataset("voc", None, "sample")) == 330


def test_voc_missing_id_is_an_error_or_counted(tmp_path: Path):
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join([*voc_sample_ids(2), "2099_999999", ""]) + "\n")
    with pytest.raises(DeeplabError, match="2099_999999"):
        open_dataset("voc", VOC_ROOT, "sample", ids_file=ids)
    dataset = open_dataset("voc", VOC_ROOT, "sample", ids_file=ids, allow_missing=True)
    assert [s.id for s in dataset.samples] == voc_sample_ids(2)
    assert dataset.missing == ["2099_999999"]


def test_voc_ids_in_official_list_without_files_are_missing():
    # train.txt lists 1464 ids; only the 330 of the sample have files here
    dataset = open_dataset("voc", VOC_ROOT, "train", allow_missing=True)
    assert len(dataset) == 330 and len(dataset.missing) == 1464 - 330
    with pytest.raises(DeeplabError, match="--allow-missing"):
        open_dataset("voc", VOC_ROOT, "train")


def test_voc_unknown_split_and_dataset(tmp_path: Path):
    with pytest.raises(UsageError, match="available: .*sample"):  # exit 2: the command line is wrong
        open_dataset("voc", VOC_ROOT, "nosuchsplit")
    with pytest.raises(DeeplabError, match="no PASCAL VOC 2012 data"):
        open_dataset("voc", tmp_path, "val")
    with pytest.raises(UsageError, match="unknown dataset"):
        open_dataset("coco", tmp_path, "val")


def _write_png(path: Path, array: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode if array.ndim == 2 else "RGB").save(path)


def test_cityscapes_label_ids_are_mapped_to_train_ids(tmp_path: Path):
    root = tmp_path / "cityscapes"
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    label_ids = np.array([[7, 8, 11, 0, 1, 33], [26, 24, 23, 21, 4, 6]] * 2, dtype=np.uint8)
    _write_png(root / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png", rgb)
    _write_png(root / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png", label_ids)
    dataset = open_dataset("cityscapes", tmp_path, "val")
    item = next(iter(dataset))
    assert item.id == "aachen_000000_000019"
    expected = [[0, 1, 2, 255, 255, 18], [13, 11, 10, 8, 255, 255]] * 2
    assert item.label.tolist() == expected
    assert label_ids_to_train_ids(np.array([7, 29, 30, 34], dtype=np.uint8)).tolist() == [0, 255, 255, 255]


def test_cityscapes_train_ids_used_when_present(tmp_path: Path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    train_ids = np.array([[0, 18], [255, 5]], dtype=np.uint8)
    for city in ("bonn", "ulm"):
        _write_png(tmp_path / f"leftImg8bit/val/{city}/{city}_000000_000001_leftImg8bit.png", rgb)
        _write_png(tmp_path / f"gtFine/val/{city}/{city}_000000_000001_gtFine_labelTrainIds.png", train_ids)
    (tmp_path / "gtFine/val/ulm/ulm_000000_000001_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(DeeplabError, match="ulm_000000_000001"):
        open_dataset("cityscapes", tmp_path, "val")
    dataset = open_dataset("cityscapes", tmp_path, "val", allow_missing=True)
    assert [item.label.tolist() for item in dataset] == [train_ids.tolist()]
    assert dataset.missing == ["ulm_000000_000001"]


def test_ade20k_class_zero_becomes_ignored(tmp_path: Path):
    base = tmp_path / "ADEChallengeData2016"
    _write_png(base / "annotations/validation/ADE_val_00000001.png", np.array([[0, 1], [150, 7]], np.uint8))
    (base / "images/validation").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(base / "images/validation/ADE_val_00000001.jpg")
    dataset = open_dataset("ade20k", tmp_path, "val")
    assert dataset.num_classes == 151 and dataset.exclude_classes == (0,)
    assert next(iter(dataset)).label.tolist() == [[255, 1], [150, 7]]
