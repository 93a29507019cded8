"""DeepLabv3 / v3+ on MobileNetV2 and MobileNetV3-Large, as released in the TF DeepLab model zoo.

All networks map a normalised N x 3 x H x W batch to logits at their output stride (not upsampled) and
are fully convolutional: the image-pooling branch is a global average pool broadcast back to the
feature map, and the decoders resize with align-corners geometry to the size of their skip features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deeplab_cli.nets.mobilenet import Backbone, ConvAct, mobilenet_v2, mobilenet_v3_large


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


class MobileASPP(nn.Module):
    """DeepLab's mobile ASPP: [image pooling -> 1x1, 1x1] concatenated, then a 1x1 projection."""

    def __init__(self, cin: int, width: int = 256) -> None:
        super().__init__()
        self.pool_conv = ConvAct(cin, width, act="relu")
        self.branch = ConvAct(cin, width, act="relu")
        self.project = ConvAct(2 * width, width, act="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool_conv(x.mean((2, 3), keepdim=True))
        pooled = pooled.expand(-1, -1, x.shape[-2], x.shape[-1])
        return self.project(torch.cat([pooled, self.branch(x)], dim=1))

    def conv_layers(self) -> list[ConvAct]:
        return [self.pool_conv, self.branch, self.project]


class DeepLabV3Mobile(nn.Module):
    """DeepLabv3 (no decoder): backbone -> mobile ASPP -> 1x1 logits at the backbone's output stride."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = MobileASPP(backbone.out_channels)
        self.logits = ConvAct(256, num_classes)
        self.output_stride = _stride(backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.backbone(x))

    def head(self, features: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Logits from the backbone's output (``low`` is unused: no decoder)."""
        return self.logits(self.aspp(features))

    def conv_layers(self) -> list[ConvAct]:
        return [*self.backbone.conv_layers(), *self.aspp.conv_layers(), self.logits]


class DeepLabV3PlusMobileNetV2(nn.Module):
    """DeepLabv3+ (MobileNetV2): mobile ASPP, then a decoder at stride 4 with two separable convs."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = MobileASPP(backbone.out_channels)
        self.low_level = ConvAct(backbone.tap_channels, 48, act="relu")
        self.decoder = nn.ModuleList(
            [
                ConvAct(304, 304, 3, act="relu", depthwise=True),
                ConvAct(304, 256, act="relu"),
                ConvAct(256, 256, 3, act="relu", depthwise=True),
                ConvAct(256, 256, act="relu"),
            ]
        )
        self.logits = ConvAct(256, num_classes)
        self.output_stride = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.backbone(x))

    def head(self, features: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Logits from the backbone's output and its stride-4 depthwise tap."""
        low = self.low_level(low)
        y = torch.cat([_resize(self.aspp(features), low), low], dim=1)
        for layer in self.decoder:
            y = layer(y)
        return self.logits(y)

    def conv_layers(self) -> list[ConvAct]:
        return [
            *self.backbone.conv_layers(),
            *self.aspp.conv_layers(),
            self.low_level,
            *self.decoder,
            self.logits,
        ]


class DeepLabV3PlusMobileNetV3(nn.Module):
    """DeepLab's MobileNetV3 segmentation head (LR-ASPP style) with a stride-8 skip to the logits.

    Branch 1x1 (relu) gated by a hard-sigmoid of a 1x1 conv on an average pool of fixed window
    (25x25, stride 4x5: the 769x769 pooling crop of the Cityscapes training setup), resized to the
    stride-8 tap, 1x1 to logits, plus a 1x1 logits conv on the tap itself.
    """

    def __init__(
        self, backbone: Backbone, num_classes: int, pool_kernel: int = 25, pool_stride=(4, 5)
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.branch = ConvAct(backbone.out_channels, 128, act="relu")
        self.pool = nn.AvgPool2d(pool_kernel, stride=tuple(pool_stride))
        self.pool_conv = ConvAct(backbone.out_channels, 128, act="hsigmoid")
        self.logits = ConvAct(128, num_classes)
        self.low_logits = ConvAct(backbone.tap_channels, num_classes)
        self.output_stride = 8
        # the fixed pooling window needs a feature map at least that large
        self.min_input_size = (pool_kernel - 1) * _stride(backbone) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.backbone(x))

    def head(self, features: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Logits from the backbone's output and its stride-8 depthwise tap."""
        branch = self.branch(features)
        gate = _resize(self.pool_conv(self.pool(features)), branch)
        head = self.logits(_resize(branch * gate, low))
        return head + self.low_logits(low)

    def conv_layers(self) -> list[ConvAct]:
        return [*self.backbone.conv_layers(), self.branch, self.pool_conv, self.logits, self.low_logits]


def _stride(backbone: Backbone) -> int:
    stride = backbone.stem.stride
    for block in backbone.blocks:
        stride *= block.depthwise.stride
    return stride


def deeplabv3_mobilenetv2(
    num_classes: int, depth_multiplier: float = 1.0, output_stride: int = 8
) -> nn.Module:
    """DeepLabv3 with a MobileNetV2 backbone (mobile ASPP, no decoder): logits at ``output_stride``."""
    return DeepLabV3Mobile(mobilenet_v2(depth_multiplier, output_stride), num_classes)


def deeplabv3plus_mobilenetv2(
    num_classes: int, depth_multiplier: float = 1.0, output_stride: int = 8
) -> nn.Module:
    """DeepLabv3+ with a MobileNetV2 backbone: encoder at ``output_stride``, logits at stride 4."""
    return DeepLabV3PlusMobileNetV2(mobilenet_v2(depth_multiplier, output_stride), num_classes)


def deeplabv3plus_mobilenetv3(num_classes: int, output_stride: int = 32) -> nn.Module:
    """DeepLab's MobileNetV3-Large segmentation model: encoder at ``output_stride``, logits at stride 8."""
    return DeepLabV3PlusMobileNetV3(mobilenet_v3_large(output_stride), num_classes)
