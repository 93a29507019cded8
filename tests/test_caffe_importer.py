"""The .caffemodel reader and the Caffe -> PyTorch mapping, on synthetic files with the releases' layouts.

The released Caffe weights cannot be fetched here, so tests/caffe_synth.py writes files with the real
layer names and blob shapes of each release (random numbers), in both message styles.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from caffe_synth import (
    SynthLayer,
    blob_message,
    fill_random,
    key,
    len_field,
    net_message,
    release_file,
    resnet101_layers,
    varint,
    varint_field,
    write_caffemodel,
)

from deeplab_cli.errors import WeightsError
from deeplab_cli.importers import load_weights
from deeplab_cli.importers.caffe import fold_batchnorm, load_caffemodel, read_caffemodel
from deeplab_cli.zoo import Protocol, get_model


def small_spec(name: str, min_size: int, **arch_options: object):
    """The registry row with a small protocol (fast export check) and optional narrower fc layers."""
    spec = get_model(name)
    options = {**spec.arch_options, **arch_options}
    return dataclasses.replace(
        spec, protocol=Protocol(min_size, spec.protocol.size_step), arch_options=options
    )


def mixed_layers() -> list[SynthLayer]:
    rng = np.random.default_rng(1)
    return [
        SynthLayer("data", "Data"),
        SynthLayer(
            "conv",
            "Convolution",
            blobs=[
                rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
                rng.normal(size=(4,)).astype(np.float32),
            ],
        ),  # fmt: skip
        SynthLayer("relu", "ReLU"),
        SynthLayer(
            "bn",
            "BatchNorm",
            blobs=[np.arange(4, dtype=np.float32), np.ones(4, np.float32), np.array([0.5], np.float32)],
            eps=1e-3,
        ),  # fmt: skip
        SynthLayer("up", "Deconvolution", blobs=[rng.normal(size=(2, 2, 4, 4)).astype(np.float32)]),
        SynthLayer("fc", "Convolution", blobs=[np.float32([[[[1e-30]], [[-3.4e38]]]]), np.float32([np.inf])]),
    ]


@pytest.mark.parametrize("style", ["v1", "v2"])
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("packed", [True, False])
def test_reads_back_every_blob_exactly(tmp_path: Path, style: str, legacy: bool, packed: bool) -> None:
    layers = mixed_layers()
    path = write_caffemodel(tmp_path / "m.caffemodel", layers, style=style, legacy=legacy, packed=packed)
    got = read_caffemodel(path)
    assert list(got) == [layer.name for layer in layers]
    for layer in layers:
        read = got[layer.name]
        assert read.type == ("V1:0" if style == "v1" and layer.type == "BatchNorm" else layer.type)
        assert len(read.blobs) == len(layer.blobs)
        for mine, theirs in zip(layer.blobs, read.blobs, strict=True):
            expected_shape = (1,) * (4 - mine.ndim) + mine.shape if legacy else mine.shape
            assert theirs.shape == expected_shape
            assert theirs.dtype == np.float32
            np.testing.assert_array_equal(theirs.reshape(mine.shape), mine)
    if style == "v2":
        assert got["bn"].eps == pytest.approx(1e-3)


def test_double_data_and_unpacked_dims(tmp_path: Path) -> None:
    values = np.linspace(-1, 1, 6).reshape(2, 3)
    blob = blob_message(values, double=True, packed=False)
    layer = len_field(1, b"d") + len_field(2, b"Convolution") + len_field(7, blob)
    path = tmp_path / "d.caffemodel"
    path.write_bytes(len_field(1, b"net") + len_field(100, layer))
    read = read_caffemodel(path)["d"].blobs[0]
    assert read.dtype == np.float64 and read.shape == (2, 3)
    np.testing.assert_array_equal(read, values)


def test_unknown_fields_of_every_wire_type_are_skipped(tmp_path: Path) -> None:
    blob = blob_message(np.float32([1, 2, 3]))
    extras = (
        varint_field(50, 300) + key(51, 1) + b"\x00" * 8 + key(52, 5) + b"\x00" * 4 + len_field(53, b"xyz")
    )
    layer = extras + len_field(1, b"c") + extras + len_field(2, b"Convolution") + len_field(7, blob) + extras
    path = tmp_path / "x.caffemodel"
    path.write_bytes(len_field(1, b"n") + extras + len_field(100, layer) + extras)
    np.testing.assert_array_equal(read_caffemodel(path)["c"].blobs[0], [1, 2, 3])


# ------------------------------------------------------------------------------------------ bad files
@pytest.fixture(scope="module")
def small_file_bytes() -> bytes:
    return net_message(mixed_layers(), style="v2")


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_file_names_the_layer(tmp_path: Path, small_file_bytes: bytes, cut: float) -> None:
    path = tmp_path / "t.caffemodel"
    path.write_bytes(small_file_bytes[: int(len(small_file_bytes) * cut)])
    with pytest.raises(
        WeightsError, match=r"corrupt \.caffemodel t\.caffemodel: layer #\d+ '\w+'.*(truncated|past)"
    ):
        read_caffemodel(path)


def test_truncation_inside_a_blob_names_the_layer(tmp_path: Path) -> None:
    data = net_message([SynthLayer("conv9", "Convolution", blobs=[np.ones((8, 8), np.float32)])])
    path = tmp_path / "t.caffemodel"
    path.write_bytes(data[:-7])
    with pytest.raises(WeightsError, match="'conv9'"):
        read_caffemodel(path)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x0a\x01n" + b"\xa2\x06" + b"\xff" * 11, "varint"),  # an 11-byte varint as layer length
        (b"\x0a\x01n" + key(100, 0) + varint(5), "wire type"),  # layer field encoded as a varint
        (b"\x0a\x01n" + len_field(100, key(7, 0) + varint(1)), "wire type"),  # blobs as a varint
        (b"\x0a\x01n" + len_field(100, key(9, 3)), "wire type 3"),  # a group start
        (b"\x0a\x01n" + len_field(100, b"\x00\x01"), "field number 0"),
        (
            b"\x0a\x01n"
            + len_field(100, len_field(1, b"a") + len_field(7, len_field(7, len_field(1, varint(5))))),
            "holds 0 values",
        ),
        (
            b"\x0a\x01n" + len_field(100, len_field(1, b"a") + len_field(7, len_field(5, b"\x00" * 6))),
            "multiple",
        ),
    ],
)
def test_corrupt_messages_are_refused(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "c.caffemodel"
    path.write_bytes(payload)
    with pytest.raises(WeightsError, match=message):
        read_caffemodel(path)


def test_prototxt_instead_of_weights(tmp_path: Path) -> None:
    path = tmp_path / "test.prototxt"
    path.write_text('name: "vgg"\nlayers {\n  name: "conv1_1"\n  type: CONVOLUTION\n  bottom: "data"\n}\n')
    with pytest.raises(WeightsError, match="text .*prototxt"):
        read_caffemodel(path)


def test_empty_and_weightless_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.caffemodel"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        read_caffemodel(empty)
    bare = write_caffemodel(tmp_path / "b.caffemodel", [SynthLayer("relu", "ReLU")])
    with pytest.raises(WeightsError, match="no layer with weights"):
        read_caffemodel(bare)
    with pytest.raises(WeightsError, match="cannot read"):
        read_caffemodel(tmp_path / "absent.caffemodel")


# -------------------------------------------------------------------------------- batch norm folding
def test_fold_batchnorm_hand_computed() -> None:
    # one 1x1 conv channel: W = 2, b = 1; stored mean*s = 6, var*s = 24, s = 2 -> mean 3, var 12
    weight, bias = fold_batchnorm(
        np.float32([[[[2.0]]]]), np.float32([1.0]), [np.float32([6]), np.float32([24]), np.float32([2])],
        gamma=np.float32([0.5]), beta=np.float32([1.0]), eps=4.0,
    )  # fmt: skip
    # a = 0.5 / sqrt(12 + 4) = 0.125; W' = 0.25; b' = 0.125 * (1 - 3) + 1 = 0.75
    assert weight.item() == pytest.approx(0.25) and bias.item() == pytest.approx(0.75)
    # Caffe treats a zero moving-average factor as "no statistics": mean = var = 0
    weight, bias = fold_batchnorm(
        np.float32([[[[2.0]]]]), np.float32([1.0]), [np.float32([6]), np.float32([24]), np.float32([0])],
        gamma=np.float32([1.0]), beta=np.float32([0.0]), eps=1.0,
    )  # fmt: skip
    assert weight.item() == pytest.approx(2.0) and bias.item() == pytest.approx(1.0)


def test_fold_matches_conv_batchnorm_scale_in_torch() -> None:
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    s = np.float32(0.7)
    mean, var = rng.normal(size=5).astype(np.float32), rng.uniform(0.5, 2, 5).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    folded_w, folded_b = fold_batchnorm(weight, np.zeros(5, np.float32), [mean * s, var * s, np.float32([s])],
                                        gamma, beta, eps=1e-5)  # fmt: skip
    x = torch.randn(2, 3, 9, 9)
    bn = torch.nn.BatchNorm2d(5, eps=1e-5).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var))
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
        expected = bn(torch.nn.functional.conv2d(x, torch.from_numpy(weight), padding=1))
        got = torch.nn.functional.conv2d(x, torch.from_numpy(folded_w), torch.from_numpy(folded_b), padding=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- release layouts
@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SynthLayer]]:
    """A full-size DeepLab v2 ResNet-101 file (new-style layers, with the MSC duplicates)."""
    return release_file(tmp_path_factory.mktemp("resnet") / "train_iter_20000.caffemodel",
                        "deeplab-v2-resnet101", seed=5, msc_copies=True)  # fmt: skip


@pytest.fixture(scope="module")
def largefov_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SynthLayer]]:
    """A full-size LargeFOV file as DeepLab v1 wrote it: V1 ``layers`` with num/channels/height/width."""
    return release_file(tmp_path_factory.mktemp("v1") / "train2_iter_8000.caffemodel",
                        "deeplab-v1-largefov", seed=2, style="v1", legacy=True)  # fmt: skip


@pytest.fixture(scope="module")
def fcn_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SynthLayer]]:
    """FCN-8s with the release's names and shapes except fc6/fc7 narrowed to 64 (the 4096 ones are 0.5 GB)."""
    return release_file(
        tmp_path_factory.mktemp("fcn") / "fcn8s-heavy-pascal.caffemodel", "fcn8s", seed=3, fc=64
    )


