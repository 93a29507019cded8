"""The DeepLab v2 ResNet-101 release in the weight cache: its zip, its bare weight files, offline.

The release is ``prototxt_and_model.zip`` holding ``train_iter_20000.caffemodel`` (train_aug) and
``train2_iter_20000.caffemodel`` (trainval). Users often have only the bare files: the cache and the
mirrors must accept them as well as the zip. Files here are synthetic (tests/caffe_synth.py).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from caffe_synth import release_file
from test_weights import run_cli

from deeplab_cli import weights
from deeplab_cli.errors import WeightsError
from deeplab_cli.export import read_spec
from deeplab_cli.zoo import get_model

V2 = "deeplab-v2-resnet101"
V2_TRAINVAL = "deeplab-v2-resnet101-trainval"


@pytest.mark.slow  # two conversions of a full-size ResNet-101: ~45 s on 2 idle cores
def test_bare_release_member_imports_and_exports_fp16_offline(tmp_path: Path) -> None:
    """Issue 9.2: after importing the bare file, `export --fp16` asked for the zip."""
    bare, _ = release_file(tmp_path / "train_iter_20000.caffemodel", V2, seed=5, msc_copies=True)
    home = tmp_path / "home"
    imported = run_cli("weights", "import", str(bare), "-q", home=home)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == f"{V2}: {home / 'models' / f'{V2}.onnx'}"
    assert [p.name for p in (home / "sources").iterdir()] == [f"{V2}--train_iter_20000.caffemodel"]
    bare.unlink()  # the export must use the cache's copy, with no mirror and no network
    out = tmp_path / "v2-fp16.onnx"
    exported = run_cli("export", V2, "--fp16", "-o", str(out), home=home)
    assert exported.returncode == 0, exported.stderr
    assert f"converting {V2} to float16 ONNX" in exported.stderr
    assert read_spec(out) == get_model(V2)
    assert out.stat().st_size < 0.6 * (home / "models" / f"{V2}.onnx").stat().st_size


def test_mirror_lookup_accepts_the_bare_member_or_the_zip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding a file does not read its weights, so any bytes under the right name do here."""
    mirror = tmp_path / "mirror" / "deeplab_v2"
    mirror.mkdir(parents=True)
    monkeypatch.setenv("DEEPLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPLAB_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(WeightsError, match=r"prototxt_and_model.zip \(or train2_iter_20000.caffemodel\)"):
        weights.source_path(get_model(V2_TRAINVAL))
    (mirror / "train2_iter_20000.caffemodel").write_bytes(b"trainval weights")
    found = weights.source_path(get_model(V2_TRAINVAL))
    assert found == tmp_path / "home" / "sources" / f"{V2_TRAINVAL}--train2_iter_20000.caffemodel"
    assert found.read_bytes() == b"trainval weights"
    with zipfile.ZipFile(mirror / "prototxt_and_model.zip", "w") as archive:
        archive.writestr("prototxt_and_model/train_iter_20000.caffemodel", b"train_aug weights")
    source = weights.source_path(get_model(V2))
    assert source.name == "prototxt_and_model.zip" and zipfile.is_zipfile(source)
    assert weights._weight_file(get_model(V2), source).read_bytes() == b"train_aug weights"
    assert weights.source_path(get_model(V2)) == weights.member_path(get_model(V2))  # extracted once


def test_trainval_file_has_its_own_row() -> None:
    spec = get_model(V2_TRAINVAL)
    assert spec.source is not None and spec.source.archive_member == "train2_iter_20000.caffemodel"
    assert (spec.arch, spec.arch_options) == (get_model(V2).arch, get_model(V2).arch_options)


def test_release_zip_that_does_not_convert_leaves_nothing_behind(tmp_path: Path) -> None:
    """Both members are tried; a failed import leaves neither the zip nor extracted members in the cache."""
    release = tmp_path / "prototxt_and_model.zip"
    noise = np.random.default_rng(1).bytes(20_000)
    with zipfile.ZipFile(release, "w") as archive:
        archive.writestr("prototxt_and_model/train_iter_20000.caffemodel", noise)
        archive.writestr("prototxt_and_model/train2_iter_20000.caffemodel", noise[::-1])
        archive.writestr("prototxt_and_model/test.prototxt", "name: 'x'")
    home = tmp_path / "home"
    result = run_cli("weights", "import", str(release), "-q", home=home)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("deeplab: error: archive prototxt_and_model.zip fits no registry model: ")
    assert f"{V2}: " in line and f"{V2_TRAINVAL}: " in line
    assert [p for p in home.rglob("*") if p.is_file() and p.parent.name != "locks"] == []
