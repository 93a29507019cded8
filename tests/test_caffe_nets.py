"""Caffe semantics of the networks of the Caffe releases, checked by small hand-computed cases and geometry.

Full-size shapes are checked on PyTorch's ``meta`` device (no memory, no arithmetic), so 513 x 513
inputs cost nothing.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from caffe_synth import RELEASES
from torch import nn
from torch.nn import functional as F

from deeplab_cli.geometry import logits_size, pad_batch, padded_size
from deeplab_cli.nets import build, build_arch
from deeplab_cli.nets.fcn import CROP_POOL3, CROP_POOL4, CROP_SCORE, crop_like
from deeplab_cli.nets.resnet import MultiScale, caffe_interp_size
from deeplab_cli.zoo import Protocol, get_model

CAFFE_ROWS = ["deeplab-v1-largefov", "deeplab-v2-resnet101", "fcn8s-heavy-pascal"]


def caffe_pool_size(n: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe's PoolingLayer output size: rounded up, then the last window must start inside the image."""
    out = math.ceil((n + 2 * pad - kernel) / stride) + 1
    if pad and (out - 1) * stride >= n + pad:
        out -= 1
    return out


def caffe_conv_size(n: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    return (n + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def meta_net(arch: str, **options: object) -> nn.Module:
    with torch.device("meta"):
        return build_arch(arch, 21, **options).eval()


def meta_out(net: nn.Module, height: int, width: int) -> tuple[int, int]:
    with torch.device("meta"):
        return tuple(net(torch.empty(1, 3, height, width)).shape[-2:])


# ------------------------------------------------------------------------------ hand-computed semantics
def test_ceil_mode_max_pooling_hand_computed() -> None:
    # 4x4 ramp, 3x3 window, stride 2, pad 1: Caffe rounds 1.5 up -> 3x3 output (floor would give 2x2);
    # windows cover rows/cols {0,1}, {1,2,3}, {3}
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
    assert out[0, 0].tolist() == [[5, 7, 7], [13, 15, 15], [13, 15, 15]]
    # 2x2 stride 2 on 5 columns (FCN): the last window holds one column
    out = F.max_pool2d(torch.arange(5.0).reshape(1, 1, 1, 5), (1, 2), stride=(1, 2), ceil_mode=True)
    assert out.flatten().tolist() == [1, 3, 4]


@pytest.mark.parametrize("n", [4, 33, 64, 100, 128, 129, 130, 257, 500, 513])
def test_vgg_pool_sizes_follow_caffe_rounding(n: int) -> None:
    expected = n
    for stride in (2, 2, 2, 1, 1):  # pool1-3 stride 2, pool4-5 stride 1, all 3x3 pad 1
        expected = caffe_pool_size(expected, 3, stride, 1)
    assert meta_out(meta_net("deeplab-v1-largefov"), n, n) == (expected, expected)
    assert meta_out(meta_net("deeplab-v2-vgg16"), n, n) == (expected, expected)


@pytest.mark.parametrize("n", [33, 64, 100, 129, 500, 513])
def test_resnet_sizes_follow_caffe_rounding(n: int) -> None:
    expected = caffe_conv_size(n, 7, 2, 3)  # conv1
    expected = caffe_pool_size(expected, 3, 2, 1)  # pool1, ceil
    expected = caffe_conv_size(expected, 1, 2, 0)  # res3a_branch2a / branch1, stride 2 in the 1x1
    assert meta_out(meta_net("deeplab-v2-resnet101"), n, n) == (expected, expected)


def test_pool5a_average_counts_the_padding() -> None:
    net = meta_net("deeplab-v1-largefov")  # pool5a has no parameters: it runs on real tensors
    out = net.pool5a(torch.ones(1, 1, 3, 3))[0, 0]
    # Caffe AVE pooling divides by the window clipped to the padded image: always 9 for 3x3/s1/p1
    expected = torch.tensor([[4, 6, 4], [6, 9, 6], [4, 6, 4]]) / 9
    torch.testing.assert_close(out, expected)


def test_hole_convolution_hand_computed() -> None:
    net = meta_net("deeplab-v1-largefov")
    assert (net.conv5_1.dilation, net.conv5_1.padding) == ((2, 2), (2, 2))
    assert (net.fc6.dilation, net.fc6.padding, net.fc6.kernel_size) == ((12, 12), (12, 12), (3, 3))
    assert net.conv4_3.dilation == (1, 1)
    # conv5_1's geometry on a 5x5 ramp with an all-ones 3x3 kernel: taps 2 pixels apart
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    out = F.conv2d(x, torch.ones(1, 1, 3, 3), padding=net.conv5_1.padding, dilation=net.conv5_1.dilation)
    assert out.shape[-2:] == (5, 5)
    assert out[0, 0, 2, 2].item() == 0 + 2 + 4 + 10 + 12 + 14 + 20 + 22 + 24
    assert out[0, 0, 0, 0].item() == 0 + 2 + 10 + 12
    assert out[0, 0, 1, 1].item() == 6 + 8 + 16 + 18


def test_resnet_strides_and_dilations_are_caffe_style() -> None:
    net = meta_net("deeplab-v2-resnet101")
    blocks = net.blocks
    assert list(blocks)[:8] == ["res2a", "res2b", "res2c", "res3a", "res3b1", "res3b2", "res3b3", "res4a"]
    assert list(blocks)[-4:] == ["res4b22", "res5a", "res5b", "res5c"]
    res3a = blocks["res3a"]
    assert (
        res3a.branch2a.stride == (2, 2) and res3a.branch1.stride == (2, 2) and res3a.branch2b.stride == (1, 1)
    )
    for name, block in blocks.items():
        expected = {"res4": 2, "res5": 4}.get(name[:4], 1)
        assert block.branch2b.dilation == (expected, expected) == block.branch2b.padding
        if name not in ("res3a",):
            assert block.branch2a.stride == (1, 1)
    assert [head.dilation for head in net.aspp] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert net.conv1.stride == (2, 2) and net.conv1.padding == (3, 3) and net.conv1.kernel_size == (7, 7)


# ----------------------------------------------------------------------------------------- FCN crops
def coord_map(layers: list[tuple[str, int, int, int]]) -> tuple[float, float]:
    """Map from a layer stack's output coordinate y to input coordinate a*y + b (Caffe's coord_map)."""
    a, b = 1.0, 0.0
    for kind, kernel, stride, pad in layers:
        if kind == "deconv":  # y_out = s*x + (k-1)/2 - p  ->  x = (y + p - (k-1)/2) / s
            la, lb = 1 / stride, (pad - (kernel - 1) / 2) / stride
        else:  # conv / pool: x = s*y - p + (k-1)/2
            la, lb = stride, (kernel - 1) / 2 - pad
        a, b = a * la, a * lb + b
    return a, b


def test_fcn_crop_offsets_align_the_maps() -> None:
    net = meta_net("fcn8s")

    def conv(module: nn.Module) -> tuple[str, int, int, int]:
        kind = "deconv" if isinstance(module, nn.ConvTranspose2d) else "conv"
        return (kind, module.kernel_size[0], module.stride[0], module.padding[0])

    pool = ("pool", 2, 2, 0)
    stage = {
        s: [conv(getattr(net, f"conv{s}_{i}")) for i in range(1, 4) if hasattr(net, f"conv{s}_{i}")]
        for s in range(1, 6)
    }
    to_pool3 = stage[1] + [pool] + stage[2] + [pool] + stage[3] + [pool]
    to_pool4 = to_pool3 + stage[4] + [pool]
    to_score = to_pool4 + stage[5] + [pool, conv(net.fc6), conv(net.fc7), conv(net.score_fr)]
    upscore2 = to_score + [conv(net.upscore2)]
    upscore_pool4 = upscore2 + [conv(net.upscore_pool4)]
    upscore8 = upscore_pool4 + [conv(net.upscore8)]
    # (cropped map, reference map, offset): cropped[y + offset] must sit where reference[y] sits
    for cropped, reference, offset in (
        (to_pool4 + [conv(net.score_pool4)], upscore2, CROP_POOL4),
        (to_pool3 + [conv(net.score_pool3)], upscore_pool4, CROP_POOL3),
        (upscore8, [], CROP_SCORE),  # the scores against the input image
    ):
        (a_c, b_c), (a_r, b_r) = coord_map(cropped), coord_map(reference)
        assert a_c == a_r
        assert (b_r - b_c) / a_c == offset
    assert (CROP_POOL4, CROP_POOL3, CROP_SCORE) == (5, 9, 31)


def test_crop_like_hand_computed() -> None:
    x = torch.arange(100.0).reshape(1, 1, 10, 10)
    out = crop_like(x, torch.empty(1, 1, 2, 3), 5)
    assert out[0, 0].tolist() == [[55, 56, 57], [65, 66, 67]]


@pytest.mark.parametrize("size", [(1, 1), (31, 32), (64, 64), (100, 133), (500, 375), (513, 513)])
def test_fcn_scores_have_the_input_size(size: tuple[int, int]) -> None:
    assert meta_out(meta_net("fcn8s"), *size) == size


# ------------------------------------------------------------------------------- protocol geometry
@pytest.mark.parametrize("name", ["deeplab-v1-largefov", "deeplab-v2-resnet101"])
def test_513_gives_65_logits(name: str) -> None:
    spec = get_model(name)
    with torch.device("meta"):
        net = build(spec).eval()
    assert padded_size(500, 375, spec.protocol) == (513, 513)
    assert meta_out(net, 513, 513) == logits_size((513, 513), spec.output_stride) == (65, 65)
    assert meta_out(net, 513, 641) == logits_size((513, 641), spec.output_stride) == (65, 81)
    if name == "deeplab-v2-resnet101":
        assert isinstance(net, MultiScale)
        assert meta_out(net.base, 513, 513) == (65, 65)


def test_fcn_row_runs_images_at_their_own_size() -> None:
    spec = get_model("fcn8s-heavy-pascal")
    assert spec.output_stride == 1
    assert padded_size(375, 500, spec.protocol) == (375, 500)
    assert meta_out(meta_net("fcn8s"), 375, 500) == logits_size((375, 500), 1)


@pytest.mark.parametrize("name", CAFFE_ROWS)
def test_caffe_rows_pad_with_zero_after_normalisation(name: str) -> None:
    from deeplab_cli.export import wrap_for_export

    spec = get_model(name)
    assert spec.channel_order == "BGR" and spec.source.format == "caffe" and spec.source.sha256 is None
    assert RELEASES[spec.arch]  # the synthetic release layout exists for the row's architecture
    captured = {}

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            captured["x"] = x
            return x

    image = np.zeros((4, 6, 3), np.uint8)
    image[..., 2] = 200  # a blue image: RGB (0, 0, 200)
    batch = pad_batch([image], (9, 9), spec)  # padded with the mean colour
    with torch.no_grad():
        wrap_for_export(Probe(), spec)(torch.from_numpy(batch))
    x = captured["x"][0]
    assert torch.all(x[:, 4:, :] == 0) and torch.all(x[:, :, 6:] == 0)  # the padding is 0 for the network
    bgr_mean = spec.mean[::-1]
    assert x[0, 0, 0].item() == pytest.approx(200 - bgr_mean[0])  # channel 0 is blue (BGR)
    assert x[2, 0, 0].item() == pytest.approx(0 - bgr_mean[2])


# ------------------------------------------------------------------------------------ multi-scale
def test_caffe_interp_sizes() -> None:
    assert caffe_interp_size(513, 4, 3) == 385 and caffe_interp_size(513, 2, 1) == 257
    assert caffe_interp_size(65, 4, 3) == 49 and caffe_interp_size(66, 4, 3) == 49


class TinyBase(nn.Module):
    """A stand-in for the ResNet: stride-8 conv to 21 classes (logits at pixels 0, 8, 16, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 21, 3, stride=8, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_multi_scale_fuses_by_max_of_upsampled_branches() -> None:
    torch.manual_seed(0)
    base = TinyBase().eval()
    net = MultiScale(base).eval()
    x = torch.randn(1, 3, 65, 81)
    with torch.no_grad():
        got = net(x)
        full = base(x)
        branches = [full]
        for size in ((49, 61), (33, 41)):  # Caffe Interp: (H-1)//4*3+1 and (H-1)//2+1
            small = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
            branches.append(
                F.interpolate(base(small), size=full.shape[-2:], mode="bilinear", align_corners=True)
            )
    torch.testing.assert_close(got, torch.stack(branches).amax(0))
    assert not torch.equal(got, full)


def test_multi_scale_onnx_export_follows_the_input_size(tmp_path: Path) -> None:
    from deeplab_cli.export import export_onnx

    torch.manual_seed(1)
    net = MultiScale(TinyBase()).eval()
    spec = dataclasses.replace(get_model("deeplab-v2-resnet101"), protocol=Protocol(65, 8))
    path = export_onnx(net, spec, tmp_path / "msc.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in ((97, 129), (33, 57)):
        rgb = np.random.default_rng(2).uniform(0, 255, (1, 3, *size)).astype(np.float32)
        bgr = rgb[:, ::-1] - np.float32([104.008, 116.669, 122.675]).reshape(1, 3, 1, 1)
        with torch.no_grad():
            want = net(torch.from_numpy(np.ascontiguousarray(bgr))).numpy()
        got = session.run(["logits"], {"image": rgb})[0]
        assert got.shape == want.shape == (1, 21, (size[0] - 1) // 8 + 1, (size[1] - 1) // 8 + 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
