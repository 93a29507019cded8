"""The PyTorch networks: TF SAME padding, atrous schedule, output geometry, fully convolutional."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deeplab_cli import zoo
from deeplab_cli.nets import build, build_arch
from deeplab_cli.nets.deeplab_mobile import DeepLabV3PlusMobileNetV3
from deeplab_cli.nets.mobilenet import ConvAct, mobilenet_v2, mobilenet_v3_large


def _tf_same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding, straight from its definition."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [(7, 8), (8, 7), (9, 12), (12, 12), (13, 13)])
def test_strided_conv_pads_like_tensorflow(kernel: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    layer = ConvAct(4, 4, kernel, stride=2, depthwise=True).eval()
    x = torch.randn(2, 4, *size)
    top, bottom = _tf_same_pads(size[0], kernel, 2)
    left, right = _tf_same_pads(size[1], kernel, 2)
    expected = F.conv2d(
        F.pad(x, [left, right, top, bottom]), layer.conv.weight, layer.conv.bias, stride=2, groups=4
    )
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_atrous_schedule_follows_output_stride() -> None:
    def schedule(os: int) -> list[tuple[int, int]]:
        return [(b.depthwise.stride, b.depthwise.dilation) for b in mobilenet_v2(1.0, os).blocks]

    os8 = schedule(8)
    assert [s for s, _ in os8] == [1, 2, 1, 2, 1, 1] + [1] * 11
    assert [d for _, d in os8] == [1] * 7 + [2] * 7 + [4] * 3
    os16 = schedule(16)
    assert [s for s, _ in os16].count(2) == 3
    assert [d for _, d in os16] == [1] * 14 + [2] * 3
    assert all(d == 1 for _, d in schedule(32))


def test_depth_multiplier_widths() -> None:
    half = mobilenet_v2(0.5, 8)
    assert half.stem.conv.out_channels == 16
    assert [b.project.conv.out_channels for b in half.blocks][:4] == [8, 12, 12, 16]
    assert half.out_channels == 160


ARCHS = [
    ("deeplabv3-mobilenetv2", {"depth_multiplier": 0.5, "output_stride": 8}, 8, 65),
    ("deeplabv3-mobilenetv2", {"depth_multiplier": 1.0, "output_stride": 16}, 16, 65),
    ("deeplabv3plus-mobilenetv2", {"depth_multiplier": 0.5, "output_stride": 8}, 4, 65),
    ("deeplabv3plus-mobilenetv3", {}, 8, 97),  # with a 3x3 pooling window instead of 25x25 (speed)
]


@pytest.mark.parametrize(("arch", "options", "stride", "least"), ARCHS)
def test_logits_geometry_any_size_and_batch(arch: str, options: dict, stride: int, least: int) -> None:
    torch.manual_seed(0)
    net = build_arch(arch, 5, **options).eval()
    if isinstance(net, DeepLabV3PlusMobileNetV3):
        net = DeepLabV3PlusMobileNetV3(mobilenet_v3_large(), 5, pool_kernel=3, pool_stride=(1, 1)).eval()
    for extra_h, extra_w in [(0, 8 * 4), (3, 0)]:  # k*8+1 sizes, then an even/odd mix
        height, width = least + extra_h, least + extra_w
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            both = net(x)
            single = net(x[1:])
        assert both.shape == (2, 5, math.ceil(height / stride), math.ceil(width / stride))
        assert torch.allclose(both[1:], single, atol=1e-4)


def test_every_conv_is_listed_once_for_the_importers() -> None:
    for spec in zoo.registry_models():
        if not spec.source or spec.source.format != "tflite":
            continue
        net = build(spec)
        listed = net.conv_layers()
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len({id(layer.conv) for layer in listed}) == len(listed) == len(convs), spec.name
        assert getattr(net, "output_stride", spec.output_stride) == spec.output_stride, spec.name
        assert getattr(net, "min_input_size", 0) <= spec.protocol.min_size, spec.name
