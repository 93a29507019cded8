"""The numba CRF backend: exactness against pydensecrf (the C++ reference) on the real model's output.

Probabilities come from the real default model (``Segmenter().predict(path, return_probs=True)``) on real
VOC images. The kernel reproduces densecrf's float32 operations in the same order (splat sums in pixel
order, the same blur and slice arithmetic), so only ``exp`` (Cephes' polynomial vs Eigen's) and the
softmax sum's order differ. Measured on the first 6 sample images, LargeFOV and v2: labels 100 % equal,
max |dQ| <= 3e-6, mean <= 5e-9. Asserted: labels >= 99.9 % per image, max |dQ| < 1e-5, mean < 1e-7.

The first test compiles the kernels (tens of seconds, once per checkout: ``cache=True`` writes them to
disk); the last one checks that a fresh process loads them from that cache instead of compiling.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from conftest import REPO, VOC2012, voc_sample_ids
from PIL import Image

from deeplab_cli.crf import CRFParams, available_backends, refine
from deeplab_cli.crf.numba_backend import (
    bilateral_features,
    build_lattice,
    is_available,
    positional_features,
    refine_numba,
)

pytestmark = pytest.mark.skipif(not is_available(), reason="numba not installed")

LARGEFOV = CRFParams(iterations=10, pos_w=3, pos_xy_std=3, bi_w=4, bi_xy_std=121, bi_rgb_std=5)
V2 = CRFParams(iterations=10, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3)
N_IMAGES = 3
MAX_DIFF, MEAN_DIFF = 1e-5, 1e-7

needs_pydensecrf = pytest.mark.skipif(
    "pydensecrf" not in available_backends(),
    reason="pydensecrf2 not installed (pip install deeplab-cli[crf])",
)


@pytest.fixture(scope="module")
def samples() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(id, RGB image, C x H x W probabilities of the default model) for a few real VOC images."""
    from deeplab_cli.runtime import Segmenter

    segmenter = Segmenter(device="cpu")
    out = []
    for sid in voc_sample_ids(N_IMAGES):
        path = VOC2012 / "JPEGImages" / f"{sid}.jpg"
        image = np.asarray(Image.open(path).convert("RGB"))
        probs = segmenter.predict(path, return_probs=True).probs
        assert probs.shape[1:] == image.shape[:2]
        out.append((sid, image, np.ascontiguousarray(probs, dtype=np.float32)))
    return out


def _compare(got: np.ndarray, ref: np.ndarray, sid: str) -> None:
    assert got.shape == ref.shape and got.dtype == np.float32
    agree = (got.argmax(0) == ref.argmax(0)).mean()
    diff = np.abs(got - ref)
    assert agree >= 0.999, (sid, agree)
    assert diff.max() < MAX_DIFF and diff.mean() < MEAN_DIFF, (sid, diff.max(), diff.mean())


@needs_pydensecrf
@pytest.mark.parametrize("params", [LARGEFOV, V2], ids=["largefov", "v2"])
def test_matches_pydensecrf_on_real_probabilities(samples, params: CRFParams) -> None:
    changed = []
    for sid, image, probs in samples:
        ref = refine(image, probs, params, backend="pydensecrf")
        got = refine_numba(image, probs, params)
        _compare(got, ref, sid)
        np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)
        changed.append((ref.argmax(0) != probs.argmax(0)).mean())
    assert max(changed) > 0.002, changed  # the CRF really moved labels: the agreement is not trivial


@needs_pydensecrf
def test_other_settings_match_too(samples) -> None:
    """A softer unary, fewer iterations, one kernel alone, two labels (densecrf's scalar path); an odd
    pixel count (the kernels' vector, pair-of-rows and block tails)."""
    sid, image, probs = samples[0]
    crop, p = image[:151, :211].copy(), np.ascontiguousarray(probs[:, :151, :211])
    for params in (
        LARGEFOV,
        V2.replace(iterations=5, unary_scale=0.5),
        LARGEFOV.replace(pos_w=0),
        LARGEFOV.replace(bi_w=0),
    ):
        _compare(refine_numba(crop, p, params), refine(crop, p, params, backend="pydensecrf"), sid)
    two = np.ascontiguousarray(np.stack([p[0], p[1:].sum(0)]))
    _compare(refine_numba(crop, two, LARGEFOV), refine(crop, two, LARGEFOV, backend="pydensecrf"), sid)


