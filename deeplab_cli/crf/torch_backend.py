"""Mean-field inference of the dense CRF on our permutohedral lattice (CPU or CUDA).

The update is the one of pydensecrf's ``DenseCRF::inference`` with two Potts terms and
``NORMALIZE_SYMMETRIC`` kernels::

    Q_0 = softmax(-U)
    Q_{t+1} = softmax(-U + sum_k w_k * n_k * K_k(n_k * Q_t)),   n_k = 1 / sqrt(K_k 1)

where ``K_k`` is the permutohedral approximation of the Gaussian kernel k (its diagonal, the self term,
is included, exactly as in pydensecrf, which does not subtract it) and ``U = -unary_scale * log(p)``.
Results match pydensecrf to float32 rounding (max |dQ| ~1e-6 after 10 iterations).

How it is fast:

* The lattices are built once per image with vectorised torch ops (:mod:`.lattice`); the smoothness
  kernel's lattice depends only on the image size and is cached.
* Both kernels share one splat and one slice: their vertices are stacked, and norms, ``alpha`` and the
  Potts weights are folded into the sparse values once. An iteration is then: splat (N -> V), six
  blur steps on the small vertex array, slice (V -> N) added to the unary, exp and normalise.
* The softmax needs no row maximum: kernel entries are >= 0 and Q <= 1, so a per-pixel bound on the
  message (computed once) keeps ``exp`` in range.
* Engines for the sparse products: ``"torch"`` (CSR tensors; cuSPARSE on CUDA, MKL on CPU) and, on CPU
  by default, ``"scipy"``: scipy's compiled CSC/CSR kernels scatter pixel by pixel like densecrf (about
  twice as cache-friendly as MKL's CSR gather here), release the GIL, and run on a small thread pool
  (pixels and vertex rows split over ``torch.get_num_threads()`` threads). Vertices are numbered in
  order of first use by the pixels, which makes both products about a third faster again.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import DeviceError
from .lattice import Lattice, build_lattice, csr, slice_csr
from .params import PROB_FLOOR, CRFParams

__all__ = [
    "CRFOperator",
    "refine_torch",
    "refine_torch_batch",
    "positional_features",
    "bilateral_features",
    "resolve_device",
]

_POS_CACHE: OrderedDict[tuple, Lattice] = OrderedDict()
_POS_CACHE_SIZE = 8


def positional_features(h: int, w: int, std: float, device: torch.device) -> torch.Tensor:
    """(H*W x 2) float32 features (x/std, y/std) in row-major pixel order, as DenseCRF2D."""
    std32 = torch.tensor(std, dtype=torch.float32, device=device)
    x = torch.arange(w, dtype=torch.float32, device=device) / std32
    y = torch.arange(h, dtype=torch.float32, device=device) / std32
    return torch.stack([x.expand(h, w), y[:, None].expand(h, w)], dim=2).reshape(-1, 2)


def bilateral_features(image: torch.Tensor, xy_std: float, rgb_std: float) -> torch.Tensor:
    """(H*W x 5) float32 features (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) of an H x W x 3 uint8 image."""
    h, w, _ = image.shape
    pos = positional_features(h, w, xy_std, image.device)
    rgb = image.reshape(-1, 3).to(torch.float32) / torch.tensor(
        rgb_std, dtype=torch.float32, device=image.device
    )
    return torch.cat([pos, rgb], dim=1)


def _positional_lattice(h: int, w: int, std: float, device: torch.device) -> Lattice:
    """The smoothness-kernel lattice depends only on the image size: cache the last few."""
    key = (h, w, float(std), str(device))
    lat = _POS_CACHE.get(key)
    if lat is None:
        lat = build_lattice(positional_features(h, w, std, device))
        _POS_CACHE[key] = lat
        while len(_POS_CACHE) > _POS_CACHE_SIZE:
            _POS_CACHE.popitem(last=False)
    else:
        _POS_CACHE.move_to_end(key)
    return lat


def clear_cache() -> None:
    """Forget cached positional lattices (benchmarks use it to time cold builds)."""
    _POS_CACHE.clear()


def _filter_vector(lat: Lattice, x: torch.Tensor | None = None) -> torch.Tensor:
    """``K x`` for one value per point (``x = 1`` if None), with cheap 1-D ops: bincount, gathers."""
    m = lat.n_vertices
    w = lat.weights if x is None else lat.weights * x[:, None]
    v = torch.zeros(m + 1, dtype=torch.float32, device=lat.device)
    v[:m] = torch.bincount(lat.offsets.reshape(-1), weights=w.reshape(-1), minlength=m)[:m]
    for j in range(lat.d + 1):
        v[:m] += 0.5 * (v[lat.neighbours[j, 0]] + v[lat.neighbours[j, 1]])
    return (v[lat.offsets] * lat.weights).sum(1) * lat.alpha


def _filter_ones(lat: Lattice) -> torch.Tensor:
    """``K 1``: the lattice filter of a constant."""
    return _filter_vector(lat)


def _symmetric_norm(lat: Lattice) -> torch.Tensor:
    """pydensecrf's NORMALIZE_SYMMETRIC factor ``1 / sqrt(K 1 + 1e-20)`` per point."""
    return (1.0 / torch.sqrt(_filter_ones(lat).to(torch.float64) + 1e-20)).to(torch.float32)


