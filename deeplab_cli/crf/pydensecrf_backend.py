"""Reference backend: Krähenbühl's C++ dense CRF through the ``pydensecrf2`` package.

Installed with ``pip install deeplab-cli[crf]`` (import name ``pydensecrf``). Its arrays must be
C-contiguous: a float32 unary (C x H*W) and a uint8 H x W x 3 image.
"""

from __future__ import annotations

import numpy as np

from .params import PROB_FLOOR, CRFParams

__all__ = ["is_available", "refine_pydensecrf"]


def is_available() -> bool:
    """Whether ``pydensecrf`` can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def refine_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """Refine one (already validated) image with pydensecrf: C x H x W float32 probabilities."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        from .backends import BackendUnavailableError, install_hint

        raise BackendUnavailableError(
            f"the CRF backend 'pydensecrf' is not installed: {install_hint('pydensecrf')}"
        ) from None
    c, h, w = probs.shape
    unary = -params.unary_scale * np.log(np.maximum(probs.reshape(c, -1), PROB_FLOOR))
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    if params.pos_w > 0:
        crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    if params.bi_w > 0:
        crf.addPairwiseBilateral(
            sxy=params.bi_xy_std,
            srgb=params.bi_rgb_std,
            rgbim=np.ascontiguousarray(image, dtype=np.uint8),
            compat=params.bi_w,
        )
    q = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return np.ascontiguousarray(q.reshape(c, h, w))
