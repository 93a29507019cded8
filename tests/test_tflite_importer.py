"""The TFLite importer maps every released file onto its network, checked piece by piece.

With the interpreter keeping all intermediate tensors, each of our layers, blocks and heads is fed the
reference runtime's own input tensor and must reproduce its output tensor. Every single layer of the
float32/float16/int8 dynamic-range files must match to 1e-4 of its range: dynamic-range ("hybrid") int8
convolutions quantize their input per pixel in the reference runtime, and our HybridQuantConv2d does the
same (measured <= 3.2e-6 relative; 1e-2 without the emulation). Blocks and heads chain several layers:
float noise of 1e-6 between runtimes (different summation order in the float depthwise convs) flips an
occasional int8 rounding of the next hybrid layer, one quantization step, so blocks/heads containing
hybrid layers get HYBRID_BOUND. A wrong mapping (weights, layout, dilation, activation, wiring) gives
errors of order 100%.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGES
from test_fidelity import UINT8_MODEL, source_file
from tflite_reference import TFLiteReference, load_rgb

from deeplab_cli import zoo
from deeplab_cli.errors import WeightsError
from deeplab_cli.importers import load_weights
from deeplab_cli.importers.tflite import LayerRecord, load_tflite, read_layers
from deeplab_cli.nets.quant import HybridQuantConv2d, has_hybrid, without_hybrid

FLOAT_BOUND = 1e-4
HYBRID_BOUND = 0.01  # blocks/heads with hybrid layers: measured <= 0.0016 (blocks), 0.0037 (ADE20K head)
INTEGER_BOUND = 0.1  # the uint8 file: every activation is requantized (and clipped) to 8 bits
MODELS = [spec.name for spec in zoo.registry_models() if spec.source and spec.source.format == "tflite"]


def _nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2), dtype=np.float32))


def _relative(ours: torch.Tensor, ref: np.ndarray) -> float:
    ref_nchw = ref.transpose(0, 3, 1, 2)
    return float(np.abs(ours.numpy() - ref_nchw).max() / max(np.abs(ref_nchw).max(), 1e-6))


class Probe:
    """A loaded network, its layer records and an interpreter run on one real image."""

    def __init__(self, name: str) -> None:
        self.spec = zoo.get_model(name)
        path = source_file(self.spec)
        # layer by layer, the int8 emulation must reproduce the runtime (whatever the registry row picks)
        self.net = load_tflite(path, self.spec, emulate_hybrid=True)
        self.graph, self.records = read_layers(path)
        self.reference = TFLiteReference(path, self.spec)
        image_name = "cityscapes_segmentation.bmp" if "cityscapes" in name else "bird_segmentation.bmp"
        image = load_rgb(IMAGES / image_name, self.reference.size)
        self.reference.run(self.reference.padded(image))
        self.quantization = {
            d["index"]: d["quantization"] for d in self.reference.interpreter.get_tensor_details()
        }
        self.by_layer = {
            id(layer): rec for layer, rec in zip(self.net.conv_layers(), self.records, strict=True)
        }

    def tensor(self, index: int) -> np.ndarray:
        value = self.reference.interpreter.get_tensor(index)
        if value.dtype == np.uint8:  # full-integer graph: dequantize the activation
            scale, zero = self.quantization[index]
            value = (value.astype(np.float32) - zero) * scale
        return value.astype(np.float32)

    def bound(self, records: list[LayerRecord]) -> float:
        """The bound for a chain of layers (one layer: always FLOAT_BOUND except in the uint8 graph)."""
        if self.spec.name == UINT8_MODEL:
            return INTEGER_BOUND  # integer arithmetic everywhere
        return HYBRID_BOUND if len(records) > 1 and any(r.hybrid for r in records) else FLOAT_BOUND


@pytest.fixture(scope="module", params=MODELS)
def probe(request: pytest.FixtureRequest) -> Probe:
    return Probe(request.param)


def test_every_layer_reproduces_its_reference_tensor(probe: Probe) -> None:
    if probe.reference.size[0] > 1000:
        # 1025 x 2049 layer by layer is slow in eager PyTorch; the block test covers the same layers
        pytest.skip("Cityscapes file: checked block by block")
    with torch.no_grad():
        for index, (layer, record) in enumerate(zip(probe.net.conv_layers(), probe.records, strict=True)):
            ours = layer(_nchw(probe.tensor(record.input_tensor)))
            error = _relative(ours, probe.tensor(record.output_tensor))
            assert error <= probe.bound([record]), (
                f"conv #{index} ({record.name}): relative error {error:.3g}"
            )


def test_every_block_and_the_head_reproduce_reference_tensors(probe: Probe) -> None:
    backbone = probe.net.backbone
    with torch.no_grad():
        for index, block in enumerate(backbone.blocks):
            records = [probe.by_layer[id(layer)] for layer in block.conv_layers()]
            out_tensor = probe.by_layer[id(block.project)].output_tensor
            if block.residual:
                (add,) = probe.graph.consumers[out_tensor]
                assert probe.graph.ops[add][0] == "ADD"
                out_tensor = probe.graph.ops[add][2][0]
            ours, _ = block(_nchw(probe.tensor(records[0].input_tensor)))
            error = _relative(ours, probe.tensor(out_tensor))
            assert error <= probe.bound(records), f"block {index}: relative error {error:.3g}"
        head_layers = probe.net.conv_layers()[len(backbone.conv_layers()) :]
        head_records = [probe.by_layer[id(layer)] for layer in head_layers]
        first_head = head_layers[1] if hasattr(probe.net, "aspp") else head_layers[0]  # the 1x1 branch
        features = _nchw(probe.tensor(probe.by_layer[id(first_head)].input_tensor))
        low_layer = getattr(probe.net, "low_level", None) or getattr(probe.net, "low_logits", None)
        low = _nchw(probe.tensor(probe.by_layer[id(low_layer)].input_tensor)) if low_layer else None
        ours = probe.net.head(features, low)
        error = _relative(ours, probe.tensor(probe.reference.logits_index))
        assert error <= probe.bound(head_records), f"head: relative error {error:.3g}"


def test_hybrid_layers_need_the_int8_emulation(probe: Probe) -> None:
    """The dynamic-range layers are emulated, and without the emulation they miss their reference tensors."""
    pairs = list(zip(probe.net.conv_layers(), probe.records, strict=True))
    hybrid = [(layer, record) for layer, record in pairs if record.hybrid]
    assert [isinstance(layer.conv, HybridQuantConv2d) for layer, _ in pairs] == [r.hybrid for _, r in pairs]
    if not hybrid:
        assert not has_hybrid(probe.net)
        return
    errors = []
    with torch.no_grad():
        for layer, record in hybrid[-8:]:  # the last ones: the smallest tensors
            x = _nchw(probe.tensor(record.input_tensor))
            errors.append(_relative(without_hybrid(layer)(x), probe.tensor(record.output_tensor)))
    assert max(errors) > 1e-3, errors


def test_hybrid_records_of_the_voc_file() -> None:
    """All 1x1 convs of the int8 VOC file are hybrid; 18 of them read ReLU outputs (cheaper quantization)."""
    _, records = read_layers(source_file(zoo.get_model("deeplabv3-mnv2-voc")))
    hybrid = [r for r in records if r.hybrid]
    assert len(hybrid) == 36 and all(r.kernel == 1 and not r.depthwise for r in hybrid)
    assert sum(r.nonnegative_input for r in records) == 18
    _, dm05 = read_layers(source_file(zoo.get_model("deeplabv3-mnv2-dm05-voc")))
    assert not any(r.hybrid or r.nonnegative_input for r in dm05)


def test_even_sizes_use_tensorflow_same_padding() -> None:
    """Resized to even/odd sizes the float file's backbone output equals ours (asymmetric SAME pads)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    spec = zoo.get_model("deeplabv3-mnv2-dm05-voc")
    path = source_file(spec)
    net = load_weights(path, spec)
    graph, records = read_layers(path)
    features_tensor = records[len(net.backbone.conv_layers()) + 1].input_tensor  # input of the ASPP branch
    rng = np.random.default_rng(0)
    for size in [(264, 264), (258, 263)]:  # the graph's fixed pooling/resizes need a 33 x 33 feature map
        interpreter = Interpreter(
            model_path=str(path),
            experimental_preserve_all_tensors=True,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, [1, *size, 3])
        interpreter.allocate_tensors()
        x = rng.random((1, *size, 3), dtype=np.float32) * 2 - 1
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        with torch.no_grad():
            ours, _ = net.backbone(_nchw(x))
        assert _relative(ours, interpreter.get_tensor(features_tensor)) <= FLOAT_BOUND, size


