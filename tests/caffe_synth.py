"""Synthetic ``.caffemodel`` files: a minimal protobuf encoder plus the layer lists of the Caffe releases.

The released weights cannot be downloaded here, so tests write files with the releases' real layer
names, types and blob shapes (from their prototxts) filled with random numbers, in either message style:

- ``v1``: ``NetParameter.layers`` (field 2) of V1LayerParameter {name 4, type 5 (enum), blobs 6}, as
  DeepLab v1 and the 2014 Caffe wrote them;
- ``v2``: ``NetParameter.layer`` (field 100) of LayerParameter {name 1, type 2 (string), blobs 7}.

Blobs are written with the old ``num/channels/height/width`` (``legacy=True``, shapes left-padded to
4-D with ones) or the new ``shape`` (BlobShape, packed int64 dims), floats packed or one field each.
This encoder is independent of the reader in ``deeplab_cli.importers.caffe``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

V1_ENUM = {
    "Data": 5,
    "Convolution": 4,
    "Deconvolution": 39,
    "ReLU": 18,
    "Pooling": 17,
    "Dropout": 6,
    "Eltwise": 25,
}


# ------------------------------------------------------------------------------------------ encoder
def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 negatives take 10 bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def len_field(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def varint_field(number: int, value: int) -> bytes:
    return key(number, 0) + varint(value)


def blob_message(array: np.ndarray, legacy: bool = False, packed: bool = True, double: bool = False) -> bytes:
    """A BlobProto for ``array``."""
    out = bytearray()
    if legacy:
        dims = [1] * (4 - array.ndim) + list(array.shape)
        if len(dims) != 4:
            raise ValueError("legacy blobs are 4-D")
        for number, dim in zip((1, 2, 3, 4), dims, strict=True):
            out += varint_field(number, dim)
    flat = np.ascontiguousarray(array).reshape(-1)
    if double:
        values = flat.astype("<f8")
        out += len_field(8, values.tobytes()) if packed else b"".join(key(8, 1) + v.tobytes() for v in values)
    else:
        values = flat.astype("<f4")
        out += len_field(5, values.tobytes()) if packed else b"".join(key(5, 5) + v.tobytes() for v in values)
    if not legacy:
        dims_payload = b"".join(varint(d) for d in array.shape)
        shape = len_field(1, dims_payload) if packed else b"".join(varint_field(1, d) for d in array.shape)
        out += len_field(7, shape)
    return bytes(out)


@dataclass
class SynthLayer:
    """One layer of a release: name, Caffe type, blob shapes; ``blobs`` holds the data once filled."""

    name: str
    type: str
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    blobs: list[np.ndarray] = field(default_factory=list)
    eps: float | None = None


def layer_message(layer: SynthLayer, style: str, legacy: bool, packed: bool) -> bytes:
    blobs = [blob_message(b, legacy=legacy, packed=packed) for b in layer.blobs]
    if style == "v1":
        out = len_field(2, b"data") + len_field(3, layer.name.encode())  # bottom, top (skipped by reader)
        out += len_field(4, layer.name.encode()) + varint_field(5, V1_ENUM.get(layer.type, 0))
        return out + b"".join(len_field(6, b) for b in blobs)
    out = len_field(1, layer.name.encode()) + len_field(2, layer.type.encode())
    out += len_field(3, b"data") + len_field(4, layer.name.encode())  # bottom, top
    out += b"".join(len_field(7, b) for b in blobs)
    if layer.eps is not None:
        out += len_field(139, varint_field(1, 1) + key(3, 5) + struct.pack("<f", layer.eps))
    return out


def net_message(
    layers: list[SynthLayer], style: str = "v2", legacy: bool = False, packed: bool = True, name: str = "net"
) -> bytes:
    """A NetParameter with ``layers`` (in order), plus a few fields the reader must skip."""
    out = bytearray(len_field(1, name.encode()))
    out += len_field(3, b"data") + varint_field(4, 1)  # input, input_dim (unused by the reader)
    number = 2 if style == "v1" else 100
    for layer in layers:
        out += len_field(number, layer_message(layer, style, legacy, packed))
    return bytes(out)


def write_caffemodel(path: Path, layers: list[SynthLayer], **options: object) -> Path:
    Path(path).write_bytes(net_message(layers, **options))  # type: ignore[arg-type]
    return Path(path)


# ----------------------------------------------------------------------------- the releases' layers
def _conv(name: str, cout: int, cin: int, k: int, bias: bool = True) -> SynthLayer:
    shapes = [(cout, cin, k, k)] + ([(cout,)] if bias else [])
    return SynthLayer(name, "Convolution", shapes)


def _plain(name: str, kind: str) -> SynthLayer:
    return SynthLayer(name, kind)


def _vgg_trunk(first_pad_name: str = "") -> list[SynthLayer]:
    layers, cin = [], 3
    for stage, count, channels in ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512)):
        for index in range(1, count + 1):
            layers += [
                _conv(f"conv{stage}_{index}", channels, cin, 3),
                _plain(f"relu{stage}_{index}", "ReLU"),
            ]
            cin = channels
        layers.append(_plain(f"pool{stage}", "Pooling"))
    return layers


def largefov_layers(num_classes: int = 21, fc: int = 1024) -> list[SynthLayer]:
    """DeepLab-LargeFOV test.prototxt (v1): VGG-16, pool5a, fc6 3x3 hole 12, fc7, fc8_voc12."""
    layers = _vgg_trunk() + [_plain("pool5a", "Pooling")]
    layers += [_conv("fc6", fc, 512, 3), _plain("relu6", "ReLU"), _plain("drop6", "Dropout")]
    layers += [_conv("fc7", fc, fc, 1), _plain("relu7", "ReLU"), _plain("drop7", "Dropout")]
    return layers + [_conv("fc8_voc12", num_classes, fc, 1), _plain("fc8_interp", "Interp")]


def v2_vgg16_layers(num_classes: int = 21, fc: int = 1024) -> list[SynthLayer]:
    """DeepLab v2 VGG-16 ASPP-L: fc6_i (3x3, dilation 6/12/18/24) -> fc7_i -> fc8_voc12_i, summed."""
    layers = _vgg_trunk()
    for i in range(1, 5):
        layers += [_conv(f"fc6_{i}", fc, 512, 3), _plain(f"relu6_{i}", "ReLU"), _conv(f"fc7_{i}", fc, fc, 1)]
        layers += [_plain(f"relu7_{i}", "ReLU"), _conv(f"fc8_voc12_{i}", num_classes, fc, 1)]
    return layers + [_plain("fc8_voc12", "Eltwise")]


def _bn_triplet(
    conv: str, bn: str, scale: str, cout: int, cin: int, k: int, bias: bool = False
) -> list[SynthLayer]:
    return [
        _conv(conv, cout, cin, k, bias=bias),
        SynthLayer(bn, "BatchNorm", [(cout,), (cout,), (1,)]),
        SynthLayer(scale, "Scale", [(cout,), (cout,)]),
    ]


def resnet101_layers(num_classes: int = 21, msc_copies: bool = False) -> list[SynthLayer]:
    """DeepLab v2 ResNet-101 (MSRA names: res3b1..b3, res4b1..b22; BatchNorm + Scale after each conv).

    ``msc_copies`` appends the multi-scale branches' duplicates of conv1 and the ASPP heads
    (``*_res075``, ``*_res05``) as the MSC release holds them; the importer must ignore them.
    """
    # conv1 carries a bias here (MSRA's deploy prototxt gives conv1 one; other ports drop it): both load
    layers = _bn_triplet("conv1", "bn_conv1", "scale_conv1", 64, 3, 7, bias=True) + [
        _plain("pool1", "Pooling")
    ]
    cin = 64
    for stage, count, mid, cout in ((2, 3, 64, 256), (3, 4, 128, 512), (4, 23, 256, 1024), (5, 3, 512, 2048)):
        units = [f"{stage}{'abc'[i]}" for i in range(3)] if count == 3 else [f"{stage}a"]
        if count != 3:
            units += [f"{stage}b{i}" for i in range(1, count)]
        for index, unit in enumerate(units):
            if index == 0:
                layers += _bn_triplet(
                    f"res{unit}_branch1", f"bn{unit}_branch1", f"scale{unit}_branch1", cout, cin, 1
                )
            for branch, co, ci, k in (("2a", mid, cin, 1), ("2b", mid, mid, 3), ("2c", cout, mid, 1)):
                layers += _bn_triplet(f"res{unit}_branch{branch}", f"bn{unit}_branch{branch}",
                                      f"scale{unit}_branch{branch}", co, ci, k)  # fmt: skip
            layers += [_plain(f"res{unit}", "Eltwise"), _plain(f"res{unit}_relu", "ReLU")]
            cin = cout
    layers += [_conv(f"fc1_voc12_c{i}", num_classes, 2048, 3) for i in range(4)]
    layers.append(_plain("fc1_voc12", "Eltwise"))
    if msc_copies:
        for suffix in ("_res075", "_res05"):
            layers += [_conv(f"conv1{suffix}", 64, 3, 7, bias=False)]
            layers += [_conv(f"fc1_voc12_c{i}{suffix}", num_classes, 2048, 3) for i in range(4)]
        layers.append(_plain("fc_fusion", "Eltwise"))
    return layers


def fcn8s_layers(num_classes: int = 21, fc: int = 4096) -> list[SynthLayer]:
    """fcn8s-heavy-pascal (deploy.prototxt): VGG-16 pad 100, fc6 7x7, fc7, scores and 3 deconvolutions."""
    layers = _vgg_trunk()
    layers += [
        _conv("fc6", fc, 512, 7),
        _plain("relu6", "ReLU"),
        _conv("fc7", fc, fc, 1),
        _plain("relu7", "ReLU"),
    ]
    layers += [_conv("score_fr", num_classes, fc, 1)]
    layers += [SynthLayer("upscore2", "Deconvolution", [(num_classes, num_classes, 4, 4)])]
    layers += [_conv("score_pool4", num_classes, 512, 1), _plain("score_pool4c", "Crop")]
    layers += [SynthLayer("upscore_pool4", "Deconvolution", [(num_classes, num_classes, 4, 4)])]
    layers += [_conv("score_pool3", num_classes, 256, 1), _plain("score_pool3c", "Crop")]
    layers += [SynthLayer("upscore8", "Deconvolution", [(num_classes, num_classes, 16, 16)])]
    return layers + [_plain("score", "Crop")]


RELEASES = {
    "deeplab-v1-largefov": largefov_layers,
    "deeplab-v2-vgg16": v2_vgg16_layers,
    "deeplab-v2-resnet101": resnet101_layers,
    "fcn8s": fcn8s_layers,
}


# ------------------------------------------------------------------------------------ random weights
def fill_random(layers: list[SynthLayer], seed: int = 0, gain: float = 1.0) -> list[SynthLayer]:
    """Random blobs of the layers' shapes: conv weights ~ N(0, gain^2 / fan_in), biases small; BatchNorm
    blobs hold (mean * s, var * s, s) with s != 1; Scale holds (gamma, beta); deconvolutions get
    bilinear-like positive kernels plus noise."""
    rng = np.random.default_rng(seed)
    for layer in layers:
        blobs = []
        for index, shape in enumerate(layer.shapes):
            if layer.type == "BatchNorm":
                factor = np.float32(rng.uniform(0.5, 2.0))
                stats = {
                    0: rng.normal(0.0, 0.5, shape) * factor,
                    1: rng.uniform(0.5, 2.0, shape) * factor,
                    2: np.full(shape, factor),
                }
                blobs.append(stats[index].astype(np.float32))
            elif layer.type == "Scale":
                value = rng.uniform(0.3, 0.8, shape) if index == 0 else rng.normal(0.0, 0.1, shape)
                blobs.append(value.astype(np.float32))
            elif len(shape) == 4 and layer.type == "Deconvolution":
                blobs.append((rng.uniform(0.0, 0.1, shape) + 1.0 / (shape[2] * shape[3])).astype(np.float32))
            elif len(shape) == 4:
                fan_in = shape[1] * shape[2] * shape[3]
                blobs.append(
                    rng.standard_normal(shape, dtype=np.float32) * np.float32(gain / np.sqrt(fan_in))
                )
            else:
                blobs.append(rng.normal(0.0, 0.05, shape).astype(np.float32))
        layer.blobs = blobs
    return layers


def release_file(
    path: Path, arch: str, seed: int = 0, style: str = "v2", legacy: bool = False, **shape_options: object
) -> tuple[Path, dict[str, SynthLayer]]:
    """Write a random-weight file of release ``arch``; return it and its layers by name."""
    layers = fill_random(RELEASES[arch](**shape_options), seed=seed)  # type: ignore[operator]
    write_caffemodel(path, layers, style=style, legacy=legacy)
    return Path(path), {layer.name: layer for layer in layers}
