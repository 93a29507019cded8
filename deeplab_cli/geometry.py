"""Image and score geometry: the protocol resize, padding, and the one bilinear resampler of scores.

Everything here is plain numpy and owns one piece of maths each:

* :func:`network_input_size` / :func:`resize_image`: how an image of any size is resized before padding,
  as the model's registry row (:class:`~deeplab_cli.zoo.Protocol`) says;
* :func:`padded_size` / :func:`pad_batch`: padding bottom/right with the model's mean colour, which the
  exported graph (it normalises internally) maps to 0, as TF DeepLab's evaluation pads;
* :class:`Resampler`: bilinear resampling of C x h x w scores to an H x W output, by two small
  interpolation matrices (one per axis): the exact label fast path, bands of dense scores, or all of it;
* :func:`softmax` and :func:`label_dtype`: the one softmax and the one rule for label arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from deeplab_cli.zoo import ModelSpec, Protocol

# Resize methods a registry row may name (Protocol.resize_method).
ALIGN_CORNERS = "bilinear_align_corners"  # TF's resize_bilinear(align_corners=True): no antialiasing
PILLOW_BILINEAR = "pillow_bilinear"  # Pillow's bilinear on pixel centres (antialiased when shrinking)
PILLOW_LANCZOS = "pillow_lanczos"  # Pillow's ANTIALIAS (Lanczos): what the official DeepLab demo resizes with
RESIZE_METHODS = (ALIGN_CORNERS, PILLOW_BILINEAR, PILLOW_LANCZOS)
REDUCING_GAP = 3.0
_PILLOW_FILTERS = {PILLOW_BILINEAR: Image.BILINEAR, PILLOW_LANCZOS: Image.LANCZOS}
# Resize rules a registry row may name (Protocol.resize).
RESIZE_RULES = ("none", "range", "longer_side")
# Bound on the float32 scratch of one band of resampled scores (C x rows x W), in bytes.
BAND_BYTES = 64 * 2**20


def label_dtype(channels: int) -> type[np.unsignedinteger]:
    """Label maps are uint8 up to 256 classes, uint16 above."""
    return np.uint8 if channels <= 256 else np.uint16


def labels_of(scores: np.ndarray) -> np.ndarray:
    """Argmax over the class axis (axis 0) in the label dtype."""
    return scores.argmax(axis=0).astype(label_dtype(scores.shape[0]))


def softmax(scores: np.ndarray, axis: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Numerically stable softmax along ``axis`` in float32 (``out=scores`` works in place)."""
    scores = np.asarray(scores, dtype=np.float32)
    out = np.subtract(scores, scores.max(axis=axis, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


# ------------------------------------------------------------------------------------ protocol resize


def _tf_resize_to_range(
    height: int, width: int, min_size: int, max_size: int, factor: int
) -> tuple[int, int]:
    """TF DeepLab's ``preprocess_utils.resize_to_range`` size rule, in its float32 arithmetic.

    Scale so the shorter side is ``min_size``; if the longer side would exceed ``max_size`` (first lowered
    to a multiple of ``factor`` plus one), scale so the longer side is ``max_size`` instead; floor both
    sides; then round each side up so that ``(side - 1) % factor == 0``.
    """
    f32 = np.float32
    top = f32(max_size)
    if max_size and factor > 1:
        top = f32(max_size - (max_size - 1) % factor)
    large = f32(min_size) / f32(min(height, width))
    size = [int(np.floor(f32(height) * large)), int(np.floor(f32(width) * large))]
    if max_size and f32(max(size)) > top:
        small = top / f32(max(height, width))
        size = [int(np.floor(f32(height) * small)), int(np.floor(f32(width) * small))]
    if factor > 1:
        size = [side + (factor - (side - 1) % factor) % factor for side in size]
    return max(1, size[0]), max(1, size[1])


def _scale_longer_side(height: int, width: int, longer: int) -> tuple[int, int]:
    """The longer side made ``longer``, the other scaled alike and floored (as the DeepLab demo's int())."""
    scale = longer / max(height, width)
    if height >= width:
        return longer, max(1, int(width * scale))
    return max(1, int(height * scale)), longer


def network_input_size(
    height: int, width: int, protocol: Protocol, cap: int | None = None
) -> tuple[int, int]:
    """The size an image of ``height x width`` is resized to before padding, per ``protocol``.

    ``none``: native size. ``range``: TF DeepLab's ``resize_to_range(resize_min, resize_max,
    resize_factor)``. ``longer_side``: the longer side brought into ``[resize_min, resize_max]`` (0 = no
    bound), keeping the aspect ratio; images already inside are left alone. ``cap`` (the caller's
    ``max_size``) then shrinks anything whose longer side is still above it.
    """
    size = height, width
    if protocol.resize == "range":
        size = _tf_resize_to_range(
            height, width, protocol.resize_min, protocol.resize_max, protocol.resize_factor
        )
    elif protocol.resize == "longer_side":
        longer = max(height, width)
        target = max(longer, protocol.resize_min)
        if protocol.resize_max:
            target = min(target, protocol.resize_max)
        if target != longer:
            size = _scale_longer_side(height, width, target)
    elif protocol.resize != "none":
        raise ValueError(f"unknown resize rule {protocol.resize!r} (known: {', '.join(RESIZE_RULES)})")
    if cap and max(size) > cap:
        size = _scale_longer_side(height, width, cap)
    return size


def _align_corners_taps(out_n: int, in_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF ``resize_bilinear(align_corners=True)`` taps: source ``y * (in - 1) / (out - 1)`` in float32."""
    scale = np.float32((in_n - 1) / (out_n - 1)) if out_n > 1 else np.float32(0.0)
    position = np.arange(out_n, dtype=np.float32) * scale
    low = np.minimum(np.floor(position).astype(np.int64), in_n - 1)
    high = np.minimum(low + 1, in_n - 1)
    return low, high, (position - low).astype(np.float32)


def resize_align_corners(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear align-corners resize of an H x W x 3 image to ``size``, as float32 (no rounding).

    TF's ``tf.image.resize_bilinear(image, size, align_corners=True)``: output pixel ``(y, x)`` samples
    the input at ``(y * (H - 1) / (h - 1), x * (W - 1) / (w - 1))``, interpolating the four neighbours
    with float32 weights, horizontally first; no antialiasing. TF DeepLab resizes the float image, so
    the network sees unrounded values: we keep them.
    """
    y0, y1, fy = _align_corners_taps(size[0], rgb.shape[0])
    x0, x1, fx = _align_corners_taps(size[1], rgb.shape[1])
    fx = fx[None, :, None]

    def rows(index: np.ndarray) -> np.ndarray:
        band = rgb[index].astype(np.float32)
        left, right = band[:, x0], band[:, x1]
        return left + (right - left) * fx

    top, bottom = rows(y0), rows(y1)
    return top + (bottom - top) * fy[:, None, None]


def resize_image(rgb: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    """``rgb`` resized to ``size`` (H, W) by ``method``; unchanged when it already has that size."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    if method == ALIGN_CORNERS:
        return resize_align_corners(rgb, size)
    if method in _PILLOW_FILTERS:
        image = Image.fromarray(np.asarray(rgb, np.uint8))
        # reducing_gap: shrinking by more than 3x first reduces by an integer box factor (a 6000 x 4000
        # photo resizes ~4x faster); smaller factors, like all of the demo's cases, are unaffected
        return np.asarray(
            image.resize((size[1], size[0]), _PILLOW_FILTERS[method], reducing_gap=REDUCING_GAP)
        )
    raise ValueError(f"unknown resize method {method!r} (known: {', '.join(RESIZE_METHODS)})")


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """An image size multiplied by ``factor`` (multi-scale inference), at least 1 pixel a side."""
    return max(1, round(height * factor)), max(1, round(width * factor))


def fit_pixels(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The largest size of the same aspect ratio with at most ``max_pixels`` pixels (or the size itself)."""
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


# ------------------------------------------------------------------------------------------- padding


def padded_size(height: int, width: int, protocol: Protocol) -> tuple[int, int]:
    """The padded (H, W) for an image: at least ``min_size`` and of the form ``size_step * k + 1``."""

    def side(n: int) -> int:
        n = max(n, protocol.min_size)
        step = protocol.size_step
        return step * math.ceil((n - 1) / step) + 1

    return side(height), side(width)


def logits_size(padded: tuple[int, int], stride: int) -> tuple[int, int]:
    """Size of the stride-``stride`` logits for a padded input of size ``padded`` (align-corners)."""
    return (padded[0] - 1) // stride + 1, (padded[1] - 1) // stride + 1


def pad_batch(images: list[np.ndarray], size: tuple[int, int], spec: ModelSpec) -> np.ndarray:
    """Stack H x W x 3 RGB images (uint8 or float) into N x 3 x H x W float32, padded with the mean."""
    height, width = size
    batch = np.empty((len(images), 3, height, width), dtype=np.float32)
    batch[:] = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    for index, image in enumerate(images):
        h, w = image.shape[:2]
        if h > height or w > width:
            raise ValueError(f"image of {h}x{w} does not fit the padded size {height}x{width}")
        batch[index, :, :h, :w] = image.transpose(2, 0, 1)
    return batch


# ------------------------------------------------------------------------------------- resampling


def sample_positions(out_n: int, input_n: int, corners: bool) -> np.ndarray:
    """Where the ``out_n`` output pixels of one axis fall on an ``input_n``-pixel resampling of it.

    Both grids cover the same image. ``corners``: first and last pixels coincide (align-corners, how TF
    resizes); otherwise pixel centres coincide (how Pillow resizes). Identity when the sizes match.
    """
    y = np.arange(out_n, dtype=np.float64)
    if out_n == input_n:
        return y
    if corners:
        return y * ((input_n - 1) / (out_n - 1)) if out_n > 1 else np.zeros_like(y)
    return np.clip((y + 0.5) * (input_n / out_n) - 0.5, 0.0, input_n - 1)


@dataclass(frozen=True)
class Frame:
    """Where an image sits in a padded network input.

    ``image_size``: the image as given; ``input_size``: after the protocol resize; ``padded_size``: the
    network input; ``corners``: the resize was align-corners (else pixel centres). The network's logits
    sit on padded-input pixels ``j * (padded - 1) / (logits - 1)`` (align-corners, stride ``s`` = pixels
    0, s, 2s, ...), so output pixel ``y`` maps to logit cell ``pos(y) * (logits - 1) / (padded - 1)``.
    """

    image_size: tuple[int, int]
    input_size: tuple[int, int]
    padded_size: tuple[int, int]
    corners: bool = True

    def resampler(self, logits_hw: tuple[int, int], out_size: tuple[int, int] | None = None) -> Resampler:
        """Resample logits of size ``logits_hw`` to the image's own size, or to ``out_size``.

        ``out_size``: another grid over the whole image (the CRF's bounded grid), made from the image
        by Pillow, so its pixels map to image pixels by their centres.
        """
        out = out_size or self.image_size
        axes = []
        for axis in (0, 1):
            image_n, input_n = self.image_size[axis], self.input_size[axis]
            position = sample_positions(out[axis], image_n, corners=False)  # in image pixels
            if image_n != input_n:  # image pixels -> network-input pixels, as the resize mapped them
                if self.corners:
                    position = position * ((input_n - 1) / (image_n - 1)) if image_n > 1 else 0 * position
                else:
                    position = np.clip((position + 0.5) * (input_n / image_n) - 0.5, 0.0, input_n - 1)
            padded, cells = self.padded_size[axis], logits_hw[axis]
            axes.append(position * ((cells - 1) / (padded - 1)) if padded > 1 and cells > 1 else 0 * position)
        return Resampler(axes[0], axes[1], logits_hw)


@dataclass(frozen=True)
class Resampler:
    """Bilinear resampling of C x h x w scores onto an output grid, one axis at a time.

    ``rows``/``cols``: the position of each output row/column in source cells (fractional). The result
    is ``Ry @ S[c] @ Rx.T`` per class, with ``Ry``/``Rx`` the two-tap interpolation matrices
    (:meth:`matrix`); it is computed with the two taps directly (4 multiply-adds per value).
    """

    rows: np.ndarray
    cols: np.ndarray
    source_hw: tuple[int, int]

    @classmethod
    def between(cls, source_hw: tuple[int, int], out_size: tuple[int, int], corners: bool) -> Resampler:
        """Resample a grid covering the same image at another size (e.g. CRF output to full size)."""
        rows = sample_positions(out_size[0], source_hw[0], corners)
        cols = sample_positions(out_size[1], source_hw[1], corners)
        return cls(rows, cols, source_hw)

    @property
    def out_size(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    @staticmethod
    def _taps(position: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        low = np.clip(np.floor(position).astype(np.int64), 0, n - 1)
        high = np.minimum(low + 1, n - 1)
        return low, high, (position - low).astype(np.float32)

    def matrix(self, axis: int) -> np.ndarray:
        """The (out x source) interpolation weights of one axis (0 = rows, 1 = columns)."""
        position, n = (self.rows, self.source_hw[0]) if axis == 0 else (self.cols, self.source_hw[1])
        low, high, frac = self._taps(position, n)
        weights = np.zeros((len(position), n), dtype=np.float32)
        index = np.arange(len(position))
        np.add.at(weights, (index, low), 1.0 - frac)
        np.add.at(weights, (index, high), frac)
        return weights

    def bands(self, scores: np.ndarray, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(top, C x rows x W)`` float32 bands of the resampled scores, top to bottom.

        One band at a time is held (default height: :data:`BAND_BYTES` of scratch), so a 6000 x 4000
        output never needs C full-resolution planes.
        """
        channels = scores.shape[0]
        height, width = self.out_size
        if rows is None:
            rows = max(1, BAND_BYTES // max(1, channels * width * 4))
        source = np.ascontiguousarray(scores, dtype=np.float32)
        y0, y1, fy = self._taps(self.rows, source.shape[1])
        x0, x1, fx = self._taps(self.cols, source.shape[2])
        for top in range(0, height, rows):
            ys = slice(top, min(height, top + rows))
            wy = fy[ys][None, :, None]
            partial = source[:, y0[ys]] * (1 - wy) + source[:, y1[ys]] * wy  # C x band x w: small
            band = partial[:, :, x0]  # two taps per output pixel, not a dense product over w
            band *= 1 - fx
            band += partial[:, :, x1] * fx
            yield top, band

    def taps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(y0, y1, fy, x0, x1, fx)``: each output row's and column's two source cells (int64) and the
        weight of the second (float32); value = ``(s[y0] (1-fy) + s[y1] fy)`` along rows, then the same
        along columns, as :meth:`bands` computes it."""
        y0, y1, fy = self._taps(self.rows, self.source_hw[0])
        x0, x1, fx = self._taps(self.cols, self.source_hw[1])
        return y0, y1, fy, x0, x1, fx

    def dense_probs(self, scores: np.ndarray) -> np.ndarray:
        """The softmax of :meth:`dense` (C x H x W float32, computed in place): the CRF's input."""
        probs = self.dense(scores)
        return softmax(probs, out=probs)

    def dense(self, scores: np.ndarray) -> np.ndarray:
        """All C x H x W resampled scores (for callers that need every plane, e.g. evaluation)."""
        height, width = self.out_size
        out = np.empty((scores.shape[0], height, width), dtype=np.float32)
        for top, band in self.bands(scores):
            out[:, top : top + band.shape[1]] = band
        return out

    def labels(self, scores: np.ndarray, chunk_bytes: int = 16 * 2**20) -> np.ndarray:
        """The argmax of the resampled scores, exactly, without resampling every class plane.

        A bilinear value is a convex combination of the four surrounding source values, so where one
        class wins at all four corners of a source cell it wins everywhere inside the cell. Those pixels
        take the cell's label directly; only pixels of cells on class borders are interpolated.
        """
        channels, lh, lw = scores.shape
        height, width = self.out_size
        y0, y1, fy = self._taps(self.rows, lh)
        x0, x1, fx = self._taps(self.cols, lw)
        coarse = scores.argmax(axis=0).astype(label_dtype(channels))
        if _is_identity(y0, fy, height) and _is_identity(x0, fx, width) and (lh, lw) == (height, width):
            return coarse  # same grid (a CRF run at the image's own size): nothing to interpolate
        below = np.vstack([coarse[1:], coarse[-1:]])
        uniform = (coarse == below) & (coarse == np.hstack([coarse[:, 1:], coarse[:, -1:]]))
        uniform &= coarse == np.hstack([below[:, 1:], below[:, -1:]])
        labels = np.empty((height, width), dtype=coarse.dtype)
        table = np.ascontiguousarray(scores.reshape(channels, -1).T, dtype=np.float32)  # cells x C
        chunk = max(4096, chunk_bytes // (channels * 4))  # border pixels per step: bounds C-wide temporaries
        band = max(1, chunk // max(1, width))  # rows per band: bounds the masks and index arrays
        for first in range(0, height, band):
            ys = slice(first, min(height, first + band))
            labels[ys] = coarse[y0[ys]][:, x0]
            rows, cols = np.nonzero(~uniform[y0[ys]][:, x0])
            rows += first
            for start in range(0, rows.size, chunk):
                r, c = rows[start : start + chunk], cols[start : start + chunk]
                wy, wx = fy[r][:, None], fx[c][:, None]
                top = table[y0[r] * lw + x0[c]] * (1 - wx) + table[y0[r] * lw + x1[c]] * wx
                bottom = table[y1[r] * lw + x0[c]] * (1 - wx) + table[y1[r] * lw + x1[c]] * wx
                labels[r, c] = (top * (1 - wy) + bottom * wy).argmax(axis=1)
        return labels


def _is_identity(low: np.ndarray, frac: np.ndarray, n: int) -> bool:
    """Whether the taps read source cell i for output i with weight 1 (same grid, half-pixel centres)."""
    return low.size == n and not frac.any() and bool((low == np.arange(n)).all())


def interpolation_matrix(
    out_n: int, input_n: int, padded_n: int, logits_n: int, corners: bool = False
) -> np.ndarray:
    """The (out_n x logits_n) bilinear weights mapping logits to output pixels along one axis."""
    frame = Frame((out_n, 1), (input_n, 1), (padded_n, 1), corners)
    return frame.resampler((logits_n, 1)).matrix(0)