@pytest.fixture(scope="module")
def logit_samples() -> list[tuple[str, np.ndarray, np.ndarray, object]]:
    """(id, RGB image, C x h x w logits, the resampler onto the image) from the default model."""
    from deeplab_cli.runtime import Segmenter

    segmenter = Segmenter(device="cpu")
    out = []
    for sid in voc_sample_ids(3):
        prepared = segmenter.prepare(VOC2012 / "JPEGImages" / f"{sid}.jpg")
        logits = segmenter.run([prepared])[0]
        resampler = prepared.frame.resampler(logits.shape[1:], prepared.image_size)
        out.append((sid, np.ascontiguousarray(prepared.source), logits, resampler))
    return out


def test_from_logits_is_the_crf_of_their_resampled_softmax(logit_samples) -> None:
    """What ``segment --crf`` runs: the unary straight from the logits (one pass: resampling, log-softmax)
    against the CRF of the probabilities the pipeline used to make first, and against pydensecrf."""
    from deeplab_cli.crf.numba_backend import refine_numba_logits

    for sid, image, logits, resampler in logit_samples:
        probs = resampler.dense_probs(logits)
        got = refine_numba_logits(image, logits, resampler.taps(), LARGEFOV)
        _compare(got, refine_numba(image, probs, LARGEFOV), sid)
        if "pydensecrf" in available_backends():
            _compare(got, refine(image, probs, LARGEFOV, backend="pydensecrf"), sid)
        assert (got.argmax(0) != probs.argmax(0)).mean() > 0.0005  # the CRF moved labels: not trivial


def test_from_logits_bad_inputs(logit_samples) -> None:
    from deeplab_cli.crf.core import CRFInputError
    from deeplab_cli.crf.numba_backend import refine_numba_logits

    _, image, logits, resampler = logit_samples[0]
    taps = resampler.taps()
    with pytest.raises(CRFInputError, match="NaN or infinite"):
        refine_numba_logits(image, np.where(logits > 5, np.nan, logits), taps, LARGEFOV)
    with pytest.raises(CRFInputError, match="outside"):
        refine_numba_logits(image, np.ascontiguousarray(logits[:, :, :10]), taps, LARGEFOV)
    with pytest.raises(CRFInputError, match="does not match its grid"):
        refine_numba_logits(image[:-1], logits, taps, LARGEFOV)
    with pytest.raises(CRFInputError, match="uint8"):
        refine_numba_logits(image.astype(np.float32), logits, taps, LARGEFOV)
    one = refine_numba_logits(image, logits[:1], taps, LARGEFOV)
    assert one.shape == (1, *image.shape[:2]) and (one == 1).all()


def test_thread_count_does_not_change_the_result(samples) -> None:
    """Every sum runs in a fixed order (splat: per vertex, pixels ascending), whatever the threads."""
    _, image, probs = samples[1]
    one = refine_numba(image, probs, LARGEFOV.replace(iterations=3), threads=1)
    two = refine_numba(image, probs, LARGEFOV.replace(iterations=3), threads=2)
    np.testing.assert_array_equal(one, two)
    with pytest.raises(ValueError, match="threads"):
        refine_numba(image, probs, LARGEFOV, threads=-1)


