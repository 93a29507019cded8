"""FCN-8s (Long, Shelhamer, Darrell) as released in Caffe: VGG-16 with skips from pool3 and pool4.

Caffe details kept here: ``conv1_1`` pads by 100; 2x2 stride-2 max pools round up (ceil); ``fc6`` is 7x7
(4096) with no padding; upsampling is learned (``Deconvolution`` = ConvTranspose2d, no bias, weights
from the file); the Crop layers take fixed offsets: ``score_pool4`` at 5, ``score_pool3`` at 9 and the
final scores at 31, which align every map with the input for any input size.

The "heavy" model (fcn8s-heavy-pascal) adds the skips unscaled; the "at-once" model scales pool4 by
0.01 and pool3 by 0.0001 (Caffe ``Scale`` layers ``scale_pool4``/``scale_pool3``): ``at_once=True``.

Input: BGR, mean-subtracted. Output: full-resolution scores (output stride 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deeplab_cli.nets.vgg import VGG16_STAGES

CROP_POOL4, CROP_POOL3, CROP_SCORE = 5, 9, 31


class FCN8s(nn.Module):
    def __init__(self, num_classes: int, at_once: bool = False, fc_channels: int = 4096) -> None:
        super().__init__()
        in_channels = 3
        for stage, count, channels in VGG16_STAGES:
            for index in range(1, count + 1):
                pad = 100 if (stage, index) == (1, 1) else 1
                setattr(self, f"conv{stage}_{index}", nn.Conv2d(in_channels, channels, 3, padding=pad))
                in_channels = channels
        self.fc6 = nn.Conv2d(512, fc_channels, 7)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.score_fr = nn.Conv2d(fc_channels, num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.score_pool4 = nn.Conv2d(512, num_classes, 1)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.score_pool3 = nn.Conv2d(256, num_classes, 1)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)
        self.at_once = at_once
        if at_once:
            self.register_buffer("scale_pool4", torch.full((512,), 0.01))
            self.register_buffer("scale_pool3", torch.full((256,), 0.0001))

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        pools = []
        h = x
        for stage, count, _channels in VGG16_STAGES:
            for index in range(1, count + 1):
                h = F.relu(getattr(self, f"conv{stage}_{index}")(h))
            h = F.max_pool2d(h, 2, stride=2, ceil_mode=True)
            pools.append(h)
        pool3, pool4 = pools[2], pools[3]
        if self.at_once:
            pool3 = pool3 * self.scale_pool3.view(1, -1, 1, 1)
            pool4 = pool4 * self.scale_pool4.view(1, -1, 1, 1)
        h = F.relu(self.fc6(h))
        h = F.relu(self.fc7(h))
        upscore2 = self.upscore2(self.score_fr(h))
        fuse_pool4 = upscore2 + crop_like(self.score_pool4(pool4), upscore2, CROP_POOL4)
        upscore_pool4 = self.upscore_pool4(fuse_pool4)
        fuse_pool3 = upscore_pool4 + crop_like(self.score_pool3(pool3), upscore_pool4, CROP_POOL3)
        upscore8 = self.upscore8(fuse_pool3)
        return upscore8[:, :, CROP_SCORE : CROP_SCORE + height, CROP_SCORE : CROP_SCORE + width]


def crop_like(x: Tensor, reference: Tensor, offset: int) -> Tensor:
    """Caffe Crop (axis 2): ``x`` cut to ``reference``'s height and width starting at ``offset``."""
    height, width = reference.shape[-2:]
    return x[:, :, offset : offset + height, offset : offset + width]


def fcn8s(num_classes: int, at_once: bool = False, fc_channels: int = 4096) -> FCN8s:
    """FCN-8s on VGG-16 (``at_once`` for the all-at-once model with scaled skips; ``fc_channels`` is the
    width of fc6/fc7, 4096 in the releases)."""
    return FCN8s(num_classes, at_once=at_once, fc_channels=fc_channels)
