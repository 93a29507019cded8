"""The permutohedral lattice (Adams, Baek & Davis 2010) in vectorised PyTorch.

A Gaussian filter over d-dimensional features is approximated by three linear maps:

* splat: every point spreads its value onto the d+1 vertices of the lattice simplex that encloses it,
  with barycentric weights;
* blur: a 1-2-1 kernel (scaled to 0.5-1-0.5, as in Krähenbühl's code) along each of the d+1 lattice axes;
* slice: every point reads back the blurred values of its d+1 vertices with the same weights, times
  ``alpha = 1 / (1 + 2**-d)``.

The construction follows the code that pydensecrf wraps (``permutohedral.cpp`` of Krähenbühl's densecrf)
step by step, so that results match it up to float rounding: the same elevation matrix and scale
factors, rounding to the nearest remainder-0 point, ranking (ties broken the same way), barycentric
weights and blur order. Differences: lattice vertices are found by sorting packed int64 keys instead of
a hash table (no 16-bit key overflow on large images), and an optional group id per point (the image
index in a batch) keeps several independent lattices in one structure.

All three maps are stored as sparse CSR matrices, so that one filtering pass is ``d+3`` sparse-dense
products that run multi-threaded on CPU (MKL) and on CUDA (cuSPARSE) with the same code.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .params import LATTICE_POINT_BLOCK

__all__ = ["Lattice", "build_lattice", "csr"]


def csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from its parts (indices already valid, so invariant checks are skipped)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, val, size=shape, check_invariants=False)


@dataclass
class Lattice:
    """A permutohedral lattice built over ``n_points`` feature vectors of dimension ``d``.

    ``offsets[i, r]`` is the vertex index of the ``r``-th simplex corner of point ``i`` and
    ``weights[i, r]`` its barycentric weight. ``neighbours[j]`` holds, for axis ``j``, the index of the
    previous and next vertex of each vertex (``n_vertices`` where absent).
    """

    d: int
    n_points: int
    n_vertices: int
    offsets: torch.Tensor  # (N, d+1) int64
    weights: torch.Tensor  # (N, d+1) float32
    neighbours: torch.Tensor  # (d+1, 2, M) int64

    @property
    def alpha(self) -> float:
        """Krähenbühl's slice scaling constant ``1 / (1 + 2**-d)``."""
        return float(torch.tensor(1.0 / (1.0 + 2.0 ** (-self.d)), dtype=torch.float32))

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    def splat_matrix(self, point_scale: torch.Tensor | None = None) -> torch.Tensor:
        """(M x N) CSR: vertex values = sum of weight * point value (point values scaled if given)."""
        k1 = self.d + 1
        flat = self.offsets.reshape(-1)
        perm = torch.sort(flat, stable=True).indices  # entries grouped by vertex, points ascending
        crow = torch.zeros(self.n_vertices + 1, dtype=torch.int64, device=flat.device)
        crow[1:] = torch.cumsum(torch.bincount(flat, minlength=self.n_vertices), 0)
        val = self.weights.reshape(-1)[perm]
        col = torch.div(perm, k1, rounding_mode="floor")
        if point_scale is not None:
            val = val * point_scale[col]
        return csr(crow, col, val, (self.n_vertices, self.n_points))

    def slice_matrix(self, point_scale: torch.Tensor | None = None) -> torch.Tensor:
        """(N x M) CSR: point value = alpha * sum of weight * vertex value (rows scaled if given)."""
        val = self.weights * self.alpha
        if point_scale is not None:
            val = val * point_scale[:, None]
        return slice_csr([self.offsets], [val], [0], self.n_vertices)

    def blur_matrices(self, reverse: bool = False) -> list[torch.Tensor]:
        """One (M x M) CSR per lattice axis: ``v + 0.5 * (v[prev] + v[next])``, in blur order."""
        axes = range(self.d, -1, -1) if reverse else range(self.d + 1)
        return [blur_csr(self.neighbours[j], self.n_vertices) for j in axes]

    def filter(self, values: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """Unnormalised permutohedral filtering of ``values`` (N x C), as densecrf's ``compute``."""
        v = self.splat_matrix() @ values
        for blur in self.blur_matrices(reverse):
            v = blur @ v
        return self.slice_matrix() @ v


def blur_csr(neighbours: torch.Tensor, m: int, offset: int = 0, total: int | None = None) -> torch.Tensor:
    """CSR of one blur step on vertices ``offset..offset+m`` of a ``total``-vertex value array.

    ``neighbours`` is (2, m) with ``m`` for a missing neighbour; missing entries are dropped.
    """
    total = m if total is None else total
    device = neighbours.device
    own = torch.arange(m, device=device)
    cols = torch.stack([neighbours[0], own, neighbours[1]], dim=1)  # sorted per row: prev < own < next?
    vals = torch.tensor([0.5, 1.0, 0.5], device=device).expand(m, 3)
    present = cols < m
    counts = present.sum(1)
    crow = torch.zeros(total + 1, dtype=torch.int64, device=device)
    crow[offset + 1 : offset + m + 1] = torch.cumsum(counts, 0)
    crow[offset + m + 1 :] = crow[offset + m]
    cols, order = torch.sort(torch.where(present, cols, torch.full_like(cols, 2**62)), dim=1)
    vals = torch.gather(vals, 1, order)
    keep = cols < 2**62
    return csr(crow, cols[keep] + offset, vals[keep].contiguous(), (total, total))


def slice_csr(
    offsets: list[torch.Tensor], values: list[torch.Tensor], vertex_offsets: list[int], total: int
) -> torch.Tensor:
    """(N x total) CSR reading from several lattices at once (columns shifted by ``vertex_offsets``)."""
    cols = torch.cat([o + s for o, s in zip(offsets, vertex_offsets, strict=True)], dim=1)
    vals = torch.cat(values, dim=1)
    cols, order = torch.sort(cols, dim=1)
    vals = torch.gather(vals, 1, order)
    n, k = cols.shape
    crow = torch.arange(0, n * k + 1, k, device=cols.device)
    return csr(crow, cols.reshape(-1), vals.reshape(-1).contiguous(), (n, total))


def _scale_factors(d: int, device: torch.device) -> torch.Tensor:
    """Diagonal of the elevation matrix times the inverse std of the lattice's blur (float32, as C)."""
    inv_std = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    s = [1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)]
    return torch.tensor(s, dtype=torch.float32, device=device)