def test_three_threads_give_the_bits_of_one(samples) -> None:
    """A process with 3 numba threads (oversubscribed here: the lattice's helper thread beside 2 threads
    making the unary, then the neighbours, normaliser and mean field on 3) gives the bits of one thread."""
    _, image, probs = samples[1]
    crop, p = image[:97, :131].copy(), np.ascontiguousarray(probs[:, :97, :131])
    code = """
import sys, numpy as np
from deeplab_cli.crf.numba_backend import refine_numba, CRFParams
image, probs = np.load(sys.argv[1]), np.load(sys.argv[2])
one = refine_numba(image, probs, CRFParams(iterations=3), threads=1)
three = refine_numba(image, probs, CRFParams(iterations=3), threads=3)
print(np.array_equal(one, three), float(np.abs(one - three).max()))
"""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/image.npy", crop)
        np.save(f"{tmp}/probs.npy", p)
        env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "3"}
        argv = [sys.executable, "-c", code, f"{tmp}/image.npy", f"{tmp}/probs.npy"]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "True", done.stdout


def _tbb_wheel_installed() -> bool:
    try:
        importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and _tbb_wheel_installed()),
    reason="the tbb wheel is a Linux dependency",
)
def test_numba_threads_come_from_tbb_where_its_wheel_is_installed() -> None:
    """pip puts libtbb off the loader's path; without our loading it numba silently takes its slower
    workqueue layer (10% of the CRF's wall time on 2 cores)."""
    code = """
import numba, numpy as np
from deeplab_cli.crf.numba_backend import refine_numba
refine_numba(np.zeros((8, 8, 3), np.uint8), np.full((2, 8, 8), 0.5, np.float32), threads=2)
print(numba.threading_layer())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "LD_LIBRARY_PATH")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "tbb", done.stdout


def test_an_error_beside_the_vertex_insertion_reaches_the_caller() -> None:
    """The insertion runs on a helper thread while the caller makes the unary: a failure on either side
    is raised in the caller, and the caller's numba thread count is restored."""
    import numba

    from deeplab_cli.crf import numba_backend as nb

    def fail() -> None:
        raise MemoryError("no room for the vertices")

    with nb._num_threads(2):
        before = numba.get_num_threads()
        with pytest.raises(MemoryError, match="vertices"):
            nb._side_by_side(fail, lambda: 1)
        with pytest.raises(ZeroDivisionError):
            nb._side_by_side(lambda: 1, lambda: 1 / 0)
        assert numba.get_num_threads() == before
        assert nb._side_by_side(lambda: "serial", lambda: numba.get_num_threads()) == ("serial", before - 1)


def test_the_unary_is_the_floored_log_of_the_probabilities() -> None:
    """``unary_rows`` (a vector log in one compiled pass) against numpy's float64 log: within one float32
    ulp over the whole range (1e-8 to 1 and above), values below the floor floored, a pixel count that
    leaves partial vectors and tiles, padding columns zero."""
    from deeplab_cli.crf.numba_backend import unary_rows

    c, h, w = 13, 233, 257
    probs = np.geomspace(1e-8, 4.0, c * h * w).astype(np.float32)
    probs = np.random.default_rng(3).permutation(probs).reshape(c, h, w)
    probs[0, 0, :4] = [0.0, 1e-12, 1.0, 0.5]
    neg = unary_rows(probs, 2.0)
    assert neg.shape == (h * w, 16) and not neg[:, c:].any()
    floored = np.maximum(probs.reshape(c, -1).T, np.float32(1e-8)).astype(np.float64)
    expected = np.log(floored)
    ulp = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(neg[:, :c] / 2.0 - expected) <= ulp)
    assert neg[0, 0] == neg[1, 0] == np.float32(2.0 * np.log(np.float32(1e-8))) and neg[2, 0] == 0


def test_zero_iterations_and_one_class(samples) -> None:
    _, image, probs = samples[1]
    out = refine_numba(image, probs, LARGEFOV.replace(iterations=0))
    np.testing.assert_allclose(out, probs / probs.sum(0), atol=1e-6)
    sharp = refine_numba(image, probs, LARGEFOV.replace(iterations=0, unary_scale=2.0))
    expected = np.maximum(probs, 1e-8) ** 2
    np.testing.assert_allclose(sharp, expected / expected.sum(0), atol=1e-5)
    single = refine_numba(image, probs[:1] * 0 + 0.3, LARGEFOV)
    assert single.shape == (1,) + probs.shape[1:] and (single == 1).all()


