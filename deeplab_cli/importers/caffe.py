"""Caffe ``.caffemodel`` weights: a hand-written protobuf wire-format reader and the mapping onto ``nets``.

Only the few messages that carry weights are decoded (field numbers from Caffe's ``caffe.proto``)::

    NetParameter      { name = 1; layers = 2 (V1LayerParameter); layer = 100 (LayerParameter) }
    V1LayerParameter  { layer = 1 (V0LayerParameter); name = 4; type = 5 (enum); blobs = 6 }
    V0LayerParameter  { name = 1; type = 2 (string); blobs = 50 }
    LayerParameter    { name = 1; type = 2 (string); blobs = 7; batch_norm_param = 139 { eps = 3 } }
    BlobProto         { num = 1; channels = 2; height = 3; width = 4; data = 5 (float, packed or not);
                        shape = 7 (BlobShape { dim = 1 (int64, packed or not) }); double_data = 8 }

Every other field is skipped by its wire type. The reader is strict: a varint longer than 10 bytes, a
field that runs past the end of its message, a wire type that does not fit a known field, a text
prototxt given instead of weights, or a blob whose element count does not match its shape raise
:class:`~deeplab_cli.errors.WeightsError` naming the file and, where known, the layer.

:func:`load_caffemodel` builds the network for a registry row and fills it by an explicit list of
Caffe layer names per architecture. Caffe ``BatchNorm`` (blobs: mean * s, variance * s, s) followed by
``Scale`` (gamma, beta) is folded into the preceding convolution:
``a = gamma / sqrt(var + eps)``, ``W' = a W``, ``b' = a (b - mean) + beta``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deeplab_cli.errors import WeightsError

if TYPE_CHECKING:
    from torch import nn

    from deeplab_cli.zoo import ModelSpec

# Wire types of the protobuf encoding.
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
BN_EPS_DEFAULT = 1e-5  # Caffe's BatchNormParameter.eps default; DeepLab v2's prototxt does not set it

# V1LayerParameter.LayerType values of the layers that matter here (the rest are reported as "V1:<n>").
V1_TYPES = {
    3: "Concat",
    4: "Convolution",
    5: "Data",
    6: "Dropout",
    14: "InnerProduct",
    15: "LRN",
    17: "Pooling",
    18: "ReLU",
    20: "Softmax",
    21: "SoftmaxWithLoss",
    22: "Split",
    25: "Eltwise",
    39: "Deconvolution",
}


@dataclass(frozen=True)
class CaffeLayer:
    """One layer of a ``.caffemodel``: its name, type and weight blobs (float32, or float64 from
    ``double_data``), each shaped as the file says. ``eps`` is BatchNorm's epsilon when recorded."""

    name: str
    type: str
    blobs: list[np.ndarray] = field(default_factory=list)
    eps: float | None = None


class _WireError(Exception):
    """A malformed protobuf message (turned into a WeightsError with the file and layer named)."""


