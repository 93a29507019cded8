"""The default CPU backend: the exact permutohedral mean-field compiled with numba.

Same maths and float32 rounding order as pydensecrf (Krähenbühl's C++; see :mod:`._numba_kernels`):
results agree with pydensecrf to a few 1e-6. The lattice is built once per image and kernel (the
smoothness kernel's is cached per image size), neighbour indices are precomputed, label vectors are
contiguous and padded to whole SIMD vectors; the splat is a serial scatter in pixel order (the two
kernels on two threads, the smoothness kernel's blur after its splat), the appearance blur and slice +
softmax run on all of numba's threads (vertices, pixels). The lattice's serial vertex insertion runs on
a helper thread while the unary is made. Per core it does about a third of pydensecrf's work (see
benchmarks/bench_crf.py for the measured ratios).

The kernels are compiled on first use (``cache=True``): ~15 s on an idle 16-core machine, 36 s on an
idle 2-core one, up to a minute on a busy small one, once per machine and numba version. The code is
written next to the module (``__pycache__``, or numba's user cache directory when that is not writable);
later processes, CRF worker processes included, load it from there (~0.5 s). Threads come from numba's
TBB layer where the ``tbb`` wheel is installed (Linux x86-64: a dependency), else from its ``workqueue``
layer (10% slower here: ~25 us per parallel launch, against ~2.5 us). Calls are serialised by a lock
(workqueue is not reentrant; each call uses ``threads`` cores anyway).
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from typing import TypeVar

import numpy as np

from .params import LATTICE_POINT_BLOCK, PROB_FLOOR, CRFParams

__all__ = [
    "is_available",
    "refine_numba",
    "refine_numba_logits",
    "build_lattice",
    "NumbaLattice",
    "clear_cache",
    "warm_up",
]

R = TypeVar("R")
S = TypeVar("S")
_LOCK = threading.RLock()
_POS_CACHE: OrderedDict[tuple[int, int, float], NumbaLattice] = OrderedDict()
_POS_CACHE_SIZE = 4
LABEL_PAD = 8  # label vectors are padded to whole AVX vectors (24 floats for 21 labels)


@lru_cache(maxsize=1)
def is_available() -> bool:
    """Whether numba imports (and with it our compiled kernels' dependencies)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class NumbaLattice:
    """A permutohedral lattice over N points of dimension ``d`` with M vertices.

    ``offsets``/``bary`` (N x (d+1)): each point's simplex corners and barycentric weights;
    ``nbr`` ((d+1) x M x 2): previous/next vertex per axis (-1 absent); ``norm``: the symmetric
    normaliser ``1 / sqrt(K 1 + 1e-20)``.
    """

    d: int
    offsets: np.ndarray
    bary: np.ndarray
    nbr: np.ndarray
    norm: np.ndarray

    @property
    def n_vertices(self) -> int:
        return int(self.nbr.shape[1])

    @cached_property
    def splat_lists(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The splat as lists per vertex (CSR ``ptr, pix, wts``, points ascending): for inspection."""
        from . import _numba_kernels as nk

        return nk.splat_lists(self.offsets, self.bary, self.n_vertices)


def _scale_factors(d: int) -> np.ndarray:
    """Diagonal of the elevation matrix times the lattice's inverse std, rounded as densecrf does."""
    inv_std = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return np.array([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)], np.float32)


def build_lattice(features: np.ndarray) -> NumbaLattice:
    """The lattice of N x d float32 features (already divided by the kernel's stds), with its normaliser."""
    return _build_lattice_beside(features, lambda: None)[0]


def _build_lattice_beside(features: np.ndarray, beside: Callable[[], R]) -> tuple[NumbaLattice, R]:
    """:func:`build_lattice`, calling ``beside()`` meanwhile; returns the lattice and what it returned.

    The vertex insertion is the one serial step of the build (densecrf's numbering is the order of first
    use); with two or more numba threads it runs on a helper thread (the kernel releases the GIL) while
    this thread runs ``beside`` (parallel kernels allowed) on one numba thread fewer, so that a second
    core is not left idle for those ~17 ms per VOC image. The blur neighbours and the normaliser follow
    on all threads. (Also finding the neighbours and the normaliser on the helper, serially, balanced
    the two sides while the unary took as long as the insertion; with the unary at ~11 ms it is ~2%
    slower end to end.)
    """
    from . import _numba_kernels as nk

    features = np.ascontiguousarray(features, dtype=np.float32)
    n, d = features.shape
    if n % LATTICE_POINT_BLOCK:  # densecrf's padding point, see LATTICE_POINT_BLOCK
        features = np.concatenate([features, np.zeros((1, d), np.float32)])
    rem0, rank = np.empty((2, len(features), d + 1), np.int32)
    bary = np.empty((len(features), d + 1), np.float32)
    with _LOCK:
        nk.locate(features, _scale_factors(d), rem0, rank, bary)
        bary = bary[:n]  # the padding point splats and slices nothing
        (offsets, keys, table), result = _side_by_side(partial(nk.insert_vertices, rem0, rank), beside)
        nbr = nk.blur_neighbours(keys, table)
        ones = nk.filter_ones(offsets[:n], bary, nbr)
        del rem0, rank
        offsets = offsets[:n]
    norm = (1.0 / np.sqrt(ones.astype(np.float64) + 1e-20)).astype(np.float32)
    return NumbaLattice(d, offsets, bary, nbr, norm), result


def _side_by_side(serial: Callable[[], S], beside: Callable[[], R]) -> tuple[S, R]:
    """``(serial(), beside())``: ``serial`` (a GIL-releasing, non-parallel kernel) on a helper thread and
    ``beside`` here with one numba thread fewer, when this thread has two or more; else one after the
    other. Only this thread launches parallel kernels (numba's workqueue layer is not reentrant)."""
    import numba

    threads = numba.get_num_threads()
    if threads < 2:
        return serial(), beside()
    done: list[S] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(serial())
        except BaseException as exc:  # handed to the caller's thread below
            failed.append(exc)

    helper = threading.Thread(target=run, name="deeplab-crf-lattice", daemon=True)
    helper.start()
    try:
        numba.set_num_threads(threads - 1)  # per thread: the helper's core is taken
        try:
            result = beside()
        finally:
            numba.set_num_threads(threads)
    finally:
        helper.join()
    if failed:
        raise failed[0]
    return done[0], result


def positional_features(h: int, w: int, std: float) -> np.ndarray:
    """(H*W x 2) float32 (x/std, y/std) in row-major pixel order, as DenseCRF2D."""
    s = np.float32(std)
    x = np.arange(w, dtype=np.float32) / s
    y = np.arange(h, dtype=np.float32) / s
    return np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y[:, None], (h, w))], axis=2).reshape(-1, 2)