def _spec_like(name: str, **changes: object) -> zoo.ModelSpec:
    return dataclasses.replace(zoo.get_model(name), **changes)


@pytest.mark.parametrize(
    ("file_of", "spec", "message"),
    [
        # ADE20K file (decoder, 151 classes) as the VOC architecture
        ("deeplabv3plus-mnv2-ade20k", lambda: zoo.get_model("deeplabv3-mnv2-voc"), "does not fit"),
        # VOC file as the Cityscapes network
        ("deeplabv3-mnv2-voc", lambda: zoo.get_model("deeplabv3plus-mnv3-cityscapes"), "does not fit"),
        # VOC file with the right network but the wrong class count
        (
            "deeplabv3-mnv2-voc",
            lambda: _spec_like("deeplabv3-mnv2-voc", class_names=("a", "b")),
            "weight shape",
        ),
        # depth multiplier 0.5 file as depth 1.0
        ("deeplabv3-mnv2-dm05-voc", lambda: zoo.get_model("deeplabv3-mnv2-voc"), "weight shape"),
        # output stride 16 file as output stride 8 (dilation differs)
        ("deeplabv3-mnv2-voc-uint8", lambda: zoo.get_model("deeplabv3-mnv2-voc"), "has stride 2"),
    ],
)
def test_wrong_architecture_is_a_clear_weights_error(file_of: str, spec, message: str) -> None:  # type: ignore[no-untyped-def]
    path = source_file(zoo.get_model(file_of))
    with pytest.raises(WeightsError, match=message) as info:
        load_weights(path, spec())
    assert path.name in str(info.value)
    assert "\n" not in str(info.value)


