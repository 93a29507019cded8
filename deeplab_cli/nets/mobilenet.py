"""MobileNetV2 and MobileNetV3-Large backbones as TensorFlow DeepLab builds them.

Layers follow TensorFlow's conventions so that released weights reproduce the original numbers:
batch norm is folded into conv biases, convolutions use TF "SAME" padding (the extra pixel of an even
input goes bottom/right), and atrous convolution replaces striding once the requested output stride is
reached (TF slim's ``current_stride``/``rate`` rule). Every convolution is a :class:`ConvAct`; each
backbone lists them in dataflow order (``conv_layers``) for the weight importers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# TF's MobileNetV3 hard sigmoid is relu6(x + 3) * 0.16667 (the +3 is folded into the conv bias).
HARD_SIGMOID_SCALE = 0.16667

ACTIVATIONS = ("none", "relu", "relu6", "hswish", "hsigmoid")


def _activate(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu":
        return F.relu(x)
    if act == "relu6":
        return F.relu6(x)
    if act == "hswish":
        return F.hardswish(x)
    if act == "hsigmoid":
        return F.relu6(x) * HARD_SIGMOID_SCALE
    return x


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero-pad ``x`` as TensorFlow's SAME padding does for a strided, undilated convolution.

    For stride 2 and an odd kernel k the total padding is k - 2 + (n mod 2): symmetric for odd sizes
    (the 8k+1 protocol sizes), one pixel less at the top/left for even sizes.
    """
    if stride != 2 or kernel % 2 != 1:
        raise ValueError("same_pad supports stride 2 with odd kernels only")
    height, width = x.shape[-2], x.shape[-1]
    total_h = kernel - 2 + height % 2
    total_w = kernel - 2 + width % 2
    bottom = right = (kernel - 1) // 2
    return F.pad(x, [total_w - right, right, total_h - bottom, bottom])