def bilateral_features(image: np.ndarray, xy_std: float, rgb_std: float) -> np.ndarray:
    """(H*W x 5) float32 (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) of an H x W x 3 uint8 image: one
    compiled pass, the float32 divisions numpy makes (its five temporaries took ~5 ms per VOC image)."""
    from . import _numba_kernels as nk

    h, w, _ = image.shape
    out = np.empty((h * w, 5), np.float32)
    nk.bilateral_features(np.ascontiguousarray(image), np.float32(xy_std), np.float32(rgb_std), out)
    return out


def _positional_lattice(h: int, w: int, std: float) -> NumbaLattice:
    """The smoothness kernel's lattice depends only on the image size: keep the last few."""
    key = (h, w, float(std))
    lat = _POS_CACHE.get(key)
    if lat is None:
        lat = _POS_CACHE[key] = build_lattice(positional_features(h, w, std))
        while len(_POS_CACHE) > _POS_CACHE_SIZE:
            _POS_CACHE.popitem(last=False)
    else:
        _POS_CACHE.move_to_end(key)
    return lat


def clear_cache() -> None:
    """Forget cached smoothness lattices (benchmarks time cold builds with it)."""
    with _LOCK:
        _POS_CACHE.clear()


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` of numba's threads (capped at ``NUMBA_NUM_THREADS``) for this call."""
    import numba

    from . import _numba_kernels  # noqa: F401 - it picks the threading layer, fixed by numba's first thread call

    if threads is None or threads == 0:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"CRF threads must be a non-negative integer, got {threads!r}")
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def unary_rows(probs: np.ndarray, unary_scale: float) -> np.ndarray:
    """``-U`` as N x C' float32 rows (C' = C padded to whole vectors with zeros) for C x H x W ``probs``,
    ``U = -unary_scale * log(max(p, 1e-8))`` as the pydensecrf backend computes it (to within 1 ulp of
    its log: a vector log)."""
    c = probs.shape[0]
    neg = np.empty((probs[0].size, _padded(c)), np.float32)
    _unary_from_probs(probs, unary_scale, neg, neg[:0])
    return neg


def _padded(c: int) -> int:
    return -(-c // LABEL_PAD) * LABEL_PAD


def _unary_from_probs(probs: np.ndarray, unary_scale: float, neg: np.ndarray, start: np.ndarray) -> None:
    """Fill ``neg`` with the ``-U`` rows of ``probs`` and ``start`` (0 rows: skipped) with their softmax."""
    from . import _numba_kernels as nk

    planes = np.ascontiguousarray(probs.reshape(probs.shape[0], -1), dtype=np.float32)
    nk.unary_from_probs(planes, np.float32(unary_scale), np.float32(PROB_FLOOR), neg, start)


def lattices_for(image: np.ndarray, params: CRFParams) -> tuple[list[NumbaLattice], list[float]]:
    """The kernels' lattices in densecrf's order (smoothness first), with their Potts weights."""
    lattices, weights, _ = _lattices_beside(image, params, lambda: None)
    return lattices, weights


def _lattices_beside(
    image: np.ndarray, params: CRFParams, beside: Callable[[], R]
) -> tuple[list[NumbaLattice], list[float], R]:
    """:func:`lattices_for`, with ``beside()`` run during the appearance lattice's serial insertion."""
    h, w, _ = image.shape
    lattices, weights = [], []
    if params.pos_w > 0:
        lattices.append(_positional_lattice(h, w, params.pos_xy_std))
        weights.append(params.pos_w)
    if params.bi_w <= 0:
        return lattices, weights, beside()
    features = bilateral_features(image, params.bi_xy_std, params.bi_rgb_std)
    lattice, result = _build_lattice_beside(features, beside)
    return [*lattices, lattice], [*weights, params.bi_w], result


def refine_numba(
    image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None, threads: int | None = None
) -> np.ndarray:
    """Refine class probabilities with the dense CRF; returns C x H x W float32 probabilities.

    The contract of :func:`deeplab_cli.crf.refine`: ``image`` H x W x 3 uint8, ``probs`` C x H x W
    non-negative (bad inputs raise ``ValueError``); ``iterations == 0`` gives the softmax of the unary, one
    class gives all ones. ``threads``: numba threads for this call (None or 0: all of them).
    """
    from .core import check_inputs

    params = _checked(params)
    image, probs = check_inputs(image, probs)
    if probs.shape[0] == 1:
        return np.ones_like(probs)
    with _LOCK, _num_threads(threads):
        return _refine(image, partial(_unary_from_probs, probs, params.unary_scale), probs.shape[0], params)


Taps = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def refine_numba_logits(
    image: np.ndarray,
    logits: np.ndarray,
    taps: Taps,
    params: CRFParams | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """:func:`refine_numba` of the softmax of bilinearly resampled logits, without making it.

    ``logits``: C x h x w network scores; ``taps``: how they resample onto the image's H x W grid
    (:meth:`deeplab_cli.geometry.Resampler.taps`). The unary comes from one compiled pass (resampling,
    log-softmax, floor); it equals the one :func:`refine_numba` computes from the probabilities to a few
    float32 ulps (a log-softmax instead of the log of a softmax).
    """
    from . import _numba_kernels as nk
    from .core import CRFInputError, check_logits

    params = _checked(params)
    y0, y1, x0, x1 = (np.ascontiguousarray(taps[i], dtype=np.int64) for i in (0, 1, 3, 4))
    fy, fx = (np.ascontiguousarray(taps[i], dtype=np.float32) for i in (2, 5))
    image, logits = check_logits(image, logits, (y0.size, x0.size))
    c, h, w = logits.shape
    for index, n in ((y0, h), (y1, h), (x0, w), (x1, w)):
        if index.size and (index.min() < 0 or index.max() >= n):
            raise CRFInputError(f"CRF resampling taps fall outside the {h}x{w} logits")
    if c == 1:
        return np.ones((1, *image.shape[:2]), np.float32)

    def unary(neg: np.ndarray, start: np.ndarray) -> None:
        rows = np.zeros((h * w, _padded(c)), np.float32)
        nk.rows_from_planes(logits.reshape(c, -1), rows)
        floor = np.log(np.float32(PROB_FLOOR))
        scale = np.float32(params.unary_scale)
        nk.unary_from_logits(rows, w, y0, y1, fy, x0, x1, fx, c, scale, floor, neg, start)

    with _LOCK, _num_threads(threads):
        return _refine(image, unary, c, params)


def warm_up(when_slow: Callable[[], object] | None = None, slow_s: float = 2.0) -> None:
    """Compile (the first use on this machine) or load every kernel that :func:`refine_numba` and
    :func:`refine_numba_logits` run, one process at a time: CRF workers that start together on a cold
    cache then compile once (36 s on a 2-core machine), not once each; the others load what it wrote.
    ``when_slow()`` is called if this process's turn takes more than ``slow_s`` (loading takes ~0.5 s:
    it is compiling)."""
    image = np.zeros((4, 4, 3), np.uint8)
    params = CRFParams(iterations=1)
    near, far, weight = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), np.full(4, 0.5, np.float32)
    with _one_process_at_a_time():
        timer = threading.Timer(slow_s, when_slow or (lambda: None))
        timer.daemon = True
        timer.start()
        try:
            refine_numba(image, np.full((2, 4, 4), 0.5, np.float32), params)
            refine_numba_logits(image, np.zeros((2, 2, 2), np.float32), (near, far, weight) * 2, params)
        finally:
            timer.cancel()


@contextmanager
def _one_process_at_a_time() -> Iterator[None]:
    """An exclusive lock for this user's processes on this machine (a lock file in the temp folder); none
    where there is no ``fcntl`` or no writable temp folder (then each process compiles for itself)."""
    path = os.path.join(tempfile.gettempdir(), f"deeplab-numba-crf-{getattr(os, 'getuid', int)()}.lock")
    try:
        import fcntl

        handle = open(path, "a")  # noqa: SIM115 - closed below; failing to open it means no lock
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _checked(params: CRFParams | None) -> CRFParams:
    params = params or CRFParams()
    if not isinstance(params, CRFParams):
        raise ValueError(f"params must be a CRFParams, got {type(params).__name__}")
    return params


UnaryFill = Callable[[np.ndarray, np.ndarray], None]


def _refine(image: np.ndarray, unary: UnaryFill, c: int, params: CRFParams) -> np.ndarray:
    """The mean field from the unary; C x H x W probabilities. Holds the lock.

    ``unary(neg, start)`` fills the N x C' rows ``neg`` with ``-U`` (padding zero) and ``start`` with
    their softmax (the first Q; 0 rows: not wanted). It runs while the lattice's vertices are inserted.
    """
    from . import _numba_kernels as nk

    h, w = image.shape[:2]
    out = np.empty((c, h * w), np.float32)
    neg = np.empty((h * w, _padded(c)), np.float32)
    if params.iterations == 0 or (params.pos_w <= 0 and params.bi_w <= 0):  # the softmax of the unary
        unary(neg, neg[:0])
        nk.softmax_rows(neg, c, out, True)
        return out.reshape(c, h, w)
    q = np.empty_like(neg)
    lattices, weights, _ = _lattices_beside(image, params, partial(unary, neg, q))
    first, second = lattices[0], lattices[-1]
    nk.mean_field(
        neg, q, params.iterations, len(lattices), np.array(weights, np.float32),
        first.offsets, first.bary, first.nbr, first.norm,
        second.offsets, second.bary, second.nbr, second.norm,
        c <= 2, c, out,
    )  # fmt: skip
    return out.reshape(c, h, w)