def _elevate(features: torch.Tensor) -> torch.Tensor:
    """Project features (N x d) onto the hyperplane x_0 + ... + x_d = 0 in d+1 dimensions."""
    n, d = features.shape
    cf = features * _scale_factors(d, features.device)
    elevated = torch.empty(n, d + 1, dtype=torch.float32, device=features.device)
    sm = torch.zeros(n, dtype=torch.float32, device=features.device)
    for j in range(d, 0, -1):
        c = cf[:, j - 1]
        elevated[:, j] = sm - j * c
        sm = sm + c
    elevated[:, 0] = sm
    return elevated


def _enclosing_simplex(elevated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest remainder-0 point, the rank of each coordinate and the barycentric weights."""
    n, k1 = elevated.shape
    d = k1 - 1
    down = float(torch.tensor(1.0 / k1, dtype=torch.float32))
    v = torch.round(elevated * down)  # round half to even, as the SSE code path
    rem0 = v * k1
    total = v.sum(1).to(torch.int64)
    diff = elevated - rem0
    # rank[i] = #{j > i: diff_i < diff_j} + #{j < i: diff_j >= diff_i}: densecrf's pairwise comparisons
    # (and tie-breaking), on contiguous (d+1) x N rows with 8-bit counters.
    cols = diff.t().contiguous()
    rank8 = torch.zeros(k1, n, dtype=torch.uint8, device=elevated.device)
    for i in range(k1):
        for j in range(i + 1, k1):
            less = cols[i] < cols[j]
            rank8[i] += less
            rank8[j] += ~less
    rank = rank8.t().to(torch.int64)
    # Bring the point back onto the plane (sum of rem0 != 0): wrap ranks, shift rem0 accordingly.
    rank = rank + total[:, None]
    wrap = torch.div(rank, k1, rounding_mode="floor")  # -1, 0 or 1
    rank = rank - k1 * wrap
    rem0 = rem0 - (k1 * wrap).to(rem0.dtype)
    w = (elevated - rem0) * down
    bary = torch.zeros(n, k1 + 1, dtype=torch.float32, device=elevated.device)
    bary.scatter_add_(1, d - rank, w)
    bary.scatter_add_(1, d - rank + 1, -w)
    bary[:, 0] += 1.0 + bary[:, k1]
    return rem0.to(torch.int64), rank, bary[:, :k1].contiguous()


def _distinct_simplices(
    base: torch.Tensor, rank: torch.Tensor, base_range: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group points by enclosing simplex (remainder-0 point ``base`` and ``rank`` permutation).

    Returns the simplex index of each point and the first point of each simplex; simplices are numbered
    in order of their first point. If the combined key could overflow int64, every point is its own
    simplex.
    """
    n, k1 = rank.shape
    device = base.device
    codes = k1**k1
    if base_range * codes >= 2**62:
        every = torch.arange(n, device=device)
        return every, every
    weights = torch.tensor([k1**i for i in range(k1)], dtype=torch.int64, device=device)
    key = base * codes + (rank * weights).sum(1)
    sorted_key, perm = torch.sort(key, stable=True)
    new = torch.ones_like(sorted_key, dtype=torch.bool)
    new[1:] = sorted_key[1:] != sorted_key[:-1]
    group_of_sorted = torch.cumsum(new, 0) - 1
    first = perm[new]  # first point of each simplex (stable sort), simplices in key order
    order = torch.argsort(first)
    label = torch.empty_like(order)
    label[order] = torch.arange(order.numel(), device=device)
    simplex_of_point = torch.empty_like(perm)
    simplex_of_point[perm] = label[group_of_sorted]
    return simplex_of_point, first[order]


def build_lattice(features: torch.Tensor, groups: torch.Tensor | None = None) -> Lattice:
    """Build the lattice for ``features`` (N x d float32, already divided by the kernel stds).

    ``groups`` (N int64, optional) separates independent point sets (e.g. images of a batch): points of
    different groups never share or neighbour a vertex.
    """
    if features.ndim != 2 or features.shape[1] < 1:
        raise ValueError(f"features must be N x d with d >= 1, got shape {tuple(features.shape)}")
    n_points = features.shape[0]
    features, groups = _with_densecrf_padding(features.to(torch.float32).contiguous(), groups)
    n, d = features.shape
    k1 = d + 1
    device = features.device
    rem0, rank, bary = _enclosing_simplex(_elevate(features))

    # Vertex keys (first d coordinates; the last one is implied) are rem0 + the canonical simplex corner
    # r: key_i = rem0_i + r - (d+1) * [d - rank_i < r]. They are packed into one int64 (mixed radix,
    # with a margin for the blur neighbours) without materialising the N x (d+1) x d key array.
    lo = rem0[:, :d].amin(0) - 2 * d - 1
    span = rem0[:, :d].amax(0) - lo + 2 * d + 2
    strides = [1]
    for s in span.tolist()[:-1]:
        strides.append(strides[-1] * s)
    group_stride = strides[-1] * int(span[-1])
    n_groups = int(groups.max()) + 1 if groups is not None and groups.numel() else 1
    if group_stride * n_groups >= 2**62:
        raise ValueError("lattice too large to pack its keys into 64 bits; use larger kernel stds")
    stride_t = torch.tensor(strides, dtype=torch.int64, device=device)
    base = ((rem0[:, :d] - lo) * stride_t).sum(1)
    if groups is not None:
        base = base + groups.to(device=device, dtype=torch.int64) * group_stride

    # Neighbouring pixels often fall in the same simplex (same rem0 and rank): find the distinct
    # simplices first (one key per point), then the vertices of those only. Simplices are numbered in
    # order of their first point, so that vertices below come out in order of first use.
    simplex_of_point, reps = _distinct_simplices(base, rank, group_stride * n_groups)
    base, rank = base[reps], rank[reps]
    u = reps.numel()
    by_position = torch.zeros(u, k1, dtype=torch.int64, device=device)
    by_position.scatter_(1, d - rank[:, :d], stride_t.expand(u, d))
    below = torch.cumsum(by_position, 1) - by_position  # sum of strides of coordinates with d-rank < r
    r = torch.arange(k1, device=device, dtype=torch.int64)
    packed = base[:, None] + r * sum(strides) - k1 * below  # (U, d+1)

    # Unique vertices by sorting.
    flat = packed.reshape(-1)
    sorted_keys, perm = torch.sort(flat, stable=True)
    new = torch.ones_like(sorted_keys, dtype=torch.bool)
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    vertex_of_sorted = torch.cumsum(new, 0) - 1
    uniq = sorted_keys[new]
    m = uniq.numel()

    # Blur neighbours along each axis j: key -1 everywhere except +d at j (and the opposite).
    neighbours = torch.empty(k1, 2, m, dtype=torch.int64, device=device)
    for j in range(k1):
        delta = -sum(strides) + (k1 * strides[j] if j < d else 0)
        for side, sign in enumerate((1, -1)):
            target = uniq + sign * delta
            idx = torch.searchsorted(uniq, target)
            found = uniq[idx.clamp(max=m - 1)] == target
            neighbours[j, side] = torch.where(found, idx, torch.full_like(idx, m))

    # Renumber vertices in order of first use by the points (pixel order): points that are close in
    # memory then touch vertex rows that are close in memory, which makes splat and slice about a third
    # faster than the key order. Vertex m (missing neighbour) keeps its number.
    first = perm[new]  # the stable sort puts each vertex's first entry at the start of its run
    new_label = torch.empty(m + 1, dtype=torch.int64, device=device)
    new_label[torch.argsort(first)] = torch.arange(m, device=device)
    new_label[m] = m
    simplex_offsets = torch.empty_like(flat)
    simplex_offsets[perm] = new_label[vertex_of_sorted]
    offsets = simplex_offsets.view(u, k1)[simplex_of_point[:n_points]]  # padding points: vertices only
    moved = torch.empty_like(neighbours)
    moved[:, :, new_label[:m]] = new_label[neighbours]
    return Lattice(
        d=d,
        n_points=n_points,
        n_vertices=m,
        offsets=offsets,
        weights=bary[:n_points],
        neighbours=moved,
    )


def _with_densecrf_padding(
    features: torch.Tensor, groups: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The points plus, for each group whose size is not a multiple of 4, one all-zero point of that
    group, appended: densecrf's x86 lattice build locates points four at a time and inserts the
    vertices of the zero padding of the last four too (see :data:`.params.LATTICE_POINT_BLOCK`)."""
    d = features.shape[1]
    if groups is None:
        if features.shape[0] % LATTICE_POINT_BLOCK == 0:
            return features, None
        return torch.cat([features, features.new_zeros(1, d)]), None
    counts = torch.bincount(groups.to(torch.int64))
    padded = torch.nonzero(counts % LATTICE_POINT_BLOCK).flatten().to(groups.device)
    if not padded.numel():
        return features, groups
    return (
        torch.cat([features, features.new_zeros(padded.numel(), d)]),
        torch.cat([groups, padded.to(groups.dtype)]),
    )