@pytest.mark.parametrize(
    ("image", "probs", "message"),
    [
        (np.zeros((4, 5, 3), np.float32), np.full((2, 4, 5), 0.5, np.float32), "uint8"),
        (np.zeros((4, 5), np.uint8), np.full((2, 4, 5), 0.5, np.float32), "H x W x 3"),
        (np.zeros((4, 5, 3), np.uint8), np.full((2, 5, 4), 0.5, np.float32), "do not match"),
        (np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), np.nan, np.float32), "NaN"),
        (np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), -0.5, np.float32), ">= 0"),
        ([[0]], np.full((2, 4, 5), 0.5, np.float32), "numpy arrays"),
    ],
)
def test_bad_inputs_raise_value_error(image, probs, message) -> None:
    with pytest.raises(ValueError, match=message):
        refine_numba(image, probs, LARGEFOV)


def test_bad_params_raise_value_error() -> None:
    with pytest.raises(ValueError, match="CRFParams"):
        refine_numba(np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), 0.5, np.float32), {"bi_w": 4})


# -- the lattice ------------------------------------------------------------------------------------------


def _filter(lat, values: np.ndarray) -> np.ndarray:
    """Unnormalised lattice filtering ``K x`` in float64 numpy, from the lattice's index arrays."""
    m = lat.n_vertices
    v = np.zeros((m + 1, values.shape[1]))
    np.add.at(
        v, lat.offsets.reshape(-1), (lat.bary[:, :, None] * values[:, None, :]).reshape(-1, values.shape[1])
    )
    for axis in range(lat.d + 1):
        prev, nxt = lat.nbr[axis, :, 0], lat.nbr[axis, :, 1]
        new = v.copy()
        new[:m] += 0.5 * (v[np.where(prev < 0, m, prev)] + v[np.where(nxt < 0, m, nxt)])
        v = new
    alpha = 1.0 / (1.0 + 2.0 ** (-lat.d))
    return (lat.bary[:, :, None] * v[lat.offsets]).sum(1) * alpha


@pytest.fixture(scope="module")
def voc_image() -> np.ndarray:
    return np.asarray(Image.open(VOC2012 / "JPEGImages" / f"{voc_sample_ids(1)[0]}.jpg").convert("RGB"))


def test_lattice_is_the_torch_lattice(voc_image: np.ndarray) -> None:
    """Same simplices, weights and vertex count as the torch backend's lattice (itself checked
    against pydensecrf); the weights are a partition of unity."""
    from deeplab_cli.crf.lattice import build_lattice as build_torch

    feats = bilateral_features(voc_image[:80, :120].copy(), 20.0, 10.0)
    lat = build_lattice(feats)
    ref = build_torch(torch.from_numpy(feats))
    assert lat.n_vertices == ref.n_vertices and lat.d == 5
    np.testing.assert_array_equal(lat.bary, ref.weights.numpy())
    np.testing.assert_allclose(lat.bary.sum(1), 1.0, atol=1e-5)
    assert (lat.bary >= -1e-6).all()
    # The splat lists hold each (point, corner) pair once, points ascending per vertex.
    ptr, pix, _ = lat.splat_lists
    assert ptr[-1] == lat.offsets.size
    assert all(np.all(np.diff(pix[a:b]) > 0) for a, b in zip(ptr[:-1], ptr[1:], strict=True))


def test_constant_in_constant_out_and_normaliser(voc_image: np.ndarray) -> None:
    lat = build_lattice(bilateral_features(voc_image[:60, :80].copy(), 8.0, 13.0))
    ones = _filter(lat, np.ones((lat.offsets.shape[0], 1)))[:, 0]
    assert (ones > 0).all()
    np.testing.assert_allclose(_filter(lat, np.full((ones.size, 3), 2.5)) / ones[:, None], 2.5, rtol=1e-9)
    np.testing.assert_allclose(lat.norm, 1 / np.sqrt(ones), rtol=1e-5)


