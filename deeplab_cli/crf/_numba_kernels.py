"""Compiled kernels of the numba CRF backend: lattice construction and the mean-field loop.

Everything here follows Krähenbühl's ``permutohedral.cpp`` / ``densecrf.cpp`` (the code pydensecrf wraps)
operation by operation, in float32 with the same rounding order, so that results agree with pydensecrf up
to the last bits of ``exp`` and of the softmax sum:

* lattice: elevation, rounding half to even, ranking (same tie-breaks), barycentric weights, and vertices
  numbered in order of first use by the pixels (the hash-table order densecrf gets), with 32-bit keys
  instead of 16-bit ones (no overflow on large images); like densecrf's x86 build, the vertices of an
  all-zero padding point follow when N is not a multiple of 4 (see ``params.LATTICE_POINT_BLOCK``);
* splat as densecrf's serial scatter in pixel order (bit-identical sums); the two kernels' splats run on
  two threads side by side (the first kernel's blur follows its splat on the same thread, while the
  second kernel, twice the corners, is still splatting), so no sum depends on the thread count;
* blur ``v + 0.5 (v[prev] + v[next])`` along the d+1 axes, a missing neighbour reading a zero row;
* slice ``sum_r (w_r alpha) v[o_r]`` (densecrf's SSE path, used for more than two labels) or
  ``sum_r (w_r v[o_r]) alpha`` (its scalar path: the normaliser and two labels);
* softmax ``exp(x - max) / sum`` per pixel, Cephes' exp polynomial (as Eigen's), the sum over 8-lane
  partials (Eigen's packets sum in its own order too).

Values are vertex-major (V x C, a vertex's labels contiguous, C padded to a multiple of 8); splat, blur,
slice and softmax work on 8 labels at a time as explicit vectors (:mod:`._simd`: LLVM's own vectoriser
left 24 labels to its 4-lane remainder loop); ``prange`` runs over the kernels (splat), vertices (blur)
and blocks of pixels (slice + softmax). DenseCRF2D's pair of lattices (3 and 6 corners) is sliced in one
pass, and 24-label rows are softmaxed two at a time (:func:`_slice_both_2d`,
:func:`_softmax_two_rows_of_24`: the same operations, bit for bit). No ``fastmath``: reassociation
would change the rounding order that makes the results match.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import sys

import numba
import numpy as np
from numba import njit, prange

from ._simd import LANES, hmax, hsum, load8, splat8, store8, vadd, vdiv, vexp, vlog, vmax, vmul, vsub


def _load_pip_tbb() -> None:
    """Make the ``tbb`` wheel's library visible to numba's TBB layer.

    pip installs libtbb under ``<prefix>/lib``, off the dynamic loader's path, so numba would not find it
    and would use its workqueue layer instead: ~25 us per parallel launch instead of ~2.5 us on a 2-core
    VM, 10% of a VOC-sized CRF's wall time (the mean field launches ~80 parallel loops). Loaded by path
    and globally, numba's own lookup by name then finds it.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        dist = importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        return
    for file in dist.files or ():
        if file.name == "libtbb.so.12":
            with contextlib.suppress(OSError):  # then numba uses workqueue, as without the wheel
                ctypes.CDLL(str(dist.locate_file(file)), mode=ctypes.RTLD_GLOBAL)
            return


_load_pip_tbb()  # also where NUMBA_THREADING_LAYER asks for tbb
if "NUMBA_THREADING_LAYER" not in os.environ:
    # GNU OpenMP (numba's default layer on Linux) breaks a fork()ed child that runs parallel code after
    # its parent did; "forksafe" picks TBB if it loads (fork-safe from the thread that started it, and
    # unlike workqueue, reentrant), else workqueue on Linux, OpenMP elsewhere.
    numba.config.THREADING_LAYER = "forksafe"

BLOCK = 512  # pixels per parallel task where a task needs scratch memory
SUB = 64  # pixels sliced before their softmax (the two loops pipeline better apart)
_HASH_MUL = np.uint64(2531011)
_MISSING = -1


@njit(cache=True, parallel=True)
def locate(
    features: np.ndarray, scale: np.ndarray, rem0: np.ndarray, rank: np.ndarray, bary: np.ndarray
) -> None:
    """Enclosing simplex of every point: remainder-0 corner ``rem0``, ``rank`` and barycentric weights.

    ``features`` N x d float32; outputs N x (d+1) (int32, int32, float32). DenseCRF2D's dimensions (2
    and 5) are compiled as constants: their loops unrolled, 25-40% faster.
    """
    k1 = features.shape[1] + 1
    if k1 == 6:
        _locate_all(features, scale, rem0, rank, bary, 6)
    elif k1 == 3:
        _locate_all(features, scale, rem0, rank, bary, 3)
    else:
        _locate_all(features, scale, rem0, rank, bary, k1)


@njit(cache=True, inline="always")
def _locate_all(
    features: np.ndarray, scale: np.ndarray, rem0: np.ndarray, rank: np.ndarray, bary: np.ndarray, k1: int
) -> None:
    n = features.shape[0]
    n_blocks = (n + BLOCK - 1) // BLOCK
    for b in prange(n_blocks):
        elevated = np.empty(k1, np.float32)
        r0 = np.empty(k1, np.float32)
        rk = np.empty(k1, np.int32)
        bc = np.empty(k1 + 1, np.float32)
        for p in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            _locate_point(features[p], scale, k1, elevated, r0, rk, bc)
            for i in range(k1):
                rem0[p, i] = np.int32(r0[i])
                rank[p, i] = rk[i]
                bary[p, i] = bc[i]


