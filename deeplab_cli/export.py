"""PyTorch -> ONNX: self-contained models with normalisation inside, dynamic batch/height/width.

The exported graph takes ``image`` float32 [N, 3, H, W] (RGB values 0..255), normalises it as the
registry row says ((x - mean) / std, then RGB -> BGR for BGR networks) and returns ``logits`` float32
[N, C, h, w] at the network's output stride. The spec is embedded as metadata ``deeplab.spec``. Every
export is checked against PyTorch before it is moved into place (temp file + ``os.replace``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deeplab_cli.errors import DeeplabError, UsageError
from deeplab_cli.files import write_bytes
from deeplab_cli.geometry import logits_size
from deeplab_cli.zoo import ModelSpec

if TYPE_CHECKING:  # torch is imported only when a model is built or exported (it takes seconds)
    import torch
    from torch import nn

METADATA_KEY = "deeplab.spec"
OPSET = 17
# The exported fp32 graph must reproduce PyTorch's logits to this max abs difference.
FP32_TOLERANCE = 1e-3
# fp16 weights: logits may move by this fraction of their range; labels must agree on this share.
FP16_RELATIVE_TOLERANCE = 0.05
FP16_MIN_AGREEMENT = 0.98  # on the synthetic check image; 151-class ADE20K scores 0.99
# Emulated int8 dynamic-range convs (nets.quant) round every activation to int8 per pixel: float noise of
# 1e-7 between runtimes flips a few roundings, which then spread. Like the reference runtime itself, such
# a graph is only reproducible statistically. ONNX Runtime vs PyTorch on the (near-tie-rich, synthetic)
# check image, measured: max abs 1.1% / 1.5% / 1.9% of the logit range, labels 0.998 / 0.994 / 0.992 for
# VOC / ADE20K / Cityscapes.
HYBRID_RELATIVE_TOLERANCE = 0.05
HYBRID_MIN_AGREEMENT = 0.98
CHECK_SIZE = 129  # export traces and verifies at about this size (the graph is size-independent)


class ModelFileError(UsageError):
    """An ``.onnx`` file named by the user is missing, unreadable, corrupt or not one of ours (exit 2)."""


@cache
def _normalised_net_class() -> type:
    """``NormalisedNet``, defined on first use so that importing this module does not import torch."""
    import torch
    from torch import nn

    class NormalisedNet(nn.Module):
        """``net`` preceded by the input normalisation of ``spec`` (RGB 0..255 in)."""

        def __init__(self, net: nn.Module, spec: ModelSpec) -> None:
            super().__init__()
            self.net = net
            mean = torch.tensor(spec.mean, dtype=torch.float32).reshape(1, 3, 1, 1)
            std = torch.tensor(spec.std, dtype=torch.float32).reshape(1, 3, 1, 1)
            self.register_buffer("scale", 1.0 / std)
            self.register_buffer("offset", -mean / std)
            self.bgr = spec.channel_order.upper() == "BGR"

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image * self.scale + self.offset
            if self.bgr:
                x = torch.flip(x, dims=[1])
            return self.net(x)

    return NormalisedNet


def wrap_for_export(net: nn.Module, spec: ModelSpec) -> nn.Module:
    """The network with the spec's input normalisation in front, in eval mode."""
    return _normalised_net_class()(net, spec).eval()