def assert_conv_equals(module: torch.nn.Module, layer: SynthLayer) -> None:
    np.testing.assert_array_equal(module.weight.detach().numpy(), layer.blobs[0].reshape(module.weight.shape))
    if len(layer.blobs) > 1:
        np.testing.assert_array_equal(module.bias.detach().numpy(), layer.blobs[1].reshape(-1))


def test_largefov_v1_file_fills_every_layer(largefov_file) -> None:
    path, layers = largefov_file
    net = load_weights(path, get_model("deeplab-v1-largefov"))
    assert not net.training
    names = net.conv_names()
    assert len(names) == 16
    for name in names:
        assert_conv_equals(getattr(net, name), layers["fc8_voc12" if name == "fc8" else name])


def test_resnet_file_folds_every_batchnorm(resnet_file) -> None:
    path, layers = resnet_file
    net = load_caffemodel(path, get_model("deeplab-v2-resnet101"))
    base = net.base
    convs = [("conv1", base.conv1, "_conv1")]
    for block_name, block in base.blocks.items():
        for branch in ("branch1", "branch2a", "branch2b", "branch2c"):
            if getattr(block, branch) is not None:
                convs.append((f"{block_name}_{branch}", getattr(block, branch), f"{block_name[3:]}_{branch}"))
    assert len(convs) == 1 + 3 * 33 + 4  # conv1, three per bottleneck, four projections
    for conv_name, module, unit in convs:
        mean_s, var_s, factor = layers[f"bn{unit}"].blobs
        gamma, beta = layers[f"scale{unit}"].blobs
        mean, var = mean_s / factor[0], var_s / factor[0]
        alpha = gamma / np.sqrt(var + 1e-5)
        expected_w = layers[conv_name].blobs[0] * alpha[:, None, None, None]
        np.testing.assert_allclose(module.weight.detach().numpy(), expected_w, rtol=2e-5, atol=1e-7)
        conv_bias = layers[conv_name].blobs[1] if len(layers[conv_name].blobs) > 1 else 0.0
        expected_b = alpha * (conv_bias - mean) + beta
        np.testing.assert_allclose(module.bias.detach().numpy(), expected_b, rtol=2e-5, atol=2e-6)
    for index, head in enumerate(base.aspp):  # the unsuffixed heads, not the _res075/_res05 copies
        assert_conv_equals(head, layers[f"fc1_voc12_c{index}"])