def test_damaged_files_are_weights_errors(tmp_path: Path) -> None:
    source = source_file(zoo.get_model("deeplabv3-mnv2-voc"))
    data = source.read_bytes()
    spec = zoo.get_model("deeplabv3-mnv2-voc")
    for cut in (100, len(data) // 3, len(data) - 1000):
        truncated = tmp_path / f"cut{cut}.tflite"
        truncated.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match=truncated.name):
            load_weights(truncated, spec)
    not_tflite = tmp_path / "image.tflite"
    shutil.copy(IMAGES / "bird_segmentation.bmp", not_tflite)
    with pytest.raises(WeightsError, match="not a TFLite flatbuffer"):
        load_weights(not_tflite, spec)
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(tmp_path / "missing.tflite", spec)


def test_records_describe_the_released_graphs() -> None:
    """Spot checks of what the importer reads: S2B atrous pattern, native dilation, fp16, hard-swish/SE."""
    _, voc = read_layers(source_file(zoo.get_model("deeplabv3-mnv2-voc")))
    assert sorted({r.dilation for r in voc if r.depthwise}) == [1, 2, 4]
    _, dm05 = read_layers(source_file(zoo.get_model("deeplabv3-mnv2-dm05-voc")))
    assert sorted({r.dilation for r in dm05 if r.depthwise}) == [1, 2, 4]
    assert dm05[0].weight.shape == (16, 3, 3, 3)
    _, city = read_layers(source_file(zoo.get_model("deeplabv3plus-mnv3-cityscapes")))
    acts = {r.act for r in city}
    assert {"hswish", "hsigmoid", "relu", "none"} <= acts
    assert {r.kernel for r in city if r.depthwise} == {3, 5}
    assert sum(r.act == "hsigmoid" for r in city) == 8 + 1  # eight squeeze-excite gates + the pooled gate
