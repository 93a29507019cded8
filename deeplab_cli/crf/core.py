"""The dense CRF's public entry points: input checks and backend dispatch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .params import CRFParams

__all__ = ["BACKENDS", "available_backends", "refine", "refine_batch", "check_inputs"]

BACKENDS = ("torch", "pydensecrf")


def available_backends() -> list[str]:
    """The backends usable in this environment (``torch`` always; ``pydensecrf`` if installed)."""
    from .pydensecrf_backend import is_available

    return ["torch"] + (["pydensecrf"] if is_available() else [])


def check_inputs(image: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate an H x W x 3 uint8 image and C x H x W probabilities; return contiguous copies/views.

    Raises ValueError with a one-line message on: non-array inputs, wrong dtype or channel count,
    mismatched sizes, non-finite or negative probabilities.
    """
    if not isinstance(image, np.ndarray) or not isinstance(probs, np.ndarray):
        raise ValueError("CRF image and probabilities must be numpy arrays")
    if image.dtype != np.uint8:
        raise ValueError(f"CRF image must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF image must be H x W x 3 (RGB), got shape {image.shape}")
    if probs.ndim != 3:
        raise ValueError(f"CRF probabilities must be C x H x W, got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"CRF probabilities must be floating point, got {probs.dtype}")
    if probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"CRF probabilities {probs.shape[1]}x{probs.shape[2]} do not match the image "
            f"{image.shape[0]}x{image.shape[1]}"
        )
    if probs.shape[0] < 1 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"CRF inputs must not be empty, got probabilities of shape {probs.shape}")
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    if not np.isfinite(probs).all():
        raise ValueError("CRF probabilities contain NaN or infinite values")
    if (probs < 0).any():
        raise ValueError("CRF probabilities must be >= 0")
    image = np.ascontiguousarray(image)
    # Read-only inputs (e.g. np.asarray of a PIL image) are copied: pydensecrf and torch need writable.
    if not image.flags.writeable:
        image = image.copy()
    if not probs.flags.writeable:
        probs = probs.copy()
    return image, probs


def _check_backend(backend: str) -> str:
    if backend == "auto":
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown CRF backend {backend!r} (choose from auto, {', '.join(BACKENDS)})")
    return backend


def refine(
    image: np.ndarray,
    probs: np.ndarray,
    params: CRFParams | None = None,
    *,
    backend: str = "auto",
    device: str | None = None,
) -> np.ndarray:
    """Refine class probabilities with the dense CRF; returns C x H x W float32 probabilities.

    ``image``: H x W x 3 uint8 RGB; ``probs``: C x H x W non-negative scores (normally a softmax).
    The unary is ``-unary_scale * log(max(p, 1e-8))``. With ``iterations == 0`` the result is the softmax
    of the unary (the input renormalised, sharpened by ``unary_scale``); with one class it is all ones.
    ``backend``: ``auto`` (= ``torch``), ``torch`` or ``pydensecrf``; ``device`` (torch only): ``cpu``,
    ``cuda``, ``cuda:N`` or None (CUDA when available).
    """
    return refine_batch([image], [probs], params, backend=backend, device=device)[0]


def refine_batch(
    images: Sequence[np.ndarray],
    probs_list: Sequence[np.ndarray],
    params: CRFParams | None = None,
    *,
    backend: str = "auto",
    device: str | None = None,
    max_batch_pixels: int = 8_000_000,
) -> list[np.ndarray]:
    """Refine several images; the torch backend on CUDA runs them as one batch (up to
    ``max_batch_pixels`` pixels at a time), on CPU one by one (same-size images share the cached
    smoothness-kernel lattice). Results are in input order."""
    params = params or CRFParams()
    if not isinstance(params, CRFParams):
        raise ValueError(f"params must be a CRFParams, got {type(params).__name__}")
    backend = _check_backend(backend)
    if len(images) != len(probs_list):
        raise ValueError(f"got {len(images)} images but {len(probs_list)} probability maps")
    checked = [check_inputs(im, p) for im, p in zip(images, probs_list, strict=True)]
    results: list[np.ndarray | None] = [None] * len(checked)
    todo = []
    for i, (_, p) in enumerate(checked):
        if p.shape[0] == 1:
            results[i] = np.ones_like(p)
        else:
            todo.append(i)
    if backend == "pydensecrf":
        from .pydensecrf_backend import refine_pydensecrf

        for i in todo:
            results[i] = refine_pydensecrf(*checked[i], params)
        return results  # type: ignore[return-value]

    import torch

    from .torch_backend import refine_torch_batch, resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu":
        groups = [[i] for i in todo]
    else:
        groups, current, pixels = [], [], 0
        for i in todo:
            n = checked[i][1].shape[1] * checked[i][1].shape[2]
            same_classes = not current or checked[current[0]][1].shape[0] == checked[i][1].shape[0]
            if current and (pixels + n > max_batch_pixels or not same_classes):
                groups.append(current)
                current, pixels = [], 0
            current.append(i)
            pixels += n
        if current:
            groups.append(current)
    with torch.no_grad():
        for group in groups:
            outs = refine_torch_batch(
                [checked[i][0] for i in group], [checked[i][1] for i in group], params, dev
            )
            for i, out in zip(group, outs, strict=True):
                results[i] = out
    return results  # type: ignore[return-value]