# --------------------------------------------------------------------------------------- wire format
def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos`` (at most 10 bytes, not past ``end``)."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            raise _WireError("a varint runs past the end of its message (truncated file?)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise _WireError("a varint is longer than 10 bytes (corrupt file)")


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(field number, wire type, value, position)`` for each field in ``buf[start:end]``.

    For VARINT ``value`` is the number; for LEN, FIXED32 and FIXED64 it is the payload start and
    ``position`` the payload end (for VARINT ``position`` is the next field's start).
    """
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _WireError("field number 0 (corrupt file)")
        if wire == VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
            continue
        if wire == LEN:
            length, pos = _varint(buf, pos, end)
            stop = pos + length
        elif wire == FIXED32:
            stop = pos + 4
        elif wire == FIXED64:
            stop = pos + 8
        else:
            raise _WireError(f"unsupported wire type {wire} in field {number} (corrupt file?)")
        if stop > end:
            raise _WireError(
                f"field {number} runs {stop - end} bytes past the end of its message (truncated?)"
            )
        yield number, wire, pos, stop
        pos = stop


def _expect(number: int, wire: int, allowed: tuple[int, ...], what: str) -> None:
    if wire not in allowed:
        raise _WireError(
            f"field {number} ({what}) has wire type {wire}, expected {' or '.join(map(str, allowed))}"
        )


def _text(buf: bytes, start: int, stop: int, what: str) -> str:
    try:
        return bytes(buf[start:stop]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _WireError(f"{what} is not valid UTF-8 (corrupt file?)") from exc


def _parse_blob(buf: bytes, start: int, end: int) -> np.ndarray:
    legacy: dict[int, int] = {}
    shape: list[int] | None = None
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    for number, wire, a, b in _fields(buf, start, end):
        if number in (1, 2, 3, 4):
            _expect(number, wire, (VARINT,), "blob num/channels/height/width")
            legacy[number] = a if a < 1 << 63 else a - (1 << 64)
        elif number == 5:
            _expect(number, wire, (LEN, FIXED32), "blob data")
            if (b - a) % 4:
                raise _WireError("packed float data has a length that is not a multiple of 4")
            floats.append(np.frombuffer(buf, dtype="<f4", count=(b - a) // 4, offset=a))
        elif number == 8:
            _expect(number, wire, (LEN, FIXED64), "blob double_data")
            if (b - a) % 8:
                raise _WireError("packed double data has a length that is not a multiple of 8")
            doubles.append(np.frombuffer(buf, dtype="<f8", count=(b - a) // 8, offset=a))
        elif number == 7:
            _expect(number, wire, (LEN,), "blob shape")
            shape = (shape or []) + _parse_shape(buf, a, b)
    if shape is None:
        shape = [legacy.get(n, 0) for n in (1, 2, 3, 4)] if legacy else None
    data = np.concatenate(floats) if floats else np.concatenate(doubles) if doubles else np.zeros(0, "<f4")
    if shape is None:
        shape = [data.size]
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.int64)) != data.size:
        raise _WireError(f"blob of shape {tuple(shape)} holds {data.size} values")
    return data.astype(data.dtype.newbyteorder("="), copy=True).reshape(shape)


def _parse_shape(buf: bytes, start: int, end: int) -> list[int]:
    dims: list[int] = []
    for number, wire, a, b in _fields(buf, start, end):
        if number != 1:
            continue
        _expect(number, wire, (VARINT, LEN), "shape dim")
        if wire == VARINT:
            dims.append(a)
            continue
        pos = a
        while pos < b:
            value, pos = _varint(buf, pos, b)
            dims.append(value)
    return [d if d < 1 << 63 else d - (1 << 64) for d in dims]


def _parse_eps(buf: bytes, start: int, end: int) -> float | None:
    for number, wire, a, _b in _fields(buf, start, end):
        if number == 3:
            _expect(number, wire, (FIXED32,), "batch_norm_param.eps")
            return struct.unpack_from("<f", buf, a)[0]
    return None


# Per layer message: (name field, type field, type is an enum, blobs field)
_LAYER_STYLES = {"v1": (4, 5, True, 6), "v2": (1, 2, False, 7), "v0": (1, 2, False, 50)}


def _parse_layer(buf: bytes, start: int, end: int, style: str) -> CaffeLayer:
    name_field, type_field, type_enum, blobs_field = _LAYER_STYLES[style]
    name, kind, blobs, eps = "", "", [], None
    for number, wire, a, b in _fields(buf, start, end):
        if number == name_field:
            _expect(number, wire, (LEN,), "layer name")
            name = _text(buf, a, b, "layer name")
        elif number == type_field:
            if type_enum:
                _expect(number, wire, (VARINT,), "layer type")
                kind = V1_TYPES.get(a, f"V1:{a}")
            else:
                _expect(number, wire, (LEN,), "layer type")
                kind = _text(buf, a, b, "layer type")
        elif number == blobs_field:
            _expect(number, wire, (LEN,), "blobs")
            try:
                blobs.append(_parse_blob(buf, a, b))
            except _WireError as exc:
                raise _WireError(f"blob {len(blobs)} of layer {name or '?'!r}: {exc}") from None
        elif style == "v2" and number == 139:
            _expect(number, wire, (LEN,), "batch_norm_param")
            eps = _parse_eps(buf, a, b)
        elif style == "v1" and number == 1:
            _expect(number, wire, (LEN,), "V0 layer")
            inner = _parse_layer(buf, a, b, "v0")
            name, kind, blobs = name or inner.name, kind or inner.type, blobs or inner.blobs
    return CaffeLayer(name, kind, blobs, eps)


def _peek_name(buf: bytes, start: int, end: int, style: str) -> str:
    """Best-effort name of a layer whose message is damaged (for the error message)."""
    name_field = _LAYER_STYLES[style][0]
    try:
        for number, wire, a, b in _fields(buf, start, min(end, len(buf))):
            if number == name_field and wire == LEN:
                return _text(buf, a, b, "layer name")
    except _WireError:
        pass
    return ""


def _looks_like_text(head: bytes) -> bool:
    """A prototxt (or other text) rather than a binary protobuf: only printable ASCII and whitespace."""
    return bool(head) and all(32 <= c < 127 or c in b"\t\n\r" for c in head)


def _parse_net(buf: bytes) -> dict[str, CaffeLayer]:
    layers: dict[str, CaffeLayer] = {}
    index = 0
    pos, end = 0, len(buf)
    while pos < end:
        key, after_key = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number in (2, 100) and wire == LEN:
            style = "v1" if number == 2 else "v2"
            length, start = _varint(buf, after_key, end)
            stop = start + length
            if stop > end:
                name = _peek_name(buf, start, stop, style)
                raise _WireError(
                    f"layer #{index} {name!r} needs {stop - end} more bytes than the file holds (truncated)"
                )
            try:
                layer = _parse_layer(buf, start, stop, style)
            except _WireError as exc:
                name = _peek_name(buf, start, stop, style)
                raise _WireError(f"layer #{index} {name!r}: {exc}") from None
            index += 1
            if layer.name not in layers or (layer.blobs and not layers[layer.name].blobs):
                layers[layer.name] = layer
            pos = stop
            continue
        if number in (2, 100):
            raise _WireError(f"field {number} (layers) has wire type {wire}, expected {LEN}")
        # any other NetParameter field (name, input, input_dim, state, ...): skip it by wire type
        for _number, _wire, _a, nxt in _fields(buf, pos, end):
            pos = nxt
            break
    return layers


def read_caffemodel(path: Path | str) -> dict[str, CaffeLayer]:
    """All layers of a ``.caffemodel`` in file order, by name (``layers`` V1 and ``layer`` styles)."""
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read Caffe weights {path}: {exc.strerror or exc}") from exc
    if not buf:
        raise WeightsError(f"{path.name} is empty, not a .caffemodel")
    if _looks_like_text(buf[:512]):
        raise WeightsError(
            f"{path.name} is text (a .prototxt network definition?), not a binary .caffemodel with weights"
        )
    try:
        layers = _parse_net(buf)
    except _WireError as exc:
        raise WeightsError(f"corrupt .caffemodel {path.name}: {exc}") from None
    if not any(layer.blobs for layer in layers.values()):
        raise WeightsError(f"{path.name} holds no layer with weights: not a trained .caffemodel")
    return layers


# ------------------------------------------------------------------------------------ mapping to nets
@dataclass(frozen=True)
class Target:
    """A network part filled from Caffe layers: a convolution (with BatchNorm + Scale folded into it when
    ``bn`` is set), a transposed convolution, or a per-channel scale buffer.

    ``layer`` is the Caffe name; when the file lacks it, ``pattern`` (a regular expression that must
    match exactly one layer with weights) finds classifiers named after their dataset (``fc8_*``).
    """

    module: Any
    layer: str
    bn: str | None = None
    scale: str | None = None
    pattern: str | None = None
    kind: str = "conv"  # conv | deconv | channel_scale


def load_caffemodel(path: Path, spec: ModelSpec) -> nn.Module:
    """Build ``spec``'s network and fill every parameter from the ``.caffemodel`` at ``path``."""
    import torch

    from deeplab_cli.nets import build

    layers = read_caffemodel(path)
    net = build(spec)
    with torch.no_grad():
        for target in caffe_targets(net, spec.arch):
            _fill(target, layers, Path(path).name, spec.arch)
    return net.eval()


def caffe_targets(net: nn.Module, arch: str) -> list[Target]:
    """The explicit Caffe layer -> module list for a network of architecture ``arch``."""
    builders = {
        "deeplab-v1-largefov": _vgg_targets,
        "deeplab-v2-vgg16": _vgg_targets,
        "deeplab-v2-resnet101": _resnet_targets,
        "fcn8s": _fcn_targets,
    }
    if arch not in builders:
        raise WeightsError(f"architecture {arch!r} cannot be loaded from Caffe weights")
    return builders[arch](getattr(net, "base", net))  # a multi-scale wrapper holds the network as .base


def _vgg_targets(net: nn.Module) -> list[Target]:
    targets = []
    for name in net.conv_names():
        if name.startswith("fc8"):
            suffix = name[3:]  # "" or "_1" ... "_4" (ASPP-L branches)
            pattern = rf"fc8(_[A-Za-z0-9]+)*{suffix}" if suffix else r"fc8(_[A-Za-z0-9]+)*"
            targets.append(Target(getattr(net, name), f"fc8_voc12{suffix}", pattern=pattern))
        else:
            targets.append(Target(getattr(net, name), name))
    return targets


def _resnet_targets(net: nn.Module) -> list[Target]:
    targets = [Target(net.conv1, "conv1", bn="bn_conv1", scale="scale_conv1")]
    for block_name, block in net.blocks.items():
        unit = block_name[3:]  # "2a", "4b17"
        for branch in ("branch1", "branch2a", "branch2b", "branch2c"):
            conv = getattr(block, branch)
            if conv is not None:
                targets.append(
                    Target(
                        conv, f"{block_name}_{branch}", bn=f"bn{unit}_{branch}", scale=f"scale{unit}_{branch}"
                    )
                )
    for index, head in enumerate(net.aspp):
        targets.append(Target(head, f"fc1_voc12_c{index}", pattern=rf"fc1_[A-Za-z0-9_]+_c{index}"))
    return targets


def _fcn_targets(net: nn.Module) -> list[Target]:
    names = [f"conv{s}_{i}" for s, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)]
    names += ["fc6", "fc7", "score_fr", "score_pool4", "score_pool3"]
    targets = [Target(getattr(net, name), name) for name in names]
    targets += [Target(getattr(net, n), n, kind="deconv") for n in ("upscore2", "upscore_pool4", "upscore8")]
    if net.at_once:
        targets += [Target(getattr(net, n), n, kind="channel_scale") for n in ("scale_pool4", "scale_pool3")]
    return targets


