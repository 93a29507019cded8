"""float32 -> float16 for score files, bit for bit as ``ndarray.astype(np.float16)``, but fast.

numpy's cast takes a slow path for every result below float16's normal range (2**-14), where most of a
photo's softmax probabilities land: about 1 s per 8 M values here, the better part of writing a
``.probs.npz`` for a 24-megapixel photo. :func:`to_float16` uses a compiled loop (numba, a dependency
already) for large arrays and a vectorised numpy form otherwise; both round half to even like the cast,
keep NaN payloads and signs, and overflow to infinity. ``tests/test_batch.py`` checks them bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

COMPILED_MIN_SIZE = 1 << 20  # below this, the numpy form is fast enough and numba is not loaded


def to_float16(values: np.ndarray) -> np.ndarray:
    """``values.astype(np.float16)``, bit for bit (see the module docstring)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    kernel = _compiled() if values.size >= COMPILED_MIN_SIZE else None
    if kernel is None:
        return _vectorised(values)
    out = np.empty(values.shape, dtype=np.uint16)
    flat = values.reshape(-1)
    kernel(flat.view(np.uint32), flat, out.reshape(-1))
    return out.view(np.float16)


def _vectorised(values: np.ndarray) -> np.ndarray:
    """Subnormal results are multiples of 2**-24: their bits are the rounded multiple, plus the sign."""
    magnitude = np.abs(values)
    small = magnitude < np.float32(2.0**-14)
    with np.errstate(over="ignore", invalid="ignore"):  # above 65504 is inf, as the cast gives
        half = np.where(small, np.float32(0), values).astype(np.float16)
    multiples = np.rint(magnitude[small] * np.float32(2.0**24)).astype(np.uint16)
    signs = np.where(np.signbit(values[small]), np.uint16(0x8000), np.uint16(0))
    half.view(np.uint16)[small] = multiples | signs
    return half


@functools.lru_cache(maxsize=1)
def _compiled() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None:
    """The numba loop (compiled once, cached on disk by numba), or None without numba."""
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(cache=True, nogil=True)
    def halves(bits: np.ndarray, floats: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - jitted
        for i in range(bits.size):
            f = bits[i]
            sign = (f >> 16) & 0x8000
            exponent = f & 0x7F800000
            if exponent >= 0x47800000:  # NaN keeps its payload's top bits; inf and overflow give inf
                significand = f & 0x007FFFFF
                if exponent == 0x7F800000 and significand != 0:
                    h = 0x7C00 + (significand >> 13)
                    out[i] = sign | (h + 1 if h == 0x7C00 else h)
                else:
                    out[i] = sign | 0x7C00
            elif exponent >= 0x38800000:  # normal: 23 -> 10 significand bits, half to even
                h = (((exponent >> 23) - 112) << 10) | ((f & 0x007FFFFF) >> 13)
                rest = f & 0x1FFF
                if rest > 0x1000 or (rest == 0x1000 and (h & 1) == 1):
                    h += 1  # a carry into the exponent is right, up to inf
                out[i] = sign | h
            else:  # subnormal: an exact multiple of 2**-24 after an exact scaling
                out[i] = sign | np.uint32(np.rint(abs(floats[i]) * np.float32(16777216.0)))

    return halves
