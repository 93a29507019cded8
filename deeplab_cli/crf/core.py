"""The dense CRF's public entry points: input checks and backend dispatch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from deeplab_cli.device import parse_device
from deeplab_cli.errors import DeeplabError

from .backends import BACKENDS, CPU_ONLY, available_backends, choose_backend
from .params import CRFParams

__all__ = [
    "BACKENDS",
    "CRFInputError",
    "LogitsGrid",
    "available_backends",
    "check_inputs",
    "check_logits",
    "refine",
    "refine_batch",
    "refine_logits",
]


class CRFInputError(DeeplabError, ValueError):
    """The image or probabilities given to the CRF are malformed (one line; also a ``ValueError``)."""


def check_inputs(image: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate an H x W x 3 uint8 image and C x H x W probabilities; return contiguous copies/views.

    Raises :class:`CRFInputError` with a one-line message on: non-array inputs, wrong dtype or channel count,
    mismatched sizes, non-finite or negative probabilities.
    """
    if not isinstance(image, np.ndarray) or not isinstance(probs, np.ndarray):
        raise CRFInputError("CRF image and probabilities must be numpy arrays")
    _check_image_type(image)
    if probs.ndim != 3:
        raise CRFInputError(f"CRF probabilities must be C x H x W, got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise CRFInputError(f"CRF probabilities must be floating point, got {probs.dtype}")
    if probs.shape[1:] != image.shape[:2]:
        raise CRFInputError(
            f"CRF probabilities {probs.shape[1]}x{probs.shape[2]} do not match the image "
            f"{image.shape[0]}x{image.shape[1]}"
        )
    if probs.shape[0] < 1 or image.shape[0] < 1 or image.shape[1] < 1:
        raise CRFInputError(f"CRF inputs must not be empty, got probabilities of shape {probs.shape}")
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    low, high = probs.min(), probs.max()  # two passes, no temporaries; NaN propagates into both
    if not (np.isfinite(low) and np.isfinite(high)):
        raise CRFInputError("CRF probabilities contain NaN or infinite values")
    if low < 0:
        raise CRFInputError("CRF probabilities must be >= 0")
    # Read-only inputs (e.g. np.asarray of a PIL image) are copied: pydensecrf and torch need writable.
    if not probs.flags.writeable:
        probs = probs.copy()
    return _writable(image), probs


def check_logits(
    image: np.ndarray, logits: np.ndarray, grid: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate an image on the CRF's ``grid`` (H x W) and C x h x w finite logits (any sign) resampled
    onto it; return contiguous float32 logits. Raises :class:`CRFInputError` (one line)."""
    if not isinstance(image, np.ndarray) or not isinstance(logits, np.ndarray):
        raise CRFInputError("CRF image and logits must be numpy arrays")
    _check_image_type(image)
    if image.shape[:2] != tuple(grid) or min(grid) < 1:
        raise CRFInputError(f"CRF image {image.shape[0]}x{image.shape[1]} does not match its grid {grid}")
    if logits.ndim != 3 or min(logits.shape) < 1:
        raise CRFInputError(f"CRF logits must be C x h x w, got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise CRFInputError(f"CRF logits must be floating point, got {logits.dtype}")
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    if not (np.isfinite(logits.min()) and np.isfinite(logits.max())):
        raise CRFInputError("CRF logits contain NaN or infinite values")
    return _writable(image), logits


def _check_image_type(image: np.ndarray) -> None:
    if image.dtype != np.uint8:
        raise CRFInputError(f"CRF image must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise CRFInputError(f"CRF image must be H x W x 3 (RGB), got shape {image.shape}")


def _writable(image: np.ndarray) -> np.ndarray:
    image = np.ascontiguousarray(image)
    return image if image.flags.writeable else image.copy()


def refine(
    image: np.ndarray,
    probs: np.ndarray,
    params: CRFParams | None = None,
    *,
    backend: str = "auto",
    device: str | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Refine class probabilities with the dense CRF; returns C x H x W float32 probabilities.

    ``image``: H x W x 3 uint8 RGB; ``probs``: C x H x W non-negative scores (normally a softmax).
    The unary is ``-unary_scale * log(max(p, 1e-8))``. With ``iterations == 0`` the result is the softmax
    of the unary (the input renormalised, sharpened by ``unary_scale``); with one class it is all ones.
    ``backend``: one of :data:`BACKENDS` (``auto``: numba on the CPU when installed, else torch; torch on
    CUDA); ``device`` (torch only): ``cpu``, ``cuda``, ``cuda:N`` or None (CUDA when available).
    """
    return refine_batch([image], [probs], params, backend=backend, device=device, threads=threads)[0]


def refine_batch(
    images: Sequence[np.ndarray],
    probs_list: Sequence[np.ndarray],
    params: CRFParams | None = None,
    *,
    backend: str = "auto",
    device: str | None = None,
    max_batch_pixels: int = 8_000_000,
    threads: int | None = None,
) -> list[np.ndarray]:
    """Refine several images; the torch backend on CUDA runs them as one batch (up to
    ``max_batch_pixels`` pixels at a time), on CPU one by one (same-size images share the cached
    smoothness-kernel lattice). Results are in input order."""
    params = params or CRFParams()
    if not isinstance(params, CRFParams):
        raise CRFInputError(f"params must be a CRFParams, got {type(params).__name__}")
    if len(images) != len(probs_list):
        raise CRFInputError(f"got {len(images)} images but {len(probs_list)} probability maps")
    checked = [check_inputs(im, p) for im, p in zip(images, probs_list, strict=True)]
    results: list[np.ndarray | None] = [None] * len(checked)
    todo = []
    for i, (_, p) in enumerate(checked):
        if p.shape[0] == 1:
            results[i] = np.ones_like(p)
        else:
            todo.append(i)
    dev = None
    if backend in ("auto", "torch") and not _on_cpu_without_asking_torch(device):
        from .torch_backend import resolve_device

        dev = resolve_device(device)
    backend = choose_backend(backend, on_cuda=dev is not None and dev.type == "cuda")
    if backend != "torch":
        for i in todo:
            results[i] = refine_on_cpu(backend, *checked[i], params, threads)
        return results  # type: ignore[return-value]

    import torch

    from .torch_backend import refine_torch_batch

    dev = dev or torch.device("cpu")

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


class LogitsGrid(Protocol):
    """How network logits resample onto the CRF's grid (:class:`deeplab_cli.geometry.Resampler`)."""

    def taps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...

    def dense_probs(self, scores: np.ndarray) -> np.ndarray: ...


def refine_logits(
    image: np.ndarray,
    logits: np.ndarray,
    grid: LogitsGrid,
    params: CRFParams | None = None,
    *,
    backend: str = "auto",
    device: str | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """:func:`refine` of ``grid.dense_probs(logits)``, the softmax of the logits resampled onto the
    image's grid; the numba backend takes its unary from the logits in one pass instead (no C x H x W
    probabilities; equal to the other way to ~1e-6, see :func:`.numba_backend.refine_numba_logits`)."""
    name = (backend or "auto").strip().lower()
    on_cpu = name in CPU_ONLY or _on_cpu_without_asking_torch(device)
    chosen = choose_backend(name, on_cuda=False) if on_cpu else name
    if chosen == "numba":
        from .numba_backend import refine_numba_logits

        return refine_numba_logits(image, logits, grid.taps(), params or CRFParams(), threads)
    return refine(image, grid.dense_probs(logits), params, backend=backend, device=device, threads=threads)


def _on_cpu_without_asking_torch(device: object) -> bool:
    """Whether ``device`` (``None``, ``auto`` or ``cpu``) places torch on the CPU, answered as the CRF
    runner answers it (:meth:`Device.torch_device_name`): without importing torch where no GPU device
    exists. Anything else (``cuda:N``, a ``torch.device``) is left to the torch backend to resolve."""
    if device is not None and not (isinstance(device, str) and device in ("auto", "cpu")):
        return False
    return parse_device(device).torch_device_name() == "cpu"


def refine_on_cpu(
    backend: str, image: np.ndarray, probs: np.ndarray, params: CRFParams, threads: int | None = None
) -> np.ndarray:
    """One checked image with a CPU-only backend (``numba`` or ``pydensecrf``)."""
    if backend == "numba":
        from .numba_backend import refine_numba

        return refine_numba(image, probs, params, threads=threads)
    from .pydensecrf_backend import refine_pydensecrf

    return refine_pydensecrf(image, probs, params)