class ConvAct(nn.Module):
    """Convolution (BN folded into its bias) + activation, with TF SAME padding.

    ``depthwise`` convs have one filter per channel. The attributes (kernel, stride, dilation, act,
    depthwise) are what importers check against the released graph.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 1,
        stride: int = 1,
        dilation: int = 1,
        act: str = "none",
        depthwise: bool = False,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}")
        if stride > 1 and dilation > 1:
            raise ValueError("strided atrous convolution is not used by these networks")
        self.kernel, self.stride, self.dilation, self.act, self.depthwise = (
            kernel,
            stride,
            dilation,
            act,
            depthwise,
        )
        padding = 0 if stride > 1 else dilation * (kernel - 1) // 2
        groups = cin if depthwise else 1
        if depthwise and cin != cout:
            raise ValueError("depthwise convs keep the channel count")
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups=groups, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = same_pad(x, self.kernel, self.stride)
        return _activate(self.conv(x), self.act)


class SqueezeExcite(nn.Module):
    """MobileNetV3 squeeze-excite: global average pool, 1x1 relu, 1x1 hard sigmoid, channel scale."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce = ConvAct(channels, squeezed, act="relu")
        self.expand = ConvAct(squeezed, channels, act="hsigmoid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.expand(self.reduce(x.mean((2, 3), keepdim=True)))

    def conv_layers(self) -> list[ConvAct]:
        return [self.reduce, self.expand]


class InvertedResidual(nn.Module):
    """Expansion 1x1 (skipped when the width does not change), depthwise kxk, optional SE, projection."""

    def __init__(
        self,
        cin: int,
        expanded: int,
        cout: int,
        kernel: int,
        stride: int,
        dilation: int,
        act: str,
        squeeze: int = 0,
    ) -> None:
        super().__init__()
        self.expand = ConvAct(cin, expanded, act=act) if expanded != cin else None
        self.depthwise = ConvAct(expanded, expanded, kernel, stride, dilation, act=act, depthwise=True)
        self.se = SqueezeExcite(expanded, squeeze) if squeeze else None
        self.project = ConvAct(expanded, cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block output and its depthwise output (DeepLab's decoder taps the latter)."""
        y = self.expand(x) if self.expand is not None else x
        tap = self.depthwise(y)
        y = self.se(tap) if self.se is not None else tap
        y = self.project(y)
        return (x + y if self.residual else y), tap

    def conv_layers(self) -> list[ConvAct]:
        layers = [self.expand] if self.expand is not None else []
        layers.append(self.depthwise)
        if self.se is not None:
            layers += self.se.conv_layers()
        return [*layers, self.project]


@dataclass(frozen=True)
class BlockDef:
    """One inverted-residual block: expanded width, output width, kernel, stride, SE width, activation."""

    expanded: int
    out: int
    kernel: int
    stride: int
    squeeze: int
    act: str


class Backbone(nn.Module):
    """A stem conv followed by inverted-residual blocks (and optionally a final 1x1 conv).

    ``forward`` returns the last feature map and the depthwise output of block ``tap_block`` (the
    decoder's low-level features). Striding stops at ``output_stride``; later blocks are dilated.
    """

    def __init__(
        self,
        stem_out: int,
        stem_act: str,
        blocks: list[BlockDef],
        output_stride: int,
        tap_block: int,
        final: tuple[int, str] | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, not {output_stride}")
        self.stem = ConvAct(3, stem_out, 3, 2, act=stem_act)
        current_stride, rate, cin = 2, 1, stem_out
        layers = []
        for block in blocks:
            if current_stride == output_stride:
                stride, dilation = 1, rate
                rate *= block.stride
            else:
                stride, dilation = block.stride, 1
                current_stride *= block.stride
            layers.append(
                InvertedResidual(
                    cin, block.expanded, block.out, block.kernel, stride, dilation, block.act, block.squeeze
                )
            )
            cin = block.out
        self.blocks = nn.ModuleList(layers)
        self.final = ConvAct(cin, final[0], act=final[1]) if final else None
        self.out_channels = final[0] if final else cin
        self.tap_block = tap_block
        self.tap_channels = blocks[tap_block].expanded

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        low = x
        for index, block in enumerate(self.blocks):
            x, tap = block(x)
            if index == self.tap_block:
                low = tap
        if self.final is not None:
            x = self.final(x)
        return x, low

    def conv_layers(self) -> list[ConvAct]:
        layers = [self.stem]
        for block in self.blocks:
            layers += block.conv_layers()
        return layers + ([self.final] if self.final is not None else [])


# MobileNetV2: (expansion t, channels c, repeats n, first stride s); DeepLab drops the final 1x1 conv.
_MNV2 = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def mobilenet_v2(depth_multiplier: float = 1.0, output_stride: int = 8) -> Backbone:
    """MobileNetV2 as in TF DeepLab (widths scaled as int(c * depth_multiplier), no rounding to 8).

    The low-level tap is the depthwise output of the second 24-wide block (stride 4).
    """

    def width(c: int) -> int:
        return max(8, int(c * depth_multiplier))

    stem = width(32)
    blocks, cin = [], stem
    for t, c, n, s in _MNV2:
        for i in range(n):
            blocks.append(BlockDef(cin * t, width(c), 3, s if i == 0 else 1, 0, "relu6"))
            cin = width(c)
    return Backbone(stem, "relu6", blocks, output_stride, tap_block=2)


def _mnv3_large_blocks() -> list[BlockDef]:
    # expanded, out, kernel, stride, squeeze width, activation: the "reduced tail" variant DeepLab uses
    rows = [
        (16, 16, 3, 1, 0, "relu"),
        (64, 24, 3, 2, 0, "relu"),
        (72, 24, 3, 1, 0, "relu"),
        (72, 40, 5, 2, 24, "relu"),
        (120, 40, 5, 1, 32, "relu"),
        (120, 40, 5, 1, 32, "relu"),
        (240, 80, 3, 2, 0, "hswish"),
        (200, 80, 3, 1, 0, "hswish"),
        (184, 80, 3, 1, 0, "hswish"),
        (184, 80, 3, 1, 0, "hswish"),
        (480, 112, 3, 1, 120, "hswish"),
        (672, 112, 3, 1, 168, "hswish"),
        (336, 80, 5, 2, 88, "hswish"),
        (480, 80, 5, 1, 120, "hswish"),
        (480, 80, 5, 1, 120, "hswish"),
    ]
    return [BlockDef(*row) for row in rows]


def mobilenet_v3_large(output_stride: int = 32) -> Backbone:
    """MobileNetV3-Large with the reduced last stage (widths halved) and a 480-wide final 1x1 conv.

    The low-level tap is the depthwise output of the last 40-wide block (stride 8).
    """
    return Backbone(16, "hswish", _mnv3_large_blocks(), output_stride, tap_block=5, final=(480, "hswish"))
