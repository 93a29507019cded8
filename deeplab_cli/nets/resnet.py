"""DeepLab v2 ResNet-101 (ASPP, rates 6/12/18/24 summed) as in the Caffe release, and its multi-scale wrapper.

Caffe (MSRA) ResNet details kept here:

- the stride-2 of a stage sits in the 1x1 convolutions of its first block (``branch2a`` and the
  projection ``branch1``), not in the 3x3;
- ``conv1`` 7x7 stride 2 pad 3, then ``pool1`` 3x3 stride 2 max pooling with pad 1 and ceil rounding
  (DeepLab v2's pool1; 513 -> 257 -> 129), so res3 gives stride 8 and 513 -> 65;
- res4 uses dilation 2 and res5 dilation 4 in every 3x3 (``branch2b``), with no further striding;
- every BatchNorm + Scale pair is folded into the convolution before it, so each convolution has a
  bias and there is no normalisation module (the network is for inference only).

Blocks are named like Caffe: res2a-c, res3a, res3b1-b3, res4a, res4b1-b22, res5a-c.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

# (stage, blocks, bottleneck channels, output channels, first stride, dilation)
RESNET101_STAGES = (
    (2, 3, 64, 256, 1, 1),
    (3, 4, 128, 512, 2, 1),
    (4, 23, 256, 1024, 1, 2),
    (5, 3, 512, 2048, 1, 4),
)
MSC_SCALES = ((4, 3), (2, 1))  # Caffe Interp (shrink, zoom) of the 0.75 and 0.5 inputs


def block_names(stage: int, count: int) -> list[str]:
    """Caffe block names: res2a, res2b, res2c / res4a, res4b1 ... res4b22."""
    if count <= 3:
        return [f"res{stage}{'abc'[i]}" for i in range(count)]
    return [f"res{stage}a"] + [f"res{stage}b{i}" for i in range(1, count)]


class Bottleneck(nn.Module):
    """1x1 (stride) -> 3x3 (dilation) -> 1x1, plus the identity or a 1x1 projection (``branch1``)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, dilation: int, project: bool) -> None:
        super().__init__()
        self.branch1 = nn.Conv2d(cin, cout, 1, stride=stride) if project else None
        self.branch2a = nn.Conv2d(cin, mid, 1, stride=stride)
        self.branch2b = nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation)
        self.branch2c = nn.Conv2d(mid, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.branch1 is None else self.branch1(x)
        h = F.relu(self.branch2a(x))
        h = F.relu(self.branch2b(h))
        return F.relu(self.branch2c(h) + shortcut)


class DeepLabV2ResNet(nn.Module):
    """Single-scale DeepLab v2 ResNet-101: stride-8 features, ASPP heads ``fc1_c0..c3`` summed."""

    def __init__(self, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.blocks = nn.ModuleDict()
        cin = 64
        for stage, count, mid, cout, stride, dilation in RESNET101_STAGES:
            for index, name in enumerate(block_names(stage, count)):
                first = index == 0
                self.blocks[name] = Bottleneck(cin, mid, cout, stride if first else 1, dilation, first)
                cin = cout
        self.aspp = nn.ModuleList(nn.Conv2d(2048, num_classes, 3, padding=r, dilation=r) for r in rates)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
        for block in self.blocks.values():
            x = block(x)
        scores = self.aspp[0](x)
        for head in self.aspp[1:]:
            scores = scores + head(x)
        return scores


def caffe_interp_size(size: int, shrink: int, zoom: int) -> int:
    """Caffe Interp's output size for ``shrink_factor`` then ``zoom_factor`` (align-corners geometry)."""
    size = (size - 1) // shrink + 1
    return size + (size - 1) * (zoom - 1)


class MultiScale(nn.Module):
    """DeepLab v2's multi-scale inputs: the image at scales 1, 0.75 and 0.5 (bilinear, align-corners, as
    Caffe's Interp layer), each branch's logits upsampled to the scale-1 logits, fused by max."""

    def __init__(self, base: nn.Module, scales: tuple[tuple[int, int], ...] = MSC_SCALES) -> None:
        super().__init__()
        self.base = base
        self.scales = scales

    def forward(self, x: Tensor) -> Tensor:
        logits = self.base(x)
        size = logits.shape[-2:]
        fused = logits
        for shrink, zoom in self.scales:
            h = caffe_interp_size(x.shape[-2], shrink, zoom)
            w = caffe_interp_size(x.shape[-1], shrink, zoom)
            small = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)
            branch = F.interpolate(self.base(small), size=size, mode="bilinear", align_corners=True)
            fused = fused.maximum(branch)  # Caffe Eltwise MAX
        return fused


def deeplab_v2_resnet101(num_classes: int, multi_scale: bool = False) -> nn.Module:
    """DeepLab v2 ResNet-101 ASPP; ``multi_scale`` adds the 1/0.75/0.5 input pyramid with max fusion."""
    net = DeepLabV2ResNet(num_classes)
    return MultiScale(net) if multi_scale else net
