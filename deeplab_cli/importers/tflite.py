"""Import TFLite DeepLab flatbuffers into the PyTorch networks of :mod:`deeplab_cli.nets`.

The graph is walked in dataflow order (depth first from the output, inputs in listed order), which is
independent of how the converter ordered the operators. Every convolution becomes a :class:`LayerRecord`
(kind, kernel, stride, dilation, activation, float32 OIHW weight and bias) and is matched one to one,
with every attribute and shape checked, to the network's ``conv_layers()``.

Weight encodings handled: float32, float16 and int8/uint8/int32 with (per-channel) scale and zero
point, either stored directly on the conv input (dynamic-range "hybrid" ops, full-integer models) or
behind a DEQUANTIZE op. Hybrid CONV_2D ops are marked (``LayerRecord.hybrid``) and loaded as
:class:`~deeplab_cli.nets.quant.HybridQuantConv2d`, which quantizes its input per pixel exactly as the
reference runtime (XNNPACK) does. Patterns folded into plain convolutions:

- SPACE_TO_BATCH_ND -> conv -> BATCH_TO_SPACE_ND -> MUL -> ADD: an atrous conv (dilation = block
  shape, padding = dilation, as TF's SAME padding puts it) followed by the unfolded batch norm; the
  MUL scale is folded into the weights and bias, the ADD's fused activation is the layer's.
- conv -> HARD_SWISH: hard-swish activation; conv(relu6) -> MUL(scalar): TF's hard sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deeplab_cli.errors import WeightsError
from deeplab_cli.nets import build
from deeplab_cli.nets.mobilenet import HARD_SIGMOID_SCALE, ConvAct
from deeplab_cli.nets.quant import HybridQuantConv2d
from deeplab_cli.zoo import ModelSpec

_FUSED_ACT = {0: "none", 1: "relu", 3: "relu6"}
_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
_PADDING = {0: "SAME", 1: "VALID"}


@dataclass
class LayerRecord:
    """One convolution of the TFLite graph, in PyTorch layout."""

    op_index: int
    name: str
    depthwise: bool
    kernel: int
    stride: int
    dilation: int
    act: str
    weight: np.ndarray  # OIHW (depthwise: C x 1 x kh x kw)
    bias: np.ndarray
    tensors: list[int] = field(default_factory=list)  # constant tensors this layer consumed
    input_tensor: int = -1  # graph tensors holding the layer's input and its activated output
    output_tensor: int = -1
    hybrid: bool = False  # dynamic-range op: int8 weights on a float-input CONV_2D (int8 x int8 at run time)
    nonnegative_input: bool = False  # the input follows a ReLU (set for hybrid layers only)


class TFLiteGraph:
    """A read-only view of subgraph 0 of a TFLite flatbuffer: ops, tensors and constant values."""

    def __init__(self, data: bytes, name: str) -> None:
        import tflite
        from tflite.BuiltinOperator import BuiltinOperator

        self.name = name
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise WeightsError(f"{name}: not a TFLite flatbuffer (file identifier missing)")
        self._data = data
        self.model = tflite.Model.GetRootAsModel(data, 0)
        self.graph = self.model.Subgraphs(0)
        names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
        self.ops: list[tuple[str, list[int], list[int], Any]] = []
        for k in range(self.graph.OperatorsLength()):
            op = self.graph.Operators(k)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            inputs = [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else []
            outputs = [int(i) for i in op.OutputsAsNumpy()] if op.OutputsLength() else []
            self.ops.append((names.get(builtin, str(builtin)), inputs, outputs, op))
        self.producer = {t: k for k, (_, _, outs, _) in enumerate(self.ops) for t in outs}
        self.consumers: dict[int, list[int]] = {}
        for k, (_, inputs, _, _) in enumerate(self.ops):
            for t in inputs:
                self.consumers.setdefault(t, []).append(k)
        self.outputs = [int(i) for i in self.graph.OutputsAsNumpy()]

    def tensor_name(self, index: int) -> str:
        return self.graph.Tensors(index).Name().decode(errors="replace")

    def shape(self, index: int) -> tuple[int, ...]:
        tensor = self.graph.Tensors(index)
        return tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()

    def _raw(self, index: int) -> np.ndarray | None:
        tensor = self.graph.Tensors(index)
        buffer = self.model.Buffers(tensor.Buffer())
        offset = buffer.Offset() if hasattr(buffer, "Offset") else 0
        if offset > 1:
            raw = np.frombuffer(self._data, np.uint8, count=buffer.Size(), offset=offset)
        elif buffer.DataLength():
            raw = buffer.DataAsNumpy()
        else:
            return None
        dtype = _DTYPES.get(tensor.Type())
        if dtype is None:
            raise WeightsError(
                f"{self.name}: tensor {self.tensor_name(index)!r} has unsupported type {tensor.Type()}"
            )
        shape = self.shape(index)
        values = np.frombuffer(raw.tobytes(), dtype=dtype)
        if values.size != int(np.prod(shape, dtype=np.int64)):
            raise WeightsError(
                f"{self.name}: tensor {self.tensor_name(index)!r} has {values.size} values for {shape}"
            )
        return values.reshape(shape)

    def constant(self, index: int) -> tuple[np.ndarray, list[int]] | None:
        """The float32 value of a constant tensor (dequantized), or of a DEQUANTIZE of one; with the
        indices of the stored tensors it came from. ``None`` for activations."""
        raw = self._raw(index)
        if raw is not None:
            return self._dequantize(index, raw), [index]
        producer = self.producer.get(index)
        if producer is not None and self.ops[producer][0] == "DEQUANTIZE":
            source = self.ops[producer][1][0]
            raw = self._raw(source)
            if raw is not None:
                return self._dequantize(source, raw), [source]
        return None

    def _dequantize(self, index: int, raw: np.ndarray) -> np.ndarray:
        if raw.dtype in (np.float32, np.float16):
            return raw.astype(np.float32)
        quant = self.graph.Tensors(index).Quantization()
        if quant is None or quant.ScaleLength() == 0:
            if raw.dtype in (np.int32, np.int64):
                return raw  # plain integers (shapes, block sizes)
            raise WeightsError(
                f"{self.name}: integer tensor {self.tensor_name(index)!r} has no quantization scale"
            )
        scale = quant.ScaleAsNumpy().astype(np.float64)
        zero = quant.ZeroPointAsNumpy().astype(np.float64) if quant.ZeroPointLength() else np.zeros(1)
        if scale.size > 1:
            axis = quant.QuantizedDimension()
            shape = [1] * raw.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return ((raw.astype(np.float64) - zero) * scale).astype(np.float32)

    def options(self, op: Any, cls_name: str) -> Any:
        import tflite

        table = op.BuiltinOptions()
        if table is None:
            return None
        opts = getattr(tflite, cls_name)()
        opts.Init(table.Bytes, table.Pos)
        return opts

    def dataflow_order(self) -> list[int]:
        """Operator indices in depth-first post-order from the graph outputs (inputs in listed order)."""
        order: list[int] = []
        seen: set[int] = set()
        for out in self.outputs:
            stack: list[tuple[int, bool]] = [(self.producer[out], False)] if out in self.producer else []
            while stack:
                k, expanded = stack.pop()
                if expanded:
                    order.append(k)
                    continue
                if k in seen:
                    continue
                seen.add(k)
                stack.append((k, True))
                for t in reversed(self.ops[k][1]):
                    if t in self.producer and self.producer[t] not in seen:
                        stack.append((self.producer[t], False))
        return order

    def sole_consumer(self, tensor: int) -> tuple[int, str] | None:
        consumers = self.consumers.get(tensor, [])
        if len(consumers) != 1:
            return None
        return consumers[0], self.ops[consumers[0]][0]


def _conv_record(graph: TFLiteGraph, k: int) -> LayerRecord:
    kind, inputs, outputs, op = graph.ops[k]
    depthwise = kind == "DEPTHWISE_CONV_2D"
    opts = graph.options(op, "DepthwiseConv2DOptions" if depthwise else "Conv2DOptions")
    weight_c = graph.constant(inputs[1])
    bias_c = graph.constant(inputs[2]) if len(inputs) > 2 and inputs[2] >= 0 else None
    if weight_c is None:
        raise WeightsError(f"{graph.name}: op {k} ({kind}) has no constant weights")
    weight, used = weight_c
    out_channels = weight.shape[3] if depthwise else weight.shape[0]
    bias = bias_c[0] if bias_c else np.zeros(out_channels, np.float32)
    used += bias_c[1] if bias_c else []
    if depthwise:
        if opts.DepthMultiplier() not in (0, 1):
            raise WeightsError(
                f"{graph.name}: op {k}: depth multiplier {opts.DepthMultiplier()} is not supported"
            )
        weight = weight.transpose(3, 0, 1, 2)  # 1HWC -> C1HW
    else:
        weight = weight.transpose(0, 3, 1, 2)  # OHWI -> OIHW
    if weight.shape[2] != weight.shape[3] or opts.StrideH() != opts.StrideW():
        raise WeightsError(f"{graph.name}: op {k}: non-square kernels or strides are not supported")
    dilation = opts.DilationHFactor()
    act = _FUSED_ACT.get(opts.FusedActivationFunction(), f"fused#{opts.FusedActivationFunction()}")
    padding = _PADDING.get(opts.Padding(), "?")
    name = graph.tensor_name(outputs[0]).split(";")[0]  # fused ops carry ';'-joined names
    record = LayerRecord(
        k, name, depthwise, weight.shape[2], opts.StrideH(), dilation, act, weight, bias, used
    )
    record.input_tensor, record.output_tensor = inputs[0], outputs[0]
    record.hybrid = _is_hybrid(graph, kind, inputs)

    producer = graph.producer.get(inputs[0])
    if producer is not None and graph.ops[producer][0] == "SPACE_TO_BATCH_ND":
        _fold_space_to_batch(graph, record, producer, outputs[0], padding)
    elif padding != "SAME" and record.kernel > 1:
        raise WeightsError(f"{graph.name}: op {k} ({name}) uses {padding} padding outside an atrous pattern")
    else:
        _trailing_activation(graph, record, outputs[0])
    return record


def _is_hybrid(graph: TFLiteGraph, kind: str, inputs: list[int]) -> bool:
    """A dynamic-range conv: float32 input, int8 weights stored on the op itself (no DEQUANTIZE).

    XNNPACK runs these as int8 x int8 with the input quantized per pixel (see :mod:`deeplab_cli.nets.quant`);
    only CONV_2D is emulated (the released files have no hybrid depthwise convs).
    """
    tensors = graph.graph.Tensors
    return (
        kind == "CONV_2D"
        and tensors(inputs[0]).Type() == 0
        and tensors(inputs[1]).Type() == 9
        and graph.producer.get(inputs[1]) is None
    )


def _fold_space_to_batch(
    graph: TFLiteGraph, record: LayerRecord, s2b: int, conv_out: int, padding: str
) -> None:
    """S2B -> conv -> B2S -> MUL(scale) -> ADD(shift, act): fold into a dilated conv."""
    block = graph.constant(graph.ops[s2b][1][1])
    if block is None or len(set(block[0].astype(int).tolist())) != 1:
        raise WeightsError(
            f"{graph.name}: op {s2b}: SPACE_TO_BATCH_ND block shape must be constant and square"
        )
    chain = []
    tensor = conv_out
    for expected in ("BATCH_TO_SPACE_ND", "MUL", "ADD"):
        nxt = graph.sole_consumer(tensor)
        if nxt is None or nxt[1] != expected:
            raise WeightsError(f"{graph.name}: atrous conv {record.name!r} is not followed by {expected}")
        chain.append(nxt[0])
        tensor = graph.ops[nxt[0]][2][0]
    rate = int(block[0].flat[0])
    pads = graph.constant(graph.ops[s2b][1][2])
    crops = graph.constant(graph.ops[chain[0]][1][2])
    # a dilated SAME conv: the padding before the data is the rate (the kernel's half-extent), the conv
    # inside is VALID, and only the extra bottom/right padding is cropped again
    half = rate * (record.kernel - 1) // 2
    if (
        pads is None
        or crops is None
        or pads[0].reshape(-1)[[0, 2]].tolist() != [half, half]
        or crops[0].reshape(-1)[[0, 2]].tolist() != [0, 0]
        or padding != "VALID"
    ):
        raise WeightsError(
            f"{graph.name}: atrous conv {record.name!r} is not a SAME-padded dilated convolution"
        )
    record.dilation = rate
    record.input_tensor, record.output_tensor = graph.ops[s2b][1][0], tensor
    scale = graph.constant(graph.ops[chain[1]][1][1])
    shift = graph.constant(graph.ops[chain[2]][1][1])
    if scale is None or shift is None:
        raise WeightsError(f"{graph.name}: batch norm after {record.name!r} has no constant scale/shift")
    record.weight = record.weight * scale[0].reshape(-1, 1, 1, 1)
    record.bias = record.bias * scale[0] + shift[0]
    record.tensors += scale[1] + shift[1]
    if record.act != "none":
        raise WeightsError(
            f"{graph.name}: atrous conv {record.name!r} has an activation before its batch norm"
        )
    add_opts = graph.options(graph.ops[chain[2]][3], "AddOptions")
    record.act = _FUSED_ACT.get(add_opts.FusedActivationFunction() if add_opts else 0, "?")


def _trailing_activation(graph: TFLiteGraph, record: LayerRecord, conv_out: int) -> None:
    nxt = graph.sole_consumer(conv_out)
    if nxt is None:
        return
    k, kind = nxt
    if kind == "HARD_SWISH" and record.act == "none":
        record.act = "hswish"
        record.output_tensor = graph.ops[k][2][0]
    elif kind == "MUL" and record.act == "relu6":
        factor = graph.constant(graph.ops[k][1][1])
        if factor is not None and factor[0].size == 1:
            if abs(float(factor[0].flat[0]) - HARD_SIGMOID_SCALE) > 1e-6:
                raise WeightsError(
                    f"{graph.name}: hard sigmoid scale {float(factor[0].flat[0])} != {HARD_SIGMOID_SCALE}"
                )
            record.act = "hsigmoid"
            record.output_tensor = graph.ops[k][2][0]
            record.tensors += factor[1]


def read_layers(path: Path) -> tuple[TFLiteGraph, list[LayerRecord]]:
    """Parse ``path`` and return its convolutions in dataflow order."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        graph = TFLiteGraph(data, Path(path).name)
        layers = [
            _conv_record(graph, k)
            for k in graph.dataflow_order()
            if graph.ops[k][0] in ("CONV_2D", "DEPTHWISE_CONV_2D")
        ]
    except WeightsError:
        raise
    except Exception as exc:  # a damaged flatbuffer fails anywhere inside the generated reader
        raise WeightsError(
            f"{Path(path).name}: damaged or truncated TFLite file ({type(exc).__name__}: {exc})"
        ) from exc
    if not layers:
        raise WeightsError(f"{Path(path).name}: no convolutions found in the TFLite graph")
    _mark_nonnegative_inputs(graph, layers)
    return graph, layers