@njit(cache=True, inline="always")
def _locate_point(
    x: np.ndarray, scale: np.ndarray, k1: int, elevated: np.ndarray, r0: np.ndarray, rk: np.ndarray,
    bc: np.ndarray,
) -> None:  # fmt: skip
    """One point ``x``'s remainder-0 corner ``r0``, ranks ``rk`` and barycentric weights ``bc[:k1]``."""
    d = k1 - 1
    down = np.float32(1.0) / np.float32(k1)
    up = np.float32(k1)
    sm = np.float32(0.0)
    for j in range(d, 0, -1):
        cf = x[j - 1] * scale[j - 1]
        elevated[j] = sm - np.float32(j) * cf
        sm += cf
    elevated[0] = sm
    total = np.float32(0.0)
    for i in range(k1):
        v = np.float32(np.rint(down * elevated[i]))
        r0[i] = v * up
        total += v
        rk[i] = 0
    for i in range(d):  # branch-free: the comparisons are data-dependent coin flips
        di = elevated[i] - r0[i]
        for j in range(i + 1, k1):
            below = np.int32(di < elevated[j] - r0[j])
            rk[i] += below
            rk[j] += np.int32(1) - below
    shift = np.int32(total)
    for i in range(k1):
        rk[i] += shift
        if rk[i] < 0:
            rk[i] += k1
            r0[i] += up
        elif rk[i] >= k1:
            rk[i] -= k1
            r0[i] -= up
    for i in range(k1 + 1):
        bc[i] = np.float32(0.0)
    for i in range(k1):
        v = (elevated[i] - r0[i]) * down
        q = d - rk[i]
        bc[q] += v
        bc[q + 1] -= v
    bc[0] += np.float32(1.0) + bc[k1]


@njit(cache=True, parallel=True)
def bilateral_features(image: np.ndarray, xy_std: np.float32, rgb_std: np.float32, out: np.ndarray) -> None:
    """DenseCRF2D's bilateral features of an H x W x 3 uint8 image into the H*W x 5 float32 ``out``:
    ``(x, y) / xy_std, (r, g, b) / rgb_std`` per pixel, row-major."""
    h, w, _ = image.shape
    for y in prange(h):
        fy = np.float32(y) / xy_std
        for x in range(w):
            row = out[y * w + x]
            row[0] = np.float32(x) / xy_std
            row[1] = fy
            for k in range(3):
                row[2 + k] = np.float32(image[y, x, k]) / rgb_std


@njit(cache=True, inline="always")
def _mix(h: np.uint64) -> np.uint64:
    return h ^ (h >> np.uint64(29))


@njit(cache=True)
def _hash(keys: np.ndarray, row: int) -> np.uint64:
    """Vertex ``row``'s hash: ``sum_i k_i MUL**(d-i)`` (mod 2**64, keys sign-extended), then mixed.

    Linear in the keys before the mix, so that :func:`insert_vertices` gets a simplex's d+1 corner hashes
    and :func:`blur_neighbours` a vertex's d+1 neighbours' hashes incrementally from one base value.
    """
    h = np.uint64(0)
    for i in range(keys.shape[1]):
        h = (h + np.uint64(np.int64(keys[row, i]))) * _HASH_MUL
    return _mix(h)


@njit(cache=True)
def _rehash(keys: np.ndarray, m: int, capacity: int) -> np.ndarray:
    table = np.full(capacity, -1, np.int32)
    mask = np.uint64(capacity - 1)
    for e in range(m):
        h = _hash(keys, e) & mask
        while table[h] >= 0:
            h = (h + np.uint64(1)) & mask
        table[h] = e
    return table


@njit(cache=True, inline="always")
def _corner(rem0: np.ndarray, rank: np.ndarray, p: int, r: int, i: int, k1: int) -> np.int32:
    """Coordinate ``i`` of corner ``r`` of point ``p``'s simplex (``k1`` = d+1 corners): the canonical
    simplex adds r to the coordinates ranked <= d - r and r - (d+1) to those above."""
    return rem0[p, i] + (r if rank[p, i] <= k1 - 1 - r else r - k1)


@njit(cache=True, inline="always")
def _vertex_is_corner(
    keys: np.ndarray, e: int, rem0: np.ndarray, rank: np.ndarray, p: int, r: int, k1: int
) -> bool:
    for i in range(k1 - 1):  # noqa: SIM110 - numba compiles the loop, not all() of a generator
        if keys[e, i] != _corner(rem0, rank, p, r, i, k1):
            return False
    return True


