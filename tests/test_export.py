"""ONNX export: one self-contained file, dynamic batch/height/width, normalisation inside, checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_fidelity import onnx_for, session_for, source_file

from deeplab_cli import export, zoo
from deeplab_cli.errors import DeeplabError, WeightsError
from deeplab_cli.files import TMP_SUFFIX
from deeplab_cli.importers import load_weights
from deeplab_cli.nets.quant import has_hybrid

NAME = "deeplabv3-mnv2-voc"


@pytest.fixture(scope="module")
def spec() -> zoo.ModelSpec:
    return zoo.get_model(NAME)


@pytest.fixture(scope="module")
def torch_net(spec: zoo.ModelSpec) -> torch.nn.Module:
    return export.wrap_for_export(load_weights(source_file(spec), spec), spec)


@pytest.fixture(scope="module")
def onnx_path(spec: zoo.ModelSpec) -> Path:
    return onnx_for(spec)


def _photo_like(shape: tuple[int, ...], seed: int) -> np.ndarray:
    low = torch.rand(
        shape[0], 3, shape[2] // 16 + 2, shape[3] // 16 + 2, generator=torch.Generator().manual_seed(seed)
    )
    return torch.nn.functional.interpolate(low * 255, size=shape[2:], mode="bilinear").numpy()


def test_file_is_self_contained_with_dynamic_axes_and_spec(onnx_path: Path, spec: zoo.ModelSpec) -> None:
    leftovers = [p.name for p in onnx_path.parent.iterdir() if p.name.endswith((".data", ".tmp", TMP_SUFFIX))]
    assert leftovers == []  # no .onnx.data side file, no temp file left
    model = onnx.load(str(onnx_path), load_external_data=False)
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    (image,) = model.graph.input
    (logits,) = model.graph.output
    assert (image.name, logits.name) == ("image", "logits")
    dims = image.type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True] and dims[1].dim_value == 3
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert export.read_spec(onnx_path) == spec


@pytest.mark.parametrize("size", [(375, 500), (333, 517), (513, 513)])
def test_other_sizes_give_the_pytorch_labels(
    onnx_path: Path, torch_net: torch.nn.Module, size: tuple
) -> None:
    image = _photo_like((1, 3, *size), seed=size[0])
    ours = session_for(onnx_path).run(["logits"], {"image": image})[0]
    with torch.no_grad():
        expected = torch_net(torch.from_numpy(image)).numpy()
    assert ours.shape == expected.shape == (1, 21, (size[0] - 1) // 8 + 1, (size[1] - 1) // 8 + 1)
    if has_hybrid(torch_net):
        # int8 emulation (nets/quant.py): float noise flips an occasional int8 rounding, so ORT and
        # PyTorch agree statistically (measured: <= 0.151 of a ~14 range, labels 1.0)
        bound = export.HYBRID_RELATIVE_TOLERANCE * np.abs(expected).max()
    else:
        bound = export.FP32_TOLERANCE
    assert np.abs(ours - expected).max() <= bound
    assert (ours.argmax(1) == expected.argmax(1)).mean() >= 0.995


def test_batch_equals_one_at_a_time(onnx_path: Path) -> None:
    session = session_for(onnx_path)
    batch = _photo_like((3, 3, 129, 201), seed=7)
    together = session.run(["logits"], {"image": batch})[0]
    for index in range(3):
        alone = session.run(["logits"], {"image": batch[index : index + 1]})[0]
        assert np.abs(together[index] - alone[0]).max() <= 1e-4


def test_normalisation_and_bgr_are_inside_the_graph(spec: zoo.ModelSpec) -> None:
    probe = torch.nn.Identity()
    image = torch.rand(1, 3, 4, 5) * 255
    rgb = export.wrap_for_export(probe, spec)(image)
    assert torch.allclose(rgb, (image - 127.5) / 127.5, atol=1e-5)
    bgr_spec = dataclasses.replace(spec, channel_order="BGR", mean=(10.0, 20.0, 30.0), std=(1.0, 2.0, 4.0))
    bgr = export.wrap_for_export(probe, bgr_spec)(image)
    mean = torch.tensor([10.0, 20.0, 30.0]).reshape(1, 3, 1, 1)
    std = torch.tensor([1.0, 2.0, 4.0]).reshape(1, 3, 1, 1)
    assert torch.allclose(bgr, ((image - mean) / std).flip(1), atol=1e-5)


def test_fp16_export_keeps_float32_io(tmp_path: Path) -> None:
    spec = zoo.get_model("deeplabv3-mnv2-dm05-voc")
    path = export.convert_to_onnx(source_file(spec), spec, tmp_path / "half.onnx", fp16=True)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    full = session_for(onnx_for(spec)).run(["logits"], {"image": _photo_like((1, 3, 257, 257), 3)})[0]
    half = session_for(path).run(["logits"], {"image": _photo_like((1, 3, 257, 257), 3)})[0]
    assert (full.argmax(1) == half.argmax(1)).mean() >= 0.99


def test_failed_check_or_import_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = zoo.get_model("deeplabv3-mnv2-dm05-voc")
    target = tmp_path / "model.onnx"
    monkeypatch.setattr(export, "FP32_TOLERANCE", -1.0)  # any difference now fails the check
    with pytest.raises(DeeplabError, match="differs from PyTorch"):
        export.convert_to_onnx(source_file(spec), spec, target)
    monkeypatch.undo()
    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes(source_file(spec).read_bytes()[:5000])
    with pytest.raises(WeightsError):
        export.convert_to_onnx(truncated, spec, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tflite"]