@pytest.mark.parametrize(("sxy", "srgb"), [(3.0, 13.0), (10.0, 20.0)])
def test_matches_brute_force_gaussian(voc_image: np.ndarray, sxy: float, srgb: float) -> None:
    """The lattice approximates the exact Gaussian (Adams et al. 2010): the filter matrix correlates
    with it at ~0.99 (as the torch lattice, see test_crf_lattice.py); normalised filtering of a random
    signal lands within ~0.02 of the exact normalised Gaussian on average."""
    h, w, _ = voc_image.shape
    crop = np.ascontiguousarray(voc_image[h // 3 : h // 3 + 24, w // 2 : w // 2 + 24])
    feats = bilateral_features(crop, sxy, srgb).astype(np.float64)
    exact = np.exp(-0.5 * ((feats[:, None] - feats[None]) ** 2).sum(-1))
    lat = build_lattice(feats)
    approx = _filter(lat, np.eye(feats.shape[0]))
    assert np.corrcoef(approx.ravel(), exact.ravel())[0, 1] > 0.98
    values = np.random.default_rng(0).random((feats.shape[0], 4))
    ref = exact @ values / exact.sum(1, keepdims=True)
    got = _filter(lat, values) / _filter(lat, np.ones((feats.shape[0], 1)))
    assert np.abs(got - ref).mean() < 0.035


def test_positional_lattice_is_gridded() -> None:
    feats = positional_features(30, 40, 3.0)
    assert feats.shape == (1200, 2) and feats[41].tolist() == pytest.approx([1 / 3.0, 1 / 3.0])
    lat = build_lattice(feats)
    np.testing.assert_allclose(lat.bary.sum(1), 1.0, atol=1e-5)
    ones = _filter(lat, np.ones((1200, 1)))[:, 0].reshape(30, 40)
    # Away from the borders a translation-invariant lattice filters a constant to a nearly constant,
    # periodic pattern (period 3 std = 9 px, the lattice's spacing; float32 features break exactness).
    inner = ones[8:22, 8:32]
    assert inner.max() / inner.min() < 1.01
    np.testing.assert_allclose(ones[10, 10:20], ones[19, 10:20], rtol=1e-4)


def test_mean_field_on_a_lattice_of_another_dimension(voc_image: np.ndarray) -> None:
    """The kernel's general slice (a lattice with neither 3 nor 6 corners: x, y and grey here, d = 3) is
    the same mean-field as a float64 numpy version built on :func:`_filter`; 13 labels leave 3 padding
    lanes in the last vector of 8."""
    from deeplab_cli.crf import _numba_kernels as nk
    from deeplab_cli.crf.numba_backend import unary_rows

    crop = voc_image[:40, :60].astype(np.float32)
    feats = np.concatenate([positional_features(40, 60, 4.0), crop.mean(2).reshape(-1, 1) / 10.0], axis=1)
    lat = build_lattice(feats)
    assert lat.d == 3
    c, n, weight, iterations = 13, feats.shape[0], 3.0, 3
    probs = np.random.default_rng(1).dirichlet(np.ones(c), n).T.reshape(c, 40, 60).astype(np.float32)
    neg = unary_rows(probs, 1.0)
    q = np.zeros_like(neg)
    nk.softmax_rows(neg, c, q, False)
    got = np.empty((c, n), np.float32)
    nk.mean_field(
        neg, q, iterations, 1, np.array([weight], np.float32),
        lat.offsets, lat.bary, lat.nbr, lat.norm, lat.offsets, lat.bary, lat.nbr, lat.norm, False, c, got,
    )  # fmt: skip

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    norm = lat.norm.astype(np.float64)[:, None]
    ref = softmax(neg[:, :c].astype(np.float64))
    for _ in range(iterations):
        ref = softmax(neg[:, :c] + weight * norm * _filter(lat, norm * ref))
    np.testing.assert_allclose(got.T, ref, atol=2e-5)
    assert (got.argmax(0) == ref.argmax(1)).mean() >= 0.999


# -- compilation cache ---------------------------------------------------------------------------------------


def test_a_new_process_loads_the_compiled_kernels_from_the_disk_cache(samples) -> None:
    """Worker processes must not compile again: a fresh interpreter finds every kernel in the cache."""
    _, image, probs = samples[0]
    refine_numba(image[:40, :50].copy(), np.ascontiguousarray(probs[:, :40, :50]), LARGEFOV)  # compiled
    code = """
import json, time
import numpy as np
start = time.perf_counter()
from deeplab_cli.crf import _numba_kernels as nk
from deeplab_cli.crf.numba_backend import refine_numba, CRFParams
rng = np.random.default_rng(0)
probs = rng.random((21, 40, 50), dtype=np.float32)
refine_numba(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), probs, CRFParams())
stats = {n: [f.stats.cache_hits, f.stats.cache_misses] for n, f in vars(nk).items() if hasattr(f, "stats")}
print(json.dumps({"seconds": time.perf_counter() - start, "stats": {n: [sum(h.values()), sum(m.values())]
      for n, (h, m) in stats.items()}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    used = {name: hm for name, hm in report["stats"].items() if hm != [0, 0]}
    assert {"locate", "mean_field", "unary_from_probs"} <= set(used), report
    assert {"insert_vertices", "blur_neighbours", "filter_ones"} <= set(used), report
    assert all(misses == 0 and hits > 0 for hits, misses in used.values()), report


def test_a_worker_warm_up_loads_every_kernel_of_both_paths() -> None:
    """CRF workers warm up before their first image: the probabilities' path and the logits' (what
    ``segment`` runs) must both be compiled or loaded then, not at the first image."""
    from deeplab_cli.crf.numba_backend import warm_up

    warm_up()  # compiled here if the cache lacks anything
    code = """
import json
from deeplab_cli.crf import _numba_kernels as nk
from deeplab_cli.crf.numba_backend import warm_up
warm_up()
print(json.dumps({n: [sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())]
                  for n, f in vars(nk).items() if hasattr(f, "stats")}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    used = {name: hm for name, hm in json.loads(done.stdout.splitlines()[-1]).items() if hm != [0, 0]}
    both_paths = {"bilateral_features", "locate", "insert_vertices", "blur_neighbours", "filter_ones"}
    both_paths |= {"mean_field", "unary_from_probs", "rows_from_planes", "unary_from_logits"}
    assert both_paths <= set(used), used
    assert all(misses == 0 for _, misses in used.values()), used


def test_processes_warm_up_one_at_a_time() -> None:
    """The warm-up's lock: processes starting together take turns (so a cold cache is compiled once)."""
    code = """
import sys, time
from deeplab_cli.crf.numba_backend import _one_process_at_a_time
with _one_process_at_a_time():
    start = time.time()
    time.sleep(1.0)
    print(start, time.time())
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    spans = sorted(tuple(map(float, run.communicate(timeout=120)[0].split())) for run in runs)
    assert all(run.returncode == 0 for run in runs)
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False)), spans


def test_the_warm_up_says_so_when_it_compiles_and_is_silent_when_it_loads(tmp_path) -> None:
    """CRF workers print a notice when their warm-up compiles (about a minute, once): the hook fires on
    an empty kernel cache, and not when the kernels are already there."""
    from deeplab_cli.crf.numba_backend import warm_up

    said: list[int] = []
    warm_up(lambda: said.append(1))
    assert said == []
    code = """
from deeplab_cli.crf.numba_backend import warm_up
said = []
warm_up(lambda: said.append(1))
print(len(said))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1", done.stdout