def test_batchnorm_eps_recorded_in_the_file_is_used(tmp_path: Path) -> None:
    layers = fill_random(resnet101_layers()[:3] + [SynthLayer("x", "ReLU")])
    layers[1].eps = 0.5
    path = write_caffemodel(tmp_path / "eps.caffemodel", layers)
    assert read_caffemodel(path)["bn_conv1"].eps == 0.5
    with pytest.raises(WeightsError, match="'res2a_branch1' is missing"):
        load_caffemodel(path, get_model("deeplab-v2-resnet101"))


def test_fcn_file_fills_convs_and_deconvs(fcn_file) -> None:
    path, layers = fcn_file
    net = load_caffemodel(path, small_spec("fcn8s-heavy-pascal", 1, fc_channels=64))
    for name in ("conv1_1", "conv5_3", "fc6", "fc7", "score_fr", "score_pool4", "score_pool3"):
        assert_conv_equals(getattr(net, name), layers[name])
    for name in ("upscore2", "upscore_pool4", "upscore8"):
        np.testing.assert_array_equal(getattr(net, name).weight.detach().numpy(), layers[name].blobs[0])


def test_v2_vgg_branches_by_name(tmp_path: Path) -> None:
    path, layers = release_file(tmp_path / "v2vgg.caffemodel", "deeplab-v2-vgg16", seed=4, fc=32)
    spec = dataclasses.replace(get_model("deeplab-v1-largefov"), arch="deeplab-v2-vgg16",
                               arch_options={"fc_channels": 32})  # fmt: skip
    net = load_caffemodel(path, spec)
    for i in range(1, 5):
        for fc, caffe in ((f"fc6_{i}", f"fc6_{i}"), (f"fc7_{i}", f"fc7_{i}"), (f"fc8_{i}", f"fc8_voc12_{i}")):
            assert_conv_equals(getattr(net, fc), layers[caffe])
    assert net.fc6_3.dilation == (18, 18)