class CRFOperator:
    """The pairwise message ``sum_k w_k n_k K_k(n_k Q)`` of fixed lattices, as sparse operators.

    All kernels' vertices are stacked into one value array (plus a zero row at the end for missing
    blur neighbours in the torch engine). ``blur`` holds per step the vertex range and its neighbour
    indices. Engine ``"torch"``: ``splat`` (V x N) and ``slice`` (N x V) CSR tensors. Engine
    ``"scipy"`` (CPU): per thread a CSC splat and a CSR slice over its block of pixels; the loop runs
    in :meth:`mean_field_numpy`.
    """

    def __init__(self, lattices: list[Lattice], weights: list[float], engine: str = "auto", threads: int = 0):
        device = lattices[0].device
        if engine == "auto":
            engine = "scipy" if device.type == "cpu" and _has_scipy() else "torch"
        self.engine = engine
        self.pool = None
        norms = [_symmetric_norm(lat) for lat in lattices]
        # Kernel entries are >= 0 and Q <= 1, so the message at point i is at most
        # sum_k w_k n_k (K_k n_k)_i: a per-point shift that makes exp() safe without a row max.
        self.bound = sum(
            w * nm * _filter_vector(lat, nm) for lat, w, nm in zip(lattices, weights, norms, strict=True)
        )
        self.bound = self.bound.clamp_min(0) * 1.001 + 1e-3
        self.bound_np = self.bound.cpu().numpy()
        starts = np.cumsum([0] + [lat.n_vertices for lat in lattices]).tolist()
        self.n_vertices = total = starts[-1]
        self.n_points = n = lattices[0].n_points
        self.blur = self._blur_steps(lattices, starts)
        slice_vals = [
            lat.weights * (lat.alpha * w) * nm[:, None]
            for lat, w, nm in zip(lattices, weights, norms, strict=True)
        ]
        if engine == "torch":
            splats = [lat.splat_matrix(nm) for lat, nm in zip(lattices, norms, strict=True)]
            nnz = np.cumsum([0] + [s._nnz() for s in splats]).tolist()
            crow = torch.cat(
                [splats[0].crow_indices()[:1]]
                + [s.crow_indices()[1:] + z for s, z in zip(splats, nnz, strict=False)]
            )
            cols = torch.cat([s.col_indices() for s in splats])
            self.splat = csr(crow, cols, torch.cat([s.values() for s in splats]), (total, n))
            self.slice = slice_csr([lat.offsets for lat in lattices], slice_vals, starts[:-1], total)
            return
        if engine != "scipy":
            raise ValueError(f"unknown sparse engine {engine!r}")
        import scipy.sparse as sp

        cols = torch.cat([lat.offsets + s for lat, s in zip(lattices, starts[:-1], strict=True)], dim=1)
        k = cols.shape[1]
        idx = cols.to(torch.int32).reshape(-1).numpy()
        sv = (
            torch.cat([lat.weights * nm[:, None] for lat, nm in zip(lattices, norms, strict=True)], dim=1)
            .reshape(-1)
            .numpy()
        )
        lv = torch.cat(slice_vals, dim=1).reshape(-1).numpy()
        self.threads = max(1, threads or torch.get_num_threads())
        bounds = np.linspace(0, n, self.threads + 1).astype(np.int64).tolist()
        self.blocks = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            ptr = np.arange(0, (b - a) * k + 1, k, dtype=np.int32)
            part = slice(a * k, b * k)
            splat = sp.csc_matrix((sv[part], idx[part], ptr), shape=(total, b - a))
            sl = sp.csr_matrix((lv[part], idx[part], ptr), shape=(b - a, total))
            self.blocks.append((a, b, splat, sl))
        self.pool = _thread_pool(self.threads) if self.threads > 1 else None

    @staticmethod
    def _blur_steps(
        lattices: list[Lattice], starts: list[int]
    ) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        total = starts[-1]
        steps = []
        for axis in range(max(lat.d for lat in lattices) + 1):
            active = [(i, lat) for i, lat in enumerate(lattices) if axis <= lat.d]
            idx = []
            for side in range(2):
                parts = []
                for i, lat in active:
                    nb = lat.neighbours[axis, side]
                    parts.append(
                        torch.where(nb == lat.n_vertices, torch.full_like(nb, total), nb + starts[i])
                    )
                idx.append(torch.cat(parts))
            lo, hi = starts[active[0][0]], starts[active[-1][0] + 1]
            if sum(lat.n_vertices for _, lat in active) != hi - lo:
                raise RuntimeError("blur axes must cover contiguous lattices (order kernels by dimension)")
            steps.append((lo, hi, idx[0], idx[1]))
        return steps

    def _map(self, fn, items) -> list:
        if self.pool is None:
            return [fn(x) for x in items]
        return list(self.pool.map(fn, items))

    def message(self, q: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """``base`` (or 0) plus the pairwise term for probabilities ``q`` (N x C, contiguous float32)."""
        c = q.shape[1]
        v = torch.empty(self.n_vertices + 1, c, dtype=torch.float32, device=q.device)
        v[-1].zero_()
        if self.engine == "torch":
            v[:-1] = torch.mm(self.splat, q)  # (no out=: sparse out= support differs across devices)
        else:
            self._splat_scipy(q.numpy(), v.numpy()[:-1])
        for lo, hi, prev, nxt in self.blur:
            s = v.index_select(0, prev)
            s.add_(v.index_select(0, nxt))
            v[lo:hi].add_(s, alpha=0.5)
        if self.engine == "torch":
            if base is None:
                return torch.mm(self.slice, v[:-1])
            return torch.addmm(base, self.slice, v[:-1])
        out = np.zeros((self.n_points, c), np.float32) if base is None else base.numpy().copy()
        vn = v.numpy()[:-1]

        def run(blk) -> None:
            a, b, _, sl = blk
            _accumulate(sl, vn, out[a:b], csc=False)

        self._map(run, self.blocks)
        return torch.from_numpy(out)

    def mean_field_numpy(self, neg: np.ndarray, q: np.ndarray, iterations: int) -> np.ndarray:
        """The whole mean-field loop for the scipy engine, in numpy/scipy kernels only.

        Every phase is split over the pixel blocks (splat, slice + softmax) or vertex rows (blur) and
        run on this operator's thread pool: these kernels release the GIL, and unlike OpenMP they
        degrade gracefully when the CPU is shared with inference. ``q`` (the initial Q) is updated in
        place. Uses the no-row-max softmax of :func:`_mean_field` (callers check the bound).
        """
        c = q.shape[1]
        base = neg - (neg.max(1) + self.bound_np)[:, None]
        buffers = [np.zeros((self.n_vertices, c), np.float32) for _ in range(2)]
        partials = [None] + [np.zeros((self.n_vertices, c), np.float32) for _ in self.blocks[1:]]
        rows = np.linspace(0, self.n_vertices, len(self.blocks) + 1).astype(np.int64).tolist()
        row_chunks = list(zip(rows[:-1], rows[1:], strict=True))
        blur = self._blur_csr_chunks()
        state = {"v": buffers[0]}

        def splat(t: int) -> None:
            a, b, mat, _ = self.blocks[t]
            out = state["v"] if t == 0 else partials[t]
            out.fill(0.0)
            _accumulate(mat, q[a:b], out, csc=True)

        def reduce_rows(chunk: tuple[int, int]) -> None:
            for part in partials[1:]:
                state["v"][chunk[0] : chunk[1]] += part[chunk[0] : chunk[1]]

        def blur_rows(job: tuple[int, int, object]) -> None:
            i, j, mat = job
            out = state["next"][i:j]
            out.fill(0.0)
            _accumulate(mat, state["v"], out, csc=False)

        def slice_softmax(t: int) -> None:
            a, b, _, mat = self.blocks[t]
            y = q[a:b]  # Q is no longer needed once splatted: overwrite it in place
            np.copyto(y, base[a:b])
            _accumulate(mat, state["v"], y, csc=False)
            np.exp(y, out=y)
            y /= np.einsum("ij->i", y)[:, None]

        for _ in range(iterations):
            self._map(splat, range(len(self.blocks)))
            if len(self.blocks) > 1:
                self._map(reduce_rows, row_chunks)
            for lo, hi, jobs in blur:
                cur = state["v"]
                state["next"] = nxt = buffers[1] if cur is buffers[0] else buffers[0]
                self._map(blur_rows, jobs)
                nxt[:lo] = cur[:lo]  # vertices of lattices without this axis keep their values
                nxt[hi:] = cur[hi:]
                state["v"] = nxt
            self._map(slice_softmax, range(len(self.blocks)))
        return q

    def _blur_csr_chunks(self) -> list[tuple[int, int, list]]:
        """The blur as CSR matrices over all vertices, two consecutive axes multiplied into one matrix
        (half the passes over the vertex array), split into row chunks, one per thread.

        Returns per merged step ``(0, V, [(first row, end row, CSR rows), ...])``. Absent neighbours
        are dropped; vertices of a lattice without the axis keep their value (identity rows).
        """
        import scipy.sparse as sp

        if getattr(self, "_blur_csr", None) is not None:
            return self._blur_csr
        nv = self.n_vertices
        full = []
        for lo, hi, prev, nxt in self.blur:
            cols = np.stack([np.arange(nv)] * 3, axis=1)
            cols[lo:hi, 0], cols[lo:hi, 2] = prev.numpy(), nxt.numpy()
            vals = np.zeros((nv, 3), np.float32)
            vals[:, 1] = 1.0
            vals[lo:hi, 0] = vals[lo:hi, 2] = 0.5
            keep = (cols < nv) & (vals != 0)
            ptr = np.zeros(nv + 1, np.int64)
            np.cumsum(keep.sum(1), out=ptr[1:])
            full.append(sp.csr_matrix((vals[keep], cols[keep], ptr), shape=(nv, nv)))
        merged = [full[i + 1] @ full[i] if i + 1 < len(full) else full[i] for i in range(0, len(full), 2)]
        bounds = np.linspace(0, nv, len(self.blocks) + 1).astype(np.int64).tolist()
        steps = []
        for mat in merged:
            mat = sp.csr_matrix(mat, dtype=np.float32)
            mat.indices = mat.indices.astype(np.int32)
            mat.indptr = mat.indptr.astype(np.int32)
            jobs = [(i, j, mat[i:j]) for i, j in zip(bounds[:-1], bounds[1:], strict=True)]
            steps.append((0, nv, jobs))
        self._blur_csr = steps
        return steps

    def _splat_scipy(self, qn: np.ndarray, vn: np.ndarray) -> None:
        """``vn = splat @ qn``: each thread scatters its pixels into its own partial sum."""
        vn.fill(0.0)
        if len(self.blocks) == 1:
            _accumulate(self.blocks[0][2], qn, vn, csc=True)
            return

        def run(blk) -> np.ndarray:
            a, b, sp_, _ = blk
            part = np.zeros_like(vn) if blk is not self.blocks[0] else vn
            _accumulate(sp_, qn[a:b], part, csc=True)
            return part

        for part in self._map(run, self.blocks)[1:]:
            vn += part


def _accumulate(mat, x: np.ndarray, y: np.ndarray, csc: bool) -> None:
    """``y += mat @ x`` in place (scipy's compiled kernels, GIL released); public API as fallback."""
    if _SPARSETOOLS is not None:
        fn = _SPARSETOOLS.csc_matvecs if csc else _SPARSETOOLS.csr_matvecs
        fn(mat.shape[0], mat.shape[1], x.shape[1], mat.indptr, mat.indices, mat.data, x.ravel(), y.ravel())
    else:
        y += mat @ x


try:  # the in-place kernels behind scipy.sparse's products (private, hence the fallback)
    from scipy.sparse import _sparsetools as _SPARSETOOLS

    if not hasattr(_SPARSETOOLS, "csr_matvecs") or not hasattr(_SPARSETOOLS, "csc_matvecs"):
        _SPARSETOOLS = None
except ImportError:  # pragma: no cover
    _SPARSETOOLS = None


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool per thread count (scipy's sparse products release the GIL)."""
    key = (threads, os.getpid())  # a pool inherited through fork has no threads: make a new one
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="crf")
    return pool


def _has_scipy() -> bool:
    try:
        import scipy.sparse  # noqa: F401
    except ImportError:
        return False
    return True


def unary_from_probs(probs: torch.Tensor, unary_scale: float) -> torch.Tensor:
    """``-unary_scale * log(max(p, PROB_FLOOR))``."""
    return torch.log(probs.clamp_min(PROB_FLOOR)).mul_(-unary_scale)


def _mean_field(op: CRFOperator | None, unary: torch.Tensor, iterations: int) -> torch.Tensor:
    """Run the mean-field loop on channels-last unaries (N x C)."""
    neg = -unary
    q = torch.log_softmax(neg, dim=1).exp_()  # (faster than softmax on CPU for C = 21)
    if op is None or iterations == 0:
        return q
    bound = op.bound
    if float(bound.max()) < 80.0 and op.engine == "scipy":
        return torch.from_numpy(op.mean_field_numpy(neg.numpy(), q.contiguous().numpy(), iterations))
    if float(bound.max()) < 80.0:
        # softmax(x) = exp(x - s) / sum exp(x - s) for any per-row s; with s = max(neg) + bound the
        # exponent is <= 0 (no overflow) and the row maximum >= -bound > -80 (no underflow), so no
        # row max is needed in the loop: one exp, one row sum, one division per iteration.
        base = neg - (neg.amax(1) + bound)[:, None]
        for _ in range(iterations):
            x = op.message(q, base).exp_()
            q = x.div_(x.sum(1, keepdim=True))
        return q
    for _ in range(iterations):  # huge weights: the general (slower on CPU) path
        q = torch.log_softmax(op.message(q, neg), dim=1).exp_()
    return q


def _operator_for(
    images: list[torch.Tensor], params: CRFParams, device: torch.device, engine: str = "auto"
) -> CRFOperator | None:
    """Lattices (one structure for all images, separated by group ids) and their folded operator."""
    lattices, weights = [], []
    sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
    groups = None
    if len(images) > 1:
        groups = torch.cat(
            [torch.full((h * w,), i, dtype=torch.int64, device=device) for i, (h, w) in enumerate(sizes)]
        )
    if params.pos_w > 0:
        if len(images) == 1:
            lattices.append(_positional_lattice(*sizes[0], params.pos_xy_std, device))
        else:
            feats = torch.cat([positional_features(h, w, params.pos_xy_std, device) for h, w in sizes])
            lattices.append(build_lattice(feats, groups))
        weights.append(params.pos_w)
    if params.bi_w > 0:
        feats = torch.cat([bilateral_features(im, params.bi_xy_std, params.bi_rgb_std) for im in images])
        lattices.append(build_lattice(feats, groups))
        weights.append(params.bi_w)
    if not lattices:
        return None
    return CRFOperator(lattices, weights, engine=engine)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; a CUDA device that is not there is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown CRF device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"CRF device {device!r} requested but CUDA is not available to PyTorch")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported CRF device {device!r} (cpu or cuda)")
    return dev