def _resolve(target: Target, layers: dict[str, CaffeLayer], file: str, arch: str) -> CaffeLayer:
    if target.layer in layers and layers[target.layer].blobs:
        return layers[target.layer]
    if target.pattern is None:
        state = "has no weights" if target.layer in layers else "is missing"
        raise WeightsError(f"{file}: layer {target.layer!r} {state}: not a {arch} .caffemodel")
    regex = re.compile(target.pattern)
    found = [layer for name, layer in layers.items() if regex.fullmatch(name) and layer.blobs]
    if len(found) != 1:
        what = "is missing" if not found else f"is ambiguous ({', '.join(f.name for f in found)})"
        raise WeightsError(f"{file}: layer {target.layer!r} {what}: not a {arch} .caffemodel")
    return found[0]


def _named_layer(name: str, layers: dict[str, CaffeLayer], file: str, arch: str) -> CaffeLayer:
    return _resolve(Target(module=None, layer=name), layers, file, arch)


def _blob(layer: CaffeLayer, index: int, shape: tuple[int, ...], file: str) -> np.ndarray:
    """Blob ``index`` of ``layer`` reshaped to ``shape``, if its shape fits (leading 1s ignored)."""
    if index >= len(layer.blobs):
        raise WeightsError(f"{file}: layer {layer.name!r} has {len(layer.blobs)} blob(s), needs blob {index}")
    blob = layer.blobs[index]
    if _strip_ones(blob.shape) != _strip_ones(shape):
        raise WeightsError(
            f"{file}: layer {layer.name!r} blob {index} has shape {tuple(blob.shape)}, the network needs "
            f"{tuple(shape)}"
        )
    return blob.reshape(shape).astype(np.float32)