# ------------------------------------------------------------------------------------ wrong weights
def test_other_architectures_are_refused(resnet_file, fcn_file, largefov_file) -> None:
    with pytest.raises(WeightsError, match="'conv1_1' is missing: not a deeplab-v1-largefov"):
        load_caffemodel(resnet_file[0], get_model("deeplab-v1-largefov"))
    with pytest.raises(WeightsError, match=r"'fc6' blob 0 has shape \(64, 512, 7, 7\).*\(1024, 512, 3, 3\)"):
        load_caffemodel(fcn_file[0], get_model("deeplab-v1-largefov"))
    with pytest.raises(WeightsError, match="'conv1' is missing: not a deeplab-v2-resnet101"):
        load_caffemodel(largefov_file[0], get_model("deeplab-v2-resnet101"))
    with pytest.raises(
        WeightsError, match=r"'fc6' blob 0 has shape \(1024, 512, 3, 3\).*\(1024, 512, 7, 7\)"
    ):
        load_caffemodel(largefov_file[0], small_spec("fcn8s-heavy-pascal", 1, fc_channels=1024))


def test_wrong_class_count_names_the_classifier(largefov_file) -> None:
    spec = get_model("deeplab-v1-largefov")
    spec = dataclasses.replace(spec, class_names=spec.class_names + ("extra",))
    with pytest.raises(
        WeightsError, match=r"'fc8_voc12' blob 0 has shape \(21, 1024, 1, 1\).*\(22, 1024, 1, 1\)"
    ):
        load_caffemodel(largefov_file[0], spec)


def test_classifier_found_by_pattern_and_ambiguity_refused(tmp_path: Path, largefov_file) -> None:
    _path, layers = largefov_file
    fc8 = layers["fc8_voc12"]
    renamed = [
        SynthLayer("fc8_coco" if name == "fc8_voc12" else name, layer.type, blobs=layer.blobs)
        for name, layer in layers.items()
    ]
    path = write_caffemodel(tmp_path / "coco.caffemodel", renamed)
    net = load_caffemodel(path, get_model("deeplab-v1-largefov"))
    assert_conv_equals(net.fc8, fc8)
    twice = renamed + [SynthLayer("fc8_other", "Convolution", blobs=fc8.blobs)]
    path = write_caffemodel(tmp_path / "two.caffemodel", twice)
    with pytest.raises(WeightsError, match=r"'fc8_voc12' is ambiguous \(fc8_coco, fc8_other\)"):
        load_caffemodel(path, get_model("deeplab-v1-largefov"))