_NONNEGATIVE_ACTS = ("relu", "relu6", "hsigmoid")
# ops whose output is >= 0 when all their (activation) inputs are
_PASS_THROUGH = ("CONCATENATION", "AVERAGE_POOL_2D", "MEAN", "RESIZE_BILINEAR", "MAX_POOL_2D", "RESHAPE")


def _mark_nonnegative_inputs(graph: TFLiteGraph, records: list[LayerRecord]) -> None:
    """Set ``nonnegative_input`` on hybrid layers whose input is (a concat/pool/resize of) ReLU outputs."""
    produced = {r.output_tensor: r.act for r in records}
    memo: dict[int, bool] = {}

    def nonnegative(tensor: int) -> bool:
        if tensor not in memo:
            memo[tensor] = False  # cycles cannot occur, but stay safe
            if tensor in produced:
                memo[tensor] = produced[tensor] in _NONNEGATIVE_ACTS
            elif tensor in graph.producer:
                kind, inputs, _, op = graph.ops[graph.producer[tensor]]
                fused = graph.options(op, "ConcatenationOptions") if kind == "CONCATENATION" else None
                activations = [t for t in inputs if t >= 0 and graph.constant(t) is None]
                memo[tensor] = (
                    kind in _PASS_THROUGH
                    and (fused is None or fused.FusedActivationFunction() in (0, 1, 3))
                    and bool(activations)
                    and all(nonnegative(t) for t in activations)
                ) or kind in ("RELU", "RELU6")
        return memo[tensor]

    for record in records:
        record.nonnegative_input = record.hybrid and nonnegative(record.input_tensor)