def _tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` that copies read-only arrays (torch warns about those)."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def refine_torch_batch(
    images: list[np.ndarray],
    probs_list: list[np.ndarray],
    params: CRFParams,
    device: str | torch.device | None = None,
    engine: str = "auto",
) -> list[np.ndarray]:
    """Refine several (already validated) images at once: one lattice structure, one mean-field loop."""
    dev = resolve_device(device)
    if not images:
        return []
    if len({p.shape[0] for p in probs_list}) > 1:
        raise ValueError("images refined in one batch must have the same number of classes")
    timgs = [_tensor(im).to(dev) for im in images]
    unaries = []
    for p in probs_list:
        c = p.shape[0]
        tp = _tensor(p).to(dev).reshape(c, -1).t().contiguous()  # channels-last (N x C)
        unaries.append(unary_from_probs(tp, params.unary_scale))
    with torch.no_grad():
        op = _operator_for(timgs, params, dev, engine) if params.iterations > 0 else None
        q = _mean_field(op, unaries[0] if len(unaries) == 1 else torch.cat(unaries), params.iterations)
    out, start = [], 0
    for p in probs_list:
        c, h, w = p.shape
        out.append(q[start : start + h * w].t().reshape(c, h, w).cpu().numpy())
        start += h * w
    return out


def refine_torch(
    image: np.ndarray,
    probs: np.ndarray,
    params: CRFParams,
    device: str | torch.device | None = None,
    engine: str = "auto",
) -> np.ndarray:
    """Refine one (already validated) image: C x H x W float32 probabilities."""
    return refine_torch_batch([image], [probs], params, device, engine)[0]