def test_missing_bias_is_refused(tmp_path: Path) -> None:
    layers = fill_random([SynthLayer("conv1_1", "Convolution", [(64, 3, 3, 3)])])
    path = write_caffemodel(tmp_path / "nobias.caffemodel", layers)
    with pytest.raises(WeightsError, match="'conv1_1' has no bias blob"):
        load_caffemodel(path, get_model("deeplab-v1-largefov"))


# ------------------------------------------------------------------------------------- ONNX round trip
DEEPLAB_MEAN = (104.008, 116.669, 122.675)
BGR_MEAN = {
    "deeplab-v1-largefov": DEEPLAB_MEAN,
    "deeplab-v2-resnet101": DEEPLAB_MEAN,
    "fcn8s-heavy-pascal": (104.00699, 116.66877, 122.67892),
}


def caffe_reference(net: torch.nn.Module, rgb: np.ndarray, name: str) -> np.ndarray:
    """What Caffe computes: BGR channel order, minus the BGR mean (written independently of export.py)."""
    bgr = rgb[:, ::-1] - np.float32(BGR_MEAN[name]).reshape(1, 3, 1, 1)
    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(bgr, dtype=np.float32))).numpy()


def run_onnx(path: Path, rgb: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": rgb})[0]


@pytest.mark.parametrize(
    ("fixture", "name", "min_size", "options", "size", "expected"),
    [
        # LargeFOV: through the weight cache, in test_registry_row_converts_from_a_mirror
        # single-scale here; the multi-scale wrapper's export is checked in test_caffe_nets.py
        ("resnet_file", "deeplab-v2-resnet101", 65, {"multi_scale": False}, (81, 73), (11, 10)),
        # the row's own protocol (min_size 1): the export is traced on a 1 x 2 image
        ("fcn_file", "fcn8s-heavy-pascal", 1, {"fc_channels": 64}, (50, 71), (50, 71)),
    ],
)
def test_onnx_export_reproduces_the_caffe_computation(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, name: str, min_size: int,
    options: dict, size: tuple[int, int], expected: tuple[int, int],
) -> None:  # fmt: skip
    from deeplab_cli.export import export_onnx, read_spec

    path, _layers = request.getfixturevalue(fixture)
    spec = small_spec(name, min_size, **options)
    net = load_caffemodel(path, spec)
    onnx_path = export_onnx(net, spec, tmp_path / f"{name}.onnx")
    assert read_spec(onnx_path) == spec
    rgb = np.random.default_rng(0).uniform(0, 255, (1, 3, *size)).astype(np.float32)
    want = caffe_reference(net, rgb, name)
    got = run_onnx(onnx_path, rgb)
    assert got.shape == want.shape == (1, 21, *expected)
    scale = float(np.abs(want).max())
    assert scale > 0.1  # the random network is not dead
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(scale, 1.0))


def test_registry_row_converts_from_a_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, largefov_file
) -> None:
    """The weight cache finds the sha-less release by name in a mirror and converts it with this importer."""
    from deeplab_cli import weights
    from deeplab_cli.export import read_spec

    path, _layers = largefov_file
    mirror = tmp_path / "mirror" / "deeplab-largefov"
    mirror.mkdir(parents=True)
    try:
        os.link(path, mirror / path.name)
    except OSError:
        shutil.copy(path, mirror / path.name)
    monkeypatch.setenv("DEEPLAB_HOME", str(tmp_path / "home"))  # never the session cache: these are random
    monkeypatch.setenv("DEEPLAB_MIRROR", str(tmp_path / "mirror"))
    onnx_path = weights.ensure_onnx("deeplab-v1-largefov", progress=False)
    assert read_spec(onnx_path) == get_model("deeplab-v1-largefov")
    rgb = np.random.default_rng(4).uniform(0, 255, (2, 3, 65, 81)).astype(np.float32)  # not the export size
    want = caffe_reference(
        load_caffemodel(path, get_model("deeplab-v1-largefov")), rgb, "deeplab-v1-largefov"
    )
    got = run_onnx(onnx_path, rgb)
    assert got.shape == (2, 21, 9, 11)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(float(np.abs(want).max()), 1.0))