@njit(cache=True, nogil=True)
def insert_vertices(rem0: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Number the simplex corners of all points in order of first use (densecrf's hash-table order).

    Returns ``offsets`` (N x (d+1) int32: vertex of each corner), the vertex ``keys`` (M x d int32, the
    first d lattice coordinates) and the final hash ``table`` (power-of-two size, -1 = empty).

    Corner hashes come incrementally (see :func:`_hash`): corner r's key is the base key plus r on every
    coordinate, minus d+1 on those ranked above d - r; going from corner r-1 to r moves one coordinate,
    the one ranked d - r + 1, into that set. The hash's unmixed value follows with two additions.
    DenseCRF2D's dimensions are compiled as constants (see :func:`locate`; 12-23% faster).
    """
    k1 = rem0.shape[1]
    if k1 == 6:
        return _insert_all(rem0, rank, 6)
    if k1 == 3:
        return _insert_all(rem0, rank, 3)
    return _insert_all(rem0, rank, k1)


@njit(cache=True, inline="always")
def _insert_all(rem0: np.ndarray, rank: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = rem0.shape[0]
    d = k1 - 1
    capacity = 1024
    while capacity < 2 * n:
        capacity *= 2
    table = np.full(capacity, -1, np.int32)
    keys = np.empty((max(n, 16), d), np.int32)
    offsets = np.empty((n, k1), np.int32)
    power, every = _hash_powers(d)
    by_rank = np.empty(k1, np.int64)
    m = 0
    for p in range(n):
        if p > 0:  # neighbouring pixels often share their simplex: reuse its vertices without hashing
            same = True
            for i in range(k1):
                if rem0[p, i] != rem0[p - 1, i] or rank[p, i] != rank[p - 1, i]:
                    same = False
                    break
            if same:
                for r in range(k1):
                    offsets[p, r] = offsets[p - 1, r]
                continue
        base = np.uint64(0)
        for i in range(d):
            base += np.uint64(np.int64(rem0[p, i])) * power[i]
        for i in range(k1):
            by_rank[rank[p, i]] = i
        lowered = np.uint64(0)  # unmixed hash of the coordinates ranked above d - r
        for r in range(k1):
            if r > 0:
                moved = by_rank[d - r + 1]
                if moved < d:  # the last coordinate is not part of the key
                    lowered += power[moved]
            if 2 * m >= capacity:
                capacity *= 2
                table = _rehash(keys, m, capacity)
            mask = np.uint64(capacity - 1)
            h = _mix(base + np.uint64(r) * every - np.uint64(k1) * lowered) & mask
            while True:
                e = table[h]
                if e < 0:
                    if m == keys.shape[0]:
                        grown = np.empty((2 * m, d), np.int32)
                        grown[:m] = keys
                        keys = grown
                    for i in range(d):
                        keys[m, i] = _corner(rem0, rank, p, r, i, k1)
                    table[h] = m
                    e = m
                    m += 1
                    break
                if _vertex_is_corner(keys, e, rem0, rank, p, r, k1):
                    break
                h = (h + np.uint64(1)) & mask
            offsets[p, r] = e
    return offsets, keys[:m].copy(), table


@njit(cache=True, parallel=True)
def blur_neighbours(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(d+1) x M x 2 int32: previous and next vertex along each lattice axis (-1 where absent).

    Only the next vertices are looked up: ``u`` next of ``v`` means ``v`` previous of ``u`` (the two steps
    are inverse), so the previous ones are filled in from the same lookup, half the hash probes. Each
    ``u`` has one previous vertex, so no two threads write the same entry.
    """
    m, d = keys.shape
    k1 = d + 1
    out = np.full((k1, m, 2), _MISSING, np.int32)
    power, every = _hash_powers(d)
    mask = np.uint64(table.size - 1)
    n_blocks = (m + BLOCK - 1) // BLOCK
    for b in prange(n_blocks):
        for v in range(b * BLOCK, min(m, (b + 1) * BLOCK)):
            plus_one = every  # unmixed hash of keys[v] + 1 (see _hash: linear in the keys)
            for i in range(d):
                plus_one += np.uint64(np.int64(keys[v, i])) * power[i]
            for j in range(k1):
                # axis j: +1 on every coordinate but the j-th, which takes -d (+1 - (d+1))
                h = _mix(plus_one - np.uint64(k1) * power[j] if j < d else plus_one) & mask
                u = _MISSING
                while True:
                    e = table[h]
                    if e < 0:
                        break
                    if _is_step(keys, e, v, j):
                        u = e
                        break
                    h = (h + np.uint64(1)) & mask
                out[j, v, 1] = u
                if u >= 0:
                    out[j, u, 0] = v
    return out


@njit(cache=True, inline="always")
def _is_step(keys: np.ndarray, e: int, v: int, j: int) -> bool:
    """Whether vertex ``e`` is vertex ``v`` moved one step along lattice axis ``j``."""
    d = keys.shape[1]
    for i in range(d):  # noqa: SIM110 - numba compiles the loop, not all() of a generator
        if keys[e, i] != keys[v, i] + (1 if i != j else -d):
            return False
    return True


@njit(cache=True)
def _hash_powers(d: int) -> tuple[np.ndarray, np.uint64]:
    """``MUL**(d-i)`` for i < d (coordinate i's factor in the unmixed hash, see :func:`_hash`) and their
    sum (the unmixed hash of +1 on every coordinate)."""
    power = np.empty(d, np.uint64)
    factor = np.uint64(1)
    every = np.uint64(0)
    for i in range(d - 1, -1, -1):
        factor *= _HASH_MUL
        power[i] = factor
        every += factor
    return power, every


@njit(cache=True)
def splat_lists(offsets: np.ndarray, bary: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The splat as lists per vertex (CSR): pixel ids and barycentric weights, pixels ascending."""
    n, k1 = offsets.shape
    ptr = np.zeros(m + 1, np.int64)
    for p in range(n):
        for r in range(k1):
            ptr[offsets[p, r] + 1] += 1
    for v in range(m):
        ptr[v + 1] += ptr[v]
    fill = ptr[:-1].copy()
    pix = np.empty(n * k1, np.int32)
    wts = np.empty(n * k1, np.float32)
    for p in range(n):
        for r in range(k1):
            e = fill[offsets[p, r]]
            pix[e] = p
            wts[e] = bary[p, r]
            fill[offsets[p, r]] += 1
    return ptr, pix, wts


@njit(cache=True)
def filter_ones(offsets: np.ndarray, bary: np.ndarray, nbr: np.ndarray) -> np.ndarray:
    """``K 1`` as densecrf computes the normaliser (its scalar path: blur in double, slice (w v) alpha)."""
    n, k1 = offsets.shape
    m = nbr.shape[1]
    d = k1 - 1
    alpha = np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-d))
    a = np.zeros(m + 1, np.float32)
    b = np.zeros(m + 1, np.float32)
    for p in range(n):  # the splat of ones, pixels in order (densecrf's summation order)
        for r in range(k1):
            a[offsets[p, r]] += bary[p, r]
    for j in range(k1):
        for v in range(m):
            n1 = nbr[j, v, 0]
            n2 = nbr[j, v, 1]
            lo = a[n1] if n1 >= 0 else np.float32(0.0)
            hi = a[n2] if n2 >= 0 else np.float32(0.0)
            b[v] = np.float32(np.float64(a[v]) + 0.5 * np.float64(lo + hi))
        a, b = b, a
    out = np.empty(n, np.float32)
    for p in range(n):
        s = np.float32(0.0)
        for r in range(k1):
            s += (bary[p, r] * a[offsets[p, r]]) * alpha
        out[p] = s
    return out


@njit(cache=True, inline="always")
def _scatter(
    q: np.ndarray, offsets: np.ndarray, bary: np.ndarray, norm: np.ndarray, vals: np.ndarray
) -> None:
    """densecrf's splat: ``vals[o_r] += w_r * (q[p] * norm[p])``, a serial scatter in pixel order.

    Every vertex sums its pixels in densecrf's order (bit-identical sums); one pass over contiguous
    pixel rows, the ~M x C vertex values staying in cache (4x faster than gathering rows per vertex).
    Labels go 24 at a time: their ``q[p] * norm[p]`` stays in three registers while each corner's row is
    updated (a pixel's corners are distinct vertices), which amortises loading the corner's vertex and
    weight over three vectors (~1.6x faster than a vector at a time). Rows of exactly 24 labels have their
    own loop, without the general loop's branches (3% of the mean field on VOC images).
    """
    n, k1 = offsets.shape
    c = q.shape[1]
    zero = splat8(np.float32(0.0))
    for v in range(vals.shape[0] - 1):  # the last row stays zero: the absent blur neighbour
        row = vals[v]
        for j in range(0, c, LANES):
            store8(row, j, zero)
    if c == 3 * LANES:  # 17-24 labels: most models
        for p in range(n):
            nm = splat8(norm[p])
            src = q[p]
            x0 = vmul(load8(src, 0), nm)
            x1 = vmul(load8(src, LANES), nm)
            x2 = vmul(load8(src, 2 * LANES), nm)
            for r in range(k1):
                dst = vals[offsets[p, r]]
                w = splat8(bary[p, r])
                store8(dst, 0, vadd(load8(dst, 0), vmul(w, x0)))
                store8(dst, LANES, vadd(load8(dst, LANES), vmul(w, x1)))
                store8(dst, 2 * LANES, vadd(load8(dst, 2 * LANES), vmul(w, x2)))
        return
    for p in range(n):
        nm = splat8(norm[p])
        src = q[p]
        for j in range(0, c, 3 * LANES):
            vectors = min(3, (c - j) // LANES)
            x0 = vmul(load8(src, j), nm)
            x1 = vmul(load8(src, j + LANES), nm) if vectors > 1 else x0
            x2 = vmul(load8(src, j + 2 * LANES), nm) if vectors > 2 else x0
            for r in range(k1):
                dst = vals[offsets[p, r]]
                w = splat8(bary[p, r])
                store8(dst, j, vadd(load8(dst, j), vmul(w, x0)))
                if vectors > 1:
                    store8(dst, j + LANES, vadd(load8(dst, j + LANES), vmul(w, x1)))
                if vectors > 2:
                    store8(dst, j + 2 * LANES, vadd(load8(dst, j + 2 * LANES), vmul(w, x2)))


@njit(cache=True, inline="always")
def _blur(nbr: np.ndarray, buf_a: np.ndarray, buf_b: np.ndarray, scalar_path: bool) -> np.ndarray:
    """Blur along every axis, ping-ponging between the buffers; returns the one holding the result."""
    m = nbr.shape[1]
    c = buf_a.shape[1]
    half8 = splat8(np.float32(0.5))
    src, dst = buf_a, buf_b
    for axis in range(nbr.shape[0]):
        for v in prange(m):
            n1 = nbr[axis, v, 0]
            n2 = nbr[axis, v, 1]
            out, own = dst[v], src[v]
            prev = src[n1 if n1 >= 0 else m]  # row m stays zero: the absent neighbour
            nxt = src[n2 if n2 >= 0 else m]
            if scalar_path:
                for ch in range(c):
                    s = np.float64(prev[ch] + nxt[ch])
                    out[ch] = np.float32(np.float64(own[ch]) + 0.5 * s)
            else:
                for j in range(0, c, LANES):
                    store8(out, j, vadd(load8(own, j), vmul(half8, vadd(load8(prev, j), load8(nxt, j)))))
        src, dst = dst, src
    return src


@njit(cache=True, inline="always")
def _alpha(k1: int) -> np.float32:
    """densecrf's slice scale ``1 / (1 + 2**-d)`` (float32), computed once per kernel, not per pixel."""
    return np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(1 - k1))


@njit(cache=True, inline="always")
def _slice_add(
    row: np.ndarray,
    acc: np.ndarray,
    p: int,
    offsets: np.ndarray,
    bary: np.ndarray,
    vals: np.ndarray,
    norm: np.ndarray,
    weight: np.float32,
    alpha: np.float32,
    scalar_path: bool,
) -> None:
    """``row += weight * (norm[p] * sum_r (w_r alpha) vals[o_r])``, densecrf's slice and Potts term.

    The sum runs over the corners in order, from zero; for the positional (3 corners) and bilateral (6)
    lattices it is written out so that each label's sum stays in a register (one loop over labels).
    """
    c = row.size
    k1 = offsets.shape[1]
    if scalar_path:
        nm = norm[p]
        for ch in range(c):
            acc[ch] = np.float32(0.0)
        for r in range(k1):
            src = vals[offsets[p, r]]
            w = bary[p, r]
            for ch in range(c):
                acc[ch] += (w * src[ch]) * alpha
        for ch in range(c):
            row[ch] += weight * (acc[ch] * nm)
        return
    nm = splat8(norm[p])
    wt = splat8(weight)
    if k1 == 3 or k1 == 6:
        s0, s1, s2 = vals[offsets[p, 0]], vals[offsets[p, 1]], vals[offsets[p, 2]]
        w0, w1, w2 = splat8(bary[p, 0] * alpha), splat8(bary[p, 1] * alpha), splat8(bary[p, 2] * alpha)
        if k1 == 3:
            for j in range(0, c, LANES):
                a = vadd(vadd(vmul(w0, load8(s0, j)), vmul(w1, load8(s1, j))), vmul(w2, load8(s2, j)))
                store8(row, j, vadd(load8(row, j), vmul(wt, vmul(a, nm))))
            return
        s3, s4, s5 = vals[offsets[p, 3]], vals[offsets[p, 4]], vals[offsets[p, 5]]
        w3, w4, w5 = splat8(bary[p, 3] * alpha), splat8(bary[p, 4] * alpha), splat8(bary[p, 5] * alpha)
        for j in range(0, c, LANES):
            a = vadd(vadd(vmul(w0, load8(s0, j)), vmul(w1, load8(s1, j))), vmul(w2, load8(s2, j)))
            a = vadd(vadd(vadd(a, vmul(w3, load8(s3, j))), vmul(w4, load8(s4, j))), vmul(w5, load8(s5, j)))
            store8(row, j, vadd(load8(row, j), vmul(wt, vmul(a, nm))))
        return
    for j in range(0, c, LANES):  # any other dimension: the corners' sum from zero, in order
        a = splat8(np.float32(0.0))
        for r in range(k1):
            a = vadd(a, vmul(splat8(bary[p, r] * alpha), load8(vals[offsets[p, r]], j)))
        store8(row, j, vadd(load8(row, j), vmul(wt, vmul(a, nm))))


@njit(cache=True, inline="always")
def _slice_both_2d(row: np.ndarray, unary: np.ndarray, p: int, kernel1: tuple, kernel2: tuple) -> None:
    """``row = unary + (kernel 1's term) + (kernel 2's term)`` for DenseCRF2D's pair of lattices (3 and 6
    corners): :func:`_slice_add` twice, the same operations in the same order, in one loop over the
    labels, the nine corner rows and weights held across it (one load of ``unary``, one store of
    ``row``). A kernel is ``(offsets, bary, vals, norm, weight, alpha)``."""
    c = row.size
    offsets1, bary1, vals1, norm1, weight1, alpha1 = kernel1
    offsets2, bary2, vals2, norm2, weight2, alpha2 = kernel2
    nm1, nm2 = splat8(norm1[p]), splat8(norm2[p])
    wt1, wt2 = splat8(weight1), splat8(weight2)
    s0, s1, s2 = vals1[offsets1[p, 0]], vals1[offsets1[p, 1]], vals1[offsets1[p, 2]]
    a0, a1, a2 = splat8(bary1[p, 0] * alpha1), splat8(bary1[p, 1] * alpha1), splat8(bary1[p, 2] * alpha1)
    t0, t1, t2 = vals2[offsets2[p, 0]], vals2[offsets2[p, 1]], vals2[offsets2[p, 2]]
    t3, t4, t5 = vals2[offsets2[p, 3]], vals2[offsets2[p, 4]], vals2[offsets2[p, 5]]
    b0, b1, b2 = splat8(bary2[p, 0] * alpha2), splat8(bary2[p, 1] * alpha2), splat8(bary2[p, 2] * alpha2)
    b3, b4, b5 = splat8(bary2[p, 3] * alpha2), splat8(bary2[p, 4] * alpha2), splat8(bary2[p, 5] * alpha2)
    for j in range(0, c, LANES):
        first = vadd(vadd(vmul(a0, load8(s0, j)), vmul(a1, load8(s1, j))), vmul(a2, load8(s2, j)))
        x = vadd(load8(unary, j), vmul(wt1, vmul(first, nm1)))
        second = vadd(vadd(vmul(b0, load8(t0, j)), vmul(b1, load8(t1, j))), vmul(b2, load8(t2, j)))
        second = vadd(
            vadd(vadd(second, vmul(b3, load8(t3, j))), vmul(b4, load8(t4, j))), vmul(b5, load8(t5, j))
        )
        store8(row, j, vadd(x, vmul(wt2, vmul(second, nm2))))


@njit(cache=True, parallel=True)
def mean_field(
    neg_unary: np.ndarray,
    q: np.ndarray,
    iterations: int,
    n_kernels: int,
    weights: np.ndarray,
    offsets1: np.ndarray,
    bary1: np.ndarray,
    nbr1: np.ndarray,
    norm1: np.ndarray,
    offsets2: np.ndarray,
    bary2: np.ndarray,
    nbr2: np.ndarray,
    norm2: np.ndarray,
    scalar_path: bool,
    n_classes: int,
    out: np.ndarray,
) -> None:
    """``iterations`` (>= 1) mean-field updates of ``q`` (N x C) with one or two Gaussian kernels; the
    last one's probabilities go to ``out`` (``n_classes`` x N planes, the caller's layout), not ``q``.

    Only the first ``n_classes`` columns are labels; the rest (padding to a multiple of 8, so that the
    loops over labels run whole SIMD vectors) hold zeros in ``q`` and ``neg_unary`` and stay zero.

    Per kernel: its lattice's ``offsets``/``bary`` (N x (d+1)), blur neighbours ``nbr`` ((d+1) x M x 2,
    -1 absent) and symmetric normaliser ``norm``; kernel 2 is ignored when ``n_kernels`` is 1. Per
    iteration, as densecrf (kernels summed in this order): ``q <- softmax(-U + sum_k w_k n_k K_k (n_k q))``.
    Threads: the two kernels' splats run side by side (each serial, in pixel order; kernel 1's blur
    after its splat on the same thread), kernel 2's blur over vertices, slice + softmax over blocks of
    pixels; no sum depends on the thread count. (Fusing each
    tile's splat for the next iteration into the slice pass was measured slower: it doubles the vertex
    values in cache.)
    """
    n, c = q.shape
    m1 = nbr1.shape[1]
    m2 = nbr2.shape[1] if n_kernels > 1 else 0
    a1 = np.zeros((m1 + 1, c), np.float32)  # M + 1 rows: the last one stays zero
    b1 = np.zeros((m1 + 1, c), np.float32)
    a2 = np.zeros((m2 + 1, c), np.float32)
    b2 = np.zeros((m2 + 1, c), np.float32)
    w1 = weights[0]
    w2 = weights[n_kernels - 1]
    alpha1 = _alpha(offsets1.shape[1])
    alpha2 = _alpha(offsets2.shape[1])
    masks = padding_masks(n_classes, c)
    n_blocks = (n + BLOCK - 1) // BLOCK
    both_2d = n_kernels == 2 and not scalar_path and offsets1.shape[1] == 3 and offsets2.shape[1] == 6
    v1 = a1 if nbr1.shape[0] % 2 == 0 else b1  # where the blur's d+1 ping-pong passes end
    v2 = a2 if nbr2.shape[0] % 2 == 0 else b2
    kernel1 = (offsets1, bary1, v1, norm1, w1, alpha1)
    kernel2 = (offsets2, bary2, v2, norm2, w2, alpha2)
    for it in range(iterations):
        last = it == iterations - 1
        if n_kernels == 1:
            _scatter(q, offsets1, bary1, norm1, a1)
            _blur(nbr1, a1, b1, scalar_path)
        else:
            for k in prange(2):  # side by side: kernel 1's splat and blur (serial here), kernel 2's splat
                if k == 0:
                    _scatter(q, offsets1, bary1, norm1, a1)
                    _blur(nbr1, a1, b1, scalar_path)
                else:
                    _scatter(q, offsets2, bary2, norm2, a2)
            _blur(nbr2, a2, b2, scalar_path)
        for blk in prange(n_blocks):  # slice, add to -U, softmax
            acc = np.empty(c, np.float32)
            scratch = np.empty(c, np.float32)
            end = min(n, (blk + 1) * BLOCK)
            for p0 in range(blk * BLOCK, end, SUB):
                stop = min(end, p0 + SUB)
                if both_2d:  # decided per tile, not per pixel: the pixel loop compiles ~30% faster
                    for p in range(p0, stop):
                        _slice_both_2d(q[p], neg_unary[p], p, kernel1, kernel2)
                else:
                    for p in range(p0, stop):
                        row = q[p]
                        for j in range(0, c, LANES):
                            store8(row, j, load8(neg_unary[p], j))
                        _slice_add(row, acc, p, offsets1, bary1, v1, norm1, w1, alpha1, scalar_path)
                        if n_kernels > 1:
                            _slice_add(row, acc, p, offsets2, bary2, v2, norm2, w2, alpha2, scalar_path)
                if last:
                    for p in range(p0, stop):
                        _softmax_into(q[p], n_classes, masks, out, p, True, scratch)
                else:
                    _softmax_rows_into(q, q, p0, stop, n_classes, masks, scratch)


@njit(cache=True, parallel=True, nogil=True)
def unary_from_probs(
    planes: np.ndarray, unary_scale: np.float32, floor: np.float32, out: np.ndarray, start: np.ndarray
) -> None:
    """``-U`` rows of C x N probability planes, ``unary_scale * log(max(p, floor))``, and their softmax.

    ``out`` and ``start`` are N x C' rows (C' a multiple of 8; ``out``'s padding is set to zero); ``start``
    gets the softmax of each row (the mean field's first Q; pass 0 rows to skip it). One pass: 8 pixels
    of a plane at a time through the vector log (:func:`._simd.vlog`, within 1 ulp), transposed into the
    rows of a tile of pixels, then the tile's softmax while it is in cache.
    """
    c, n = planes.shape
    width = out.shape[1]
    masks = padding_masks(c, width)
    with_start = start.shape[0] > 0
    scale = splat8(unary_scale)
    low = splat8(floor)
    n_blocks = (n + BLOCK - 1) // BLOCK
    for b in prange(n_blocks):
        tile = np.empty((c, SUB), np.float32)
        tail = np.empty(LANES, np.float32)
        scratch = np.empty(width, np.float32)
        end = min(n, (b + 1) * BLOCK)
        for p0 in range(b * BLOCK, end, SUB):
            count = min(SUB, end - p0)
            for ch in range(c):
                plane, row = planes[ch], tile[ch]
                for k in range(0, count, LANES):
                    if k + LANES <= count:
                        x = load8(plane, p0 + k)
                    else:  # the last pixels: a partial vector, padded with the floor
                        for lane in range(LANES):
                            tail[lane] = plane[p0 + k + lane] if k + lane < count else floor
                        x = load8(tail, 0)
                    store8(row, k, vmul(scale, vlog(vmax(x, low))))
            for k in range(count):
                row = out[p0 + k]
                for ch in range(c):
                    row[ch] = tile[ch, k]
                for ch in range(c, width):
                    row[ch] = np.float32(0.0)
            # After the whole tile: loading a row as vectors right after storing it label by label stalls
            # store forwarding (3x slower).
            if with_start:
                _softmax_rows_into(out, start, p0, p0 + count, c, masks, scratch)


@njit(cache=True, parallel=True, nogil=True)
def rows_from_planes(planes: np.ndarray, out: np.ndarray) -> None:
    """``out[p, :C] = planes[:, p]`` (C x N -> N x C', padding left alone)."""
    c, n = planes.shape
    n_blocks = (n + BLOCK - 1) // BLOCK
    for b in prange(n_blocks):
        for p in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            row = out[p]
            for ch in range(c):
                row[ch] = planes[ch, p]


@njit(cache=True, parallel=True, nogil=True)
def unary_from_logits(
    logit_rows: np.ndarray,
    width_in: int,
    y0: np.ndarray,
    y1: np.ndarray,
    fy: np.ndarray,
    x0: np.ndarray,
    x1: np.ndarray,
    fx: np.ndarray,
    n_classes: int,
    unary_scale: np.float32,
    log_floor: np.float32,
    out: np.ndarray,
    start: np.ndarray,
) -> None:
    """``-U`` rows straight from the network's logits: bilinear resampling, log-softmax, floor, scale.

    ``logit_rows``: the logits as (h*w) x C' rows (C' a multiple of 8, padding zero), ``width_in`` = w;
    the taps as :meth:`deeplab_cli.geometry.Resampler.taps` gives them (rows first, then columns, the
    same float32 operations as its dense resampling). Row ``y * W + x`` of ``out`` gets
    ``unary_scale * max(log softmax(v), log_floor)`` for the resampled scores ``v`` of output pixel
    (y, x): the ``-U`` of ``U = -unary_scale log(max(p, floor))``, with one ``log`` per pixel instead of
    an ``exp`` and a ``log`` per class and pixel, and no C x H x W probabilities in between. ``start``
    (N x C' rows, or 0 rows to skip it) gets each row's softmax: the mean field's first Q.
    """
    c = logit_rows.shape[1]
    height, width = y0.size, x0.size
    masks = padding_masks(n_classes, c)
    last = c - LANES
    one = np.float32(1.0)
    scale = splat8(unary_scale)
    floor = splat8(log_floor)
    with_start = start.shape[0] > 0
    for y in prange(height):
        top_y, bottom_y = y0[y] * width_in, y1[y] * width_in
        wy = splat8(fy[y])
        wy_ = splat8(one - fy[y])
        scores = np.empty(c, np.float32)
        scratch = np.empty(c, np.float32)
        for x in range(width):
            wx = splat8(fx[x])
            wx_ = splat8(one - fx[x])
            a, b = logit_rows[top_y + x0[x]], logit_rows[bottom_y + x0[x]]
            e, f = logit_rows[top_y + x1[x]], logit_rows[bottom_y + x1[x]]
            for j in range(0, c, LANES):
                left = vadd(vmul(load8(a, j), wy_), vmul(load8(b, j), wy))
                right = vadd(vmul(load8(e, j), wy_), vmul(load8(f, j), wy))
                store8(scores, j, vadd(vmul(left, wx_), vmul(right, wx)))
            shift = splat8(_label_max(scores, masks))
            partial = splat8(np.float32(0.0))
            for j in range(0, c, LANES):
                ex = vexp(vsub(load8(scores, j), shift))
                partial = vadd(partial, vmul(ex, load8(masks[1], 0)) if j == last else ex)
            log_total = splat8(np.float32(np.log(hsum(partial))))
            row = out[y * width + x]
            for j in range(0, c, LANES):
                log_p = vsub(vsub(load8(scores, j), shift), log_total)
                v = vmul(scale, vmax(log_p, floor))
                store8(row, j, vmul(v, load8(masks[1], 0)) if j == last else v)
        if with_start:
            _softmax_rows_into(out, start, y * width, (y + 1) * width, n_classes, masks, scratch)


@njit(cache=True)
def padding_masks(n_classes: int, c: int) -> np.ndarray:
    """2 x 8 float32 for the last 8 of ``c`` label lanes: ``[0]`` adds -inf to the padding lanes (out of
    the max), ``[1]`` multiplies them by 0 (their exp out of the sum: padding stays zero)."""
    masks = np.zeros((2, LANES), np.float32)
    for lane in range(LANES):
        if c - LANES + lane >= n_classes:
            masks[0, lane] = -np.inf
        else:
            masks[1, lane] = np.float32(1.0)
    return masks


@njit(cache=True, inline="always")
def _label_max(x: np.ndarray, masks: np.ndarray) -> np.float32:
    """The largest of the row's labels: its padding lanes (the last vector's, per ``masks[0]``) left out."""
    last = x.size - LANES
    top = vadd(load8(x, last), load8(masks[0], 0))
    for j in range(0, last, LANES):
        top = vmax(top, load8(x, j))
    return hmax(top)


@njit(cache=True, inline="always")
def _softmax_into(
    x: np.ndarray, n_classes: int, masks: np.ndarray, out: np.ndarray, p: int, as_planes: bool,
    scratch: np.ndarray,
) -> None:  # fmt: skip
    """``exp(x - max) / sum`` over the first ``n_classes`` lanes of the row ``x`` (densecrf's
    expAndNormalize), into row ``p`` of ``out`` (padding lanes 0; ``x`` may be that row), or into column
    ``p`` of C x N planes when ``as_planes`` (via ``scratch``, C float32).

    Eight labels at a time: the max and the sum reduce 8-lane partials, then their lanes in order.
    """
    c = x.size
    last = c - LANES
    shift = splat8(_label_max(x, masks))
    dst = scratch if as_planes else out[p]
    partial = splat8(np.float32(0.0))
    for j in range(0, c, LANES):
        e = vexp(vsub(load8(x, j), shift))
        if j == last:
            e = vmul(e, load8(masks[1], 0))
        store8(dst, j, e)
        partial = vadd(partial, e)
    total = splat8(hsum(partial))
    for j in range(0, c, LANES):
        store8(dst, j, vdiv(load8(dst, j), total))
    if as_planes:
        for ch in range(n_classes):
            out[ch, p] = scratch[ch]


@njit(cache=True, inline="always")
def _softmax_two_rows_of_24(x: np.ndarray, y: np.ndarray, masks: np.ndarray) -> None:
    """:func:`_softmax_into` of two rows of 24 labels in place, bit for bit: written out, the two rows'
    independent chains (max, three ``exp``, sum, divisions) interleave (~20% faster than a row at a
    time; most models have 19-21 classes)."""
    low, keep = load8(masks[0], 0), load8(masks[1], 0)
    x0, x1, x2 = load8(x, 0), load8(x, LANES), load8(x, 2 * LANES)
    y0, y1, y2 = load8(y, 0), load8(y, LANES), load8(y, 2 * LANES)
    sx = splat8(hmax(vmax(vmax(vadd(x2, low), x0), x1)))
    sy = splat8(hmax(vmax(vmax(vadd(y2, low), y0), y1)))
    ex0, ex1, ex2 = vexp(vsub(x0, sx)), vexp(vsub(x1, sx)), vmul(vexp(vsub(x2, sx)), keep)
    ey0, ey1, ey2 = vexp(vsub(y0, sy)), vexp(vsub(y1, sy)), vmul(vexp(vsub(y2, sy)), keep)
    tx = splat8(hsum(vadd(vadd(ex0, ex1), ex2)))
    ty = splat8(hsum(vadd(vadd(ey0, ey1), ey2)))
    store8(x, 0, vdiv(ex0, tx))
    store8(x, LANES, vdiv(ex1, tx))
    store8(x, 2 * LANES, vdiv(ex2, tx))
    store8(y, 0, vdiv(ey0, ty))
    store8(y, LANES, vdiv(ey1, ty))
    store8(y, 2 * LANES, vdiv(ey2, ty))


@njit(cache=True, inline="always")
def _softmax_rows_into(
    x: np.ndarray, out: np.ndarray, p0: int, p1: int, n_classes: int, masks: np.ndarray, scratch: np.ndarray
) -> None:
    """:func:`_softmax_into` of the rows ``p0`` to ``p1`` of ``x`` into the same rows of ``out`` (``x``
    itself for in place), two at a time where rows have 24 lanes (:func:`_softmax_two_rows_of_24`, the
    same bits)."""
    first = p0
    if x.shape[1] == 3 * LANES:
        for p in range(p0, p1 - 1, 2):
            a, b = out[p], out[p + 1]
            for j in range(0, 3 * LANES, LANES):
                store8(a, j, load8(x[p], j))
                store8(b, j, load8(x[p + 1], j))
            _softmax_two_rows_of_24(a, b, masks)
        first = p1 - (p1 - p0) % 2
    for p in range(first, p1):
        _softmax_into(x[p], n_classes, masks, out, p, False, scratch)


@njit(cache=True, parallel=True)
def softmax_rows(x: np.ndarray, n_classes: int, out: np.ndarray, as_planes: bool) -> None:
    """Softmax of the first ``n_classes`` columns of every row of ``x`` (C' columns, a multiple of 8) into
    ``out``: rows (``x`` itself for in place; padding columns 0), or ``n_classes`` x N planes when
    ``as_planes``."""
    n, c = x.shape
    masks = padding_masks(n_classes, c)
    n_blocks = (n + BLOCK - 1) // BLOCK
    for b in prange(n_blocks):
        scratch = np.empty(c, np.float32)
        for p in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            _softmax_into(x[p], n_classes, masks, out, p, as_planes, scratch)
