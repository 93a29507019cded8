"""DeepLab v1 (LargeFOV and its fc6 variants) and DeepLab v2 ASPP-L on VGG-16, as in the Caffe releases.

Module attributes carry the Caffe layer names (``conv1_1`` ... ``fc8``), so the importer's mapping is a
list of names. Caffe semantics kept here:

- max pooling rounds its output size up (``ceil_mode=True``); the last window must start inside the
  image, which PyTorch enforces the same way;
- ``pool5a`` (LargeFOV) is a 3x3 stride-1 average pool whose divisor counts the zero padding
  (``count_include_pad=True``: Caffe divides by the window clipped to the padded image, always 9 here);
- dilated ("hole") convolutions have ``pad = dilation`` so sizes are kept;
- dropout is the identity at test time and is left out.

Input: BGR, mean-subtracted (the exported graph does the conversion). Output: logits at stride 8
(513 x 513 -> 65 x 65).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

# (stage, number of 3x3 convs, channels)
VGG16_STAGES = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))


class DeepLabVGG(nn.Module):
    """VGG-16 trunk with DeepLab's pooling and hole convolutions, followed by one or more fc6-fc8 heads.

    ``branches`` lists ``(fc6 kernel, fc6 dilation)`` per head; with more than one head (ASPP-L) the
    heads' scores are summed and modules are named ``fc6_1, fc7_1, fc8_1, ...``.
    """

    def __init__(
        self,
        num_classes: int,
        branches: tuple[tuple[int, int], ...],
        fc_channels: int = 1024,
        pool5a: bool = True,
        conv5_dilation: int = 2,
    ) -> None:
        super().__init__()
        in_channels = 3
        for stage, count, channels in VGG16_STAGES:
            dilation = conv5_dilation if stage == 5 else 1
            for index in range(1, count + 1):
                conv = nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation)
                setattr(self, f"conv{stage}_{index}", conv)
                in_channels = channels
        self.pool_strides = (2, 2, 2, 1, 1)
        self.pool5a = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True) if pool5a else None
        self.suffixes = [""] if len(branches) == 1 else [f"_{i + 1}" for i in range(len(branches))]
        for suffix, (kernel, dilation) in zip(self.suffixes, branches, strict=True):
            pad = dilation * (kernel - 1) // 2
            setattr(self, f"fc6{suffix}", nn.Conv2d(512, fc_channels, kernel, padding=pad, dilation=dilation))
            setattr(self, f"fc7{suffix}", nn.Conv2d(fc_channels, fc_channels, 1))
            setattr(self, f"fc8{suffix}", nn.Conv2d(fc_channels, num_classes, 1))

    def features(self, x: Tensor) -> Tensor:
        """conv1_1 ... pool5 (and pool5a): stride 8, 512 channels."""
        for (stage, count, _channels), stride in zip(VGG16_STAGES, self.pool_strides, strict=True):
            for index in range(1, count + 1):
                x = F.relu(getattr(self, f"conv{stage}_{index}")(x))
            x = F.max_pool2d(x, 3, stride=stride, padding=1, ceil_mode=True)
        if self.pool5a is not None:
            x = self.pool5a(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        scores = None
        for suffix in self.suffixes:
            h = F.relu(getattr(self, f"fc6{suffix}")(x))
            h = F.relu(getattr(self, f"fc7{suffix}")(h))
            h = getattr(self, f"fc8{suffix}")(h)
            scores = h if scores is None else scores + h
        return scores

    def conv_names(self) -> list[str]:
        """Names of every convolution, in order (the Caffe names except for the fc8 classifiers)."""
        names = [f"conv{s}_{i}" for s, n, _c in VGG16_STAGES for i in range(1, n + 1)]
        return names + [f"{fc}{suffix}" for suffix in self.suffixes for fc in ("fc6", "fc7", "fc8")]


def deeplab_v1_largefov(
    num_classes: int,
    fc6_kernel: int = 3,
    fc6_dilation: int = 12,
    fc_channels: int = 1024,
    pool5a: bool = True,
) -> DeepLabVGG:
    """DeepLab-LargeFOV (v1): fc6 3x3 dilation 12 -> 1024, fc7 1x1 1024, fc8 1x1 classes.

    The other v1 variants are options: DeepLab-7x7 is ``fc6_kernel=7, fc6_dilation=4, fc_channels=4096,
    pool5a=False`` (odd kernels only).
    """
    if fc6_kernel % 2 == 0:
        raise ValueError("fc6_kernel must be odd (even kernels need asymmetric padding)")
    return DeepLabVGG(num_classes, ((fc6_kernel, fc6_dilation),), fc_channels=fc_channels, pool5a=pool5a)


def deeplab_v2_vgg16(
    num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24), fc_channels: int = 1024
) -> DeepLabVGG:
    """DeepLab v2 ASPP-L on VGG-16: four fc6 (3x3, dilation 6/12/18/24) -> fc7 -> fc8 heads, summed."""
    return DeepLabVGG(num_classes, tuple((3, rate) for rate in rates), fc_channels=fc_channels, pool5a=False)
