"""Emulation of the dynamic-range ("hybrid") int8 convolutions of TFLite files, in float ops only.

The reference runtime (TFLite with its default XNNPACK delegate) runs a CONV_2D whose int8 weights are
stored on the op itself as int8 x int8: each input pixel (one row of C channels, NHWC) is quantized on the
fly to asymmetric int8 from that row's min/max (extended to include 0), the products are accumulated in
int32 and rescaled. :class:`HybridQuantConv2d` fake-quantizes its input pixel by pixel exactly as XNNPACK
does, then runs the float conv with the exactly dequantized weights: that differs from the integer
accumulation only by float32 rounding (measured <= 3.2e-6 relative per layer on all three released
hybrid files, against ~1e-2 without the emulation).

Quantization of one pixel (found by experiment against ai-edge-litert 2.3, layer by layer):
``lo, hi = min(row, 0), max(row, 0)``, ``span = hi - lo``, ``inv = 255 / span`` (a true division),
``scale = span / 255``; zero point ``-128 - lo * inv`` if ``(-128 + lo * inv) + (127 + hi * inv) > 0``
else ``127 - hi * inv``, clamped to [-128, 127] and rounded half to even;
``q = clamp(round_half_even(x * inv) + zp, -128, 127)``; value ``(q - zp) * scale``.
All ops (ReduceMin/Max, Div, Mul, Where, Round, Min/Max) export to ONNX with dynamic shapes; ONNX Round
and ``torch.round`` both round half to even, as XNNPACK does.

The emulated network is exact layer by layer but not end to end: float noise of ~1e-7 between runtimes
flips an occasional int8 rounding, and the flips spread (the reference runtime itself moves as much when
its input moves by one ulp). Cost: ~1.8x ONNX Runtime latency on CPU (the extra elementwise passes).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

QMIN, QMAX = -128.0, 127.0


def fake_quantize_pixels(x: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
    """``x`` (N x C x H x W) quantized per pixel to asymmetric int8 as XNNPACK does, then dequantized.

    ``nonnegative`` (the caller knows ``x >= 0``, e.g. a ReLU output) takes an exactly equivalent
    shortcut: the zero point is then -128 and no clamping can occur, so one reduction and three
    elementwise passes remain instead of two and five.
    """
    levels = QMAX - QMIN
    if nonnegative:
        hi = torch.amax(x, dim=1, keepdim=True)
        full = torch.full_like(hi, levels)
        span = torch.where(hi > 0, hi, full)  # an all-zero pixel: any scale works
        return torch.round(x * (full / span)) * (span / levels)
    lo = torch.clamp(torch.amin(x, dim=1, keepdim=True), max=0.0)
    hi = torch.clamp(torch.amax(x, dim=1, keepdim=True), min=0.0)
    span = hi - lo
    full = torch.full_like(span, levels)
    span = torch.where(span > 0, span, full)
    inv = full / span  # a true division (``levels / span`` would be reciprocal-then-multiply in torch)
    low, high = lo * inv, hi * inv
    zero = torch.where((QMIN + low) + (QMAX + high) > 0, QMIN - low, QMAX - high)
    zero = torch.round(torch.clamp(zero, QMIN, QMAX))
    # clamp(round(x * inv) + zero, QMIN, QMAX) - zero, with the zero point moved into the bounds
    q = torch.round(x * inv)
    q = torch.maximum(torch.minimum(q, QMAX - zero), QMIN - zero)
    return q * (span / levels)


class HybridQuantConv2d(nn.Conv2d):
    """A convolution whose input is quantized per pixel to int8 first (a TFLite dynamic-range conv).

    The weights are the dequantized int8 values; only the input activations are quantized here.
    ``nonnegative_input`` declares the input is never negative (it follows a ReLU), which allows a cheaper
    but exactly equivalent quantization.
    """

    nonnegative_input: bool = False

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, nonnegative_input: bool = False) -> HybridQuantConv2d:
        """A hybrid conv with ``conv``'s geometry and (shared) parameters."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.nonnegative_input = nonnegative_input
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            fake_quantize_pixels(x, self.nonnegative_input),
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


def has_hybrid(net: nn.Module) -> bool:
    """Whether ``net`` emulates any dynamic-range int8 convolution."""
    return any(isinstance(m, HybridQuantConv2d) for m in net.modules())


def without_hybrid(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every hybrid conv turned back into a plain float conv (same weights)."""
    net = copy.deepcopy(net)
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, HybridQuantConv2d):
                plain = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups,
                    child.bias is not None,
                )
                plain.weight, plain.bias = child.weight, child.bias
                setattr(module, name, plain)
    return net