def _check(path: Path, spec: ModelSpec, index: int, record: LayerRecord, layer: ConvAct) -> None:
    conv = layer.conv
    expected = {
        "depthwise": layer.depthwise,
        "kernel": layer.kernel,
        "stride": layer.stride,
        "dilation": layer.dilation,
        "act": layer.act,
        "weight shape": tuple(conv.weight.shape),
    }
    found = {
        "depthwise": record.depthwise,
        "kernel": record.kernel,
        "stride": record.stride,
        "dilation": record.dilation,
        "act": record.act,
        "weight shape": tuple(record.weight.shape),
    }
    for key, value in expected.items():
        if found[key] != value:
            raise WeightsError(
                f"{path.name} does not fit architecture {spec.arch} {spec.arch_options or ''} with "
                f"{spec.num_classes} classes: conv #{index} (tensor {record.name!r}, op {record.op_index}) "
                f"has {key} {found[key]}, the network expects {value}"
            )


def load_tflite(path: Path, spec: ModelSpec, *, emulate_hybrid: bool | None = None) -> nn.Module:
    """Build ``spec``'s network and fill it from the TFLite file at ``path`` (checked mapping).

    Dynamic-range int8 convolutions become :class:`HybridQuantConv2d` (their input quantized per pixel
    as the reference runtime does) when ``emulate_hybrid`` is true; by default the registry row decides
    (``source.int8_emulation``), otherwise they run as plain float convs with the dequantized weights.
    """
    if emulate_hybrid is None:
        emulate_hybrid = bool(spec.source and spec.source.int8_emulation)
    path = Path(path)
    graph, records = read_layers(path)
    net = build(spec)
    if not hasattr(net, "conv_layers"):
        raise WeightsError(f"architecture {spec.arch} cannot be loaded from a TFLite file")
    layers = net.conv_layers()
    for index, (record, layer) in enumerate(zip(records, layers, strict=False)):
        _check(path, spec, index, record, layer)
    if len(records) != len(layers):
        raise WeightsError(
            f"{path.name} does not fit architecture {spec.arch}: the file has {len(records)} convolutions, "
            f"the network {len(layers)}"
        )
    with torch.no_grad():
        for record, layer in zip(records, layers, strict=True):
            layer.conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(record.weight)))
            layer.conv.bias.copy_(torch.from_numpy(np.ascontiguousarray(record.bias, dtype=np.float32)))
            if record.hybrid and emulate_hybrid:
                layer.conv = HybridQuantConv2d.from_conv(layer.conv, record.nonnegative_input)
    _check_all_used(graph, records)
    return net.eval()


def _check_all_used(graph: TFLiteGraph, records: list[LayerRecord]) -> None:
    """Every stored float/quantized parameter tensor feeding a conv, MUL or ADD must have been loaded."""
    used = {t for record in records for t in record.tensors}
    for kind, inputs, _, _ in graph.ops:
        if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "MUL", "ADD"):
            continue
        for t in inputs:
            if t < 0:
                continue
            constant = graph.constant(t)
            if constant is not None and not set(constant[1]) & used:
                raise WeightsError(
                    f"{graph.name}: parameter tensor {graph.tensor_name(constant[1][0])!r} ({kind}) "
                    "was not mapped onto the network"
                )