def check_input(spec: ModelSpec, net: nn.Module | None = None, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A deterministic, photo-like RGB 0..255 test batch, small but valid for ``net`` (non-square).

    Sizes follow the protocol's step (step * k + 1); a network may declare ``min_input_size``.
    """
    import torch

    step = spec.protocol.size_step
    least = max(CHECK_SIZE, int(getattr(net, "min_input_size", 0)))
    height = step * -(-(least - 1) // step) + 1
    width = height + step
    generator = torch.Generator().manual_seed(seed)
    # smooth random images: low-resolution noise upsampled, so activations look like a photo's
    low = torch.rand(batch, 3, height // 16 + 2, width // 16 + 2, generator=generator) * 255
    return torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)


def _export_legacy(model: nn.Module, example: torch.Tensor, target: io.BytesIO) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            target,
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            opset_version=OPSET,
            dynamic_axes={
                "image": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "logits_height", 3: "logits_width"},
            },
            do_constant_folding=True,
        )


def _fold_same_padding(proto):  # type: ignore[no-untyped-def]
    """Replace each dynamic Pad -> strided Conv pair (TF SAME padding) by Conv(auto_pad=SAME_UPPER).

    ONNX's SAME_UPPER puts the odd pixel at the end, as TensorFlow does, and lets the runtime fuse the
    padding into the convolution; the shape arithmetic that fed the Pad becomes dead and is removed.
    """
    import onnx

    graph = proto.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed = set()
    for node in graph.node:
        if node.op_type != "Pad" or (len(node.input) > 2 and node.input[2]):
            continue
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        users = consumers.get(node.output[0], [])
        if mode != b"constant" or len(users) != 1 or users[0].op_type != "Conv":
            continue
        conv = users[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        if any(p != 0 for p in attrs.get("pads", [])) or any(d != 1 for d in attrs.get("dilations", [])):
            continue
        conv.input[0] = node.input[0]
        kept = [a for a in conv.attribute if a.name not in ("pads", "auto_pad")]
        del conv.attribute[:]
        conv.attribute.extend(kept)
        conv.attribute.append(onnx.helper.make_attribute("auto_pad", "SAME_UPPER"))
        removed.add(id(node))
    nodes = [n for n in graph.node if id(n) not in removed]
    live = {o.name for o in graph.output}
    kept_nodes = []
    for node in reversed(nodes):  # nodes are topologically sorted: sweep backwards
        if any(o in live for o in node.output):
            kept_nodes.append(node)
            live.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept_nodes))
    initializers = [i for i in graph.initializer if i.name in live]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return proto


def _to_fp16(model_proto):  # type: ignore[no-untyped-def]
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_float_to_float16(model_proto, keep_io_types=True)


def _run_onnx(data: bytes, image: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": image})[0]


def _verify(data: bytes, model: nn.Module, spec: ModelSpec, fp16: bool) -> float:
    import torch

    from deeplab_cli.nets.quant import has_hybrid

    image = check_input(spec, model.net)
    with torch.no_grad():
        expected = model(image).numpy()
    got = _run_onnx(data, image.numpy())
    if got.shape != expected.shape:
        raise DeeplabError(
            f"ONNX export of {spec.name}: output shape {got.shape} != PyTorch {expected.shape}"
        )
    stride_size = logits_size((image.shape[2], image.shape[3]), spec.output_stride)
    if got.shape[2:] != stride_size:
        raise DeeplabError(
            f"{spec.name}: logits of {got.shape[2]}x{got.shape[3]} for a {image.shape[2]}x{image.shape[3]} "
            f"input do not match the registry's output stride {spec.output_stride}"
        )
    diff = float(np.abs(got - expected).max())
    hybrid = not fp16 and has_hybrid(model)
    if not fp16 and not hybrid and diff > FP32_TOLERANCE:
        raise DeeplabError(f"ONNX export of {spec.name} differs from PyTorch: max abs diff {diff:.3g}")
    if fp16 or hybrid:
        agreement = float((got.argmax(1) == expected.argmax(1)).mean())
        relative, least = (
            (FP16_RELATIVE_TOLERANCE, FP16_MIN_AGREEMENT)
            if fp16
            else (HYBRID_RELATIVE_TOLERANCE, HYBRID_MIN_AGREEMENT)
        )
        bound = relative * float(np.abs(expected).max())
        if diff > bound or agreement < least:
            kind = "fp16 ONNX" if fp16 else "ONNX (int8 emulation)"
            raise DeeplabError(
                f"{kind} export of {spec.name} differs from PyTorch: max abs diff {diff:.3g} "
                f"(bound {bound:.3g}), label agreement {agreement:.4f}"
            )
    return diff


def export_onnx(net: nn.Module, spec: ModelSpec, path: Path, *, fp16: bool = False) -> Path:
    """Export ``net`` (un-normalised logits network) for ``spec`` to one self-contained ONNX file.

    With ``fp16`` the weights and compute are float16 while ``image`` and ``logits`` stay float32;
    emulated int8 dynamic-range convolutions then run as plain convs (per-pixel int8 rounding carried
    out in float16 would not reproduce the reference anyway). The file is checked against PyTorch on a
    test image and written atomically.
    """
    import onnx

    from deeplab_cli.nets.quant import has_hybrid, without_hybrid

    path = Path(path)
    if fp16 and has_hybrid(net):
        net = without_hybrid(net)
    model = wrap_for_export(net, spec)
    buffer = io.BytesIO()
    _export_legacy(model, check_input(spec, net), buffer)
    proto = _fold_same_padding(onnx.load_from_string(buffer.getvalue()))
    if fp16:
        proto = _to_fp16(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, spec.to_json()
    proto.producer_name = "deeplab-cli"
    data = proto.SerializeToString()
    _verify(data, model, spec, fp16)
    return write_bytes(path, data)


def spec_from_metadata(metadata: Mapping[str, str], path: Path) -> ModelSpec:
    """The spec stored under :data:`METADATA_KEY` in an ONNX file's metadata (as a session returns it)."""
    if METADATA_KEY not in metadata:
        raise ModelFileError(f"{path} has no {METADATA_KEY!r} metadata: not exported by deeplab-cli")
    try:
        return ModelSpec.from_json(metadata[METADATA_KEY])
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelFileError(f"{path}: unreadable {METADATA_KEY!r} metadata ({exc})") from exc


def read_spec(path: Path) -> ModelSpec:
    """The spec embedded in an exported ONNX file; a missing, corrupt or foreign file is a usage error."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path} is not a valid ONNX file (truncated or corrupt)") from exc
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    return spec_from_metadata(metadata, path)


def convert_to_onnx(source_path: Path, spec: ModelSpec, onnx_path: Path, *, fp16: bool = False) -> Path:
    """THE conversion: load the released weights at ``source_path`` for ``spec`` and export them.

    Used for the cache's float32 models and for ``deeplab export --fp16`` alike.
    """
    from deeplab_cli.importers import load_weights

    net = load_weights(Path(source_path), spec)
    return export_onnx(net, spec, Path(onnx_path), fp16=fp16)