def _strip_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    dims = list(shape)
    while dims and dims[0] == 1:
        dims.pop(0)
    return tuple(dims)


def fold_batchnorm(
    weight: np.ndarray,
    bias: np.ndarray,
    bn_blobs: list[np.ndarray],
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float = BN_EPS_DEFAULT,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold Caffe BatchNorm (``mean * s, var * s, s``) and Scale (``gamma, beta``) into a conv's W, b."""
    mean, var, factor = (np.asarray(b, dtype=np.float64).reshape(-1) for b in bn_blobs[:3])
    scale = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    mean, var = mean * scale, var * scale
    alpha = np.asarray(gamma, np.float64) / np.sqrt(var + eps)
    new_weight = weight.astype(np.float64) * alpha.reshape(-1, *([1] * (weight.ndim - 1)))
    new_bias = alpha * (bias.astype(np.float64) - mean) + np.asarray(beta, np.float64)
    return new_weight.astype(np.float32), new_bias.astype(np.float32)


def _fill(target: Target, layers: dict[str, CaffeLayer], file: str, arch: str) -> None:
    import torch

    module = target.module
    layer = _resolve(target, layers, file, arch)
    if target.kind == "channel_scale":
        module.copy_(torch.from_numpy(_blob(layer, 0, tuple(module.shape), file)))
        return
    weight = _blob(layer, 0, tuple(module.weight.shape), file)
    out_channels = module.weight.shape[1] if target.kind == "deconv" else module.weight.shape[0]
    if len(layer.blobs) > 1:
        bias = _blob(layer, 1, (out_channels,), file)
    else:
        bias = np.zeros(out_channels, np.float32)
        if module.bias is not None and target.bn is None:
            raise WeightsError(f"{file}: layer {layer.name!r} has no bias blob, the network needs one")
    if target.bn is not None:
        bn = _named_layer(target.bn, layers, file, arch)
        scale = _named_layer(target.scale, layers, file, arch) if target.scale else None
        if len(bn.blobs) < 3:
            raise WeightsError(f"{file}: BatchNorm layer {bn.name!r} has {len(bn.blobs)} blobs, needs 3")
        stats = [_blob(bn, i, (out_channels,), file) for i in range(2)] + [_blob(bn, 2, (1,), file)]
        gamma = _blob(scale, 0, (out_channels,), file) if scale else np.ones(out_channels, np.float32)
        has_beta = scale is not None and len(scale.blobs) > 1
        beta = _blob(scale, 1, (out_channels,), file) if has_beta else np.zeros(out_channels, np.float32)
        weight, bias = fold_batchnorm(weight, bias, stats, gamma, beta, bn.eps or BN_EPS_DEFAULT)
    module.weight.copy_(torch.from_numpy(weight))
    if module.bias is not None:
        module.bias.copy_(torch.from_numpy(bias))
    elif np.any(bias):
        raise WeightsError(f"{file}: layer {layer.name!r} has a bias the network has no place for")
