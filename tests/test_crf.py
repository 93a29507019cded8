"""The dense CRF on real model probabilities: torch backend vs pydensecrf (the C++ reference).

Probabilities come from the real DeepLabv3 MobileNetV2 VOC TFLite model run by ai-edge-litert (the
independent reference runtime), with TF DeepLab's protocol: scale to [-1, 1], pad bottom/right with 0
to 513, logits upsampled with align_corners=True, cropped, softmax.

Tolerances: our lattice reproduces densecrf's arithmetic step by step in float32, so the two differ only
by summation order. Measured on these images: max |dQ| <= 1.2e-6, mean ~1e-9, labels 100 % equal; the
test allows max 1e-4 and mean 1e-6 (two orders of magnitude of float32 noise over 10 iterations).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, VOC2012, WEIGHTS_MIRROR, voc_sample_ids
from PIL import Image

from deeplab_cli.crf import CRFParams, available_backends, refine, refine_batch
from deeplab_cli.crf.backends import BackendUnavailableError
from deeplab_cli.crf.runner import CRFRunner
from deeplab_cli.crf.torch_backend import refine_torch_batch

TFLITE = WEIGHTS_MIRROR / "deeplabv3-mnv2-voc" / "lite-model_mobilenetv2-coco_dr_1.tflite"
LARGEFOV = CRFParams(iterations=10, pos_w=3, pos_xy_std=3, bi_w=4, bi_xy_std=121, bi_rgb_std=5)
N_IMAGES = 5

needs_pydensecrf = pytest.mark.skipif(
    "pydensecrf" not in available_backends(),
    reason="pydensecrf2 not installed (pip install deeplab-cli[crf])",
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Single-threaded torch here: on a shared 2-core CI machine OpenMP's spin-waiting makes threaded
    small ops many times slower. The thread-pool path is tested explicitly below."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tflite_probs(interpreter, image: np.ndarray) -> np.ndarray:
    """C x H x W softmax probabilities of the TFLite model for an RGB uint8 image (<= 513 px)."""
    h, w, _ = image.shape
    x = np.zeros((1, 513, 513, 3), np.float32)
    x[0, :h, :w] = image / 127.5 - 1.0
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    logits = torch.from_numpy(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy())
    up = torch.nn.functional.interpolate(
        logits.permute(0, 3, 1, 2), size=(513, 513), mode="bilinear", align_corners=True
    )[0, :, :h, :w]
    return torch.softmax(up, 0).numpy()


@pytest.fixture(scope="module")
def samples() -> list[tuple[str, np.ndarray, np.ndarray]]:
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    interpreter = litert.Interpreter(model_path=str(TFLITE))
    interpreter.allocate_tensors()
    out = []
    for sid in voc_sample_ids(N_IMAGES):
        image = np.asarray(Image.open(VOC2012 / "JPEGImages" / f"{sid}.jpg").convert("RGB"))
        out.append((sid, image, _tflite_probs(interpreter, image)))
    return out


@needs_pydensecrf
def test_torch_matches_pydensecrf_on_real_probabilities(samples) -> None:
    changed = []
    for sid, image, probs in samples:
        ref = refine(image, probs, LARGEFOV, backend="pydensecrf")
        got = refine(image, probs, LARGEFOV, backend="torch", device="cpu")
        assert got.shape == probs.shape and got.dtype == np.float32
        np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)
        agree = (got.argmax(0) == ref.argmax(0)).mean()
        diff = np.abs(got - ref)
        assert agree >= 0.995, (sid, agree)
        assert diff.max() < 1e-4 and diff.mean() < 1e-6, (sid, diff.max(), diff.mean())
        changed.append((ref.argmax(0) != probs.argmax(0)).mean())
    # The CRF really did something on these images (so the agreement above is not trivial).
    assert max(changed) > 0.01, changed


@needs_pydensecrf
def test_other_parameters_match_too(samples) -> None:
    """DeepLab v2's CRF settings, a softer unary and fewer iterations, on a non-square image."""
    _, image, probs = samples[0]
    params = CRFParams(
        iterations=5, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3, unary_scale=0.5
    )
    ref = refine(image, probs, params, backend="pydensecrf")
    got = refine(image, probs, params, backend="torch")
    assert (got.argmax(0) == ref.argmax(0)).mean() >= 0.995
    assert np.abs(got - ref).max() < 1e-4
    # The sparse-tensor engine (what CUDA runs) on the CPU.
    got = refine_torch_batch([image], [probs], params, device="cpu", engine="torch")[0]
    assert np.abs(got - ref).max() < 1e-4
    only_bilateral = params.replace(pos_w=0)
    ref = refine(image, probs, only_bilateral, backend="pydensecrf")
    got = refine(image, probs, only_bilateral, backend="torch")
    assert np.abs(got - ref).max() < 1e-4


@needs_pydensecrf
def test_pixel_counts_that_are_not_a_multiple_of_four_match_too(samples) -> None:
    """densecrf's x86 lattice build locates points four at a time and also inserts the vertices of the
    all-zero padding of the last four; the lattice does the same (per image of a batch). Without it,
    these crops differed from pydensecrf by up to 6e-4 (pixels near the top-left in position and colour)."""
    _, image, probs = samples[0]
    params = LARGEFOV.replace(pos_w=0)
    images = [image[:151, :211].copy(), image[:150, :209].copy()]
    scores = [np.ascontiguousarray(probs[:, :h, :w]) for h, w in ((151, 211), (150, 209))]
    refs = [refine(im, p, params, backend="pydensecrf") for im, p in zip(images, scores, strict=True)]
    alone = [refine(im, p, params, backend="torch") for im, p in zip(images, scores, strict=True)]
    batch = refine_torch_batch(images, scores, params, device="cpu", engine="torch")
    for ref, one, batched in zip(refs, alone, batch, strict=True):
        assert np.abs(one - ref).max() < 1e-5
        assert np.abs(batched - ref).max() < 1e-5


def test_zero_iterations_is_the_softmax_of_the_unary(samples) -> None:
    _, image, probs = samples[1]
    out = refine(image, probs, LARGEFOV.replace(iterations=0))
    np.testing.assert_allclose(out, probs / probs.sum(0), atol=1e-6)
    sharp = refine(image, probs, LARGEFOV.replace(iterations=0, unary_scale=2.0))
    expected = np.maximum(probs, 1e-8) ** 2
    np.testing.assert_allclose(sharp, expected / expected.sum(0), atol=1e-5)


def test_single_class_is_all_ones(samples) -> None:
    _, image, probs = samples[0]
    out = refine(image, probs[:1] * 0 + 0.3, LARGEFOV)
    assert out.shape == (1,) + probs.shape[1:]
    assert (out == 1).all()


def test_batch_equals_single_images(samples) -> None:
    """The grouped lattice (how CUDA batches images of any size) gives the per-image results."""
    images = [samples[0][1][:200, :250].copy(), samples[1][1][100:250, 200:420].copy()]
    probs = [
        np.ascontiguousarray(samples[0][2][:, :200, :250]),
        np.ascontiguousarray(samples[1][2][:, 100:250, 200:420]),
    ]
    singles = [refine(im, p, LARGEFOV, backend="torch") for im, p in zip(images, probs, strict=True)]
    grouped = refine_torch_batch(images, probs, LARGEFOV, device="cpu")
    listed = refine_batch(images, probs, LARGEFOV, backend="torch")
    for s, g, b in zip(singles, grouped, listed, strict=True):
        np.testing.assert_allclose(g, s, atol=2e-6)
        np.testing.assert_array_equal(b, s)


def test_thread_pool_split_matches_single_thread(samples) -> None:
    """The CPU engine splits pixels and vertex rows over threads; the result does not depend on it."""
    from deeplab_cli.crf.torch_backend import CRFOperator, _mean_field, _operator_for, unary_from_probs

    _, image, probs = samples[2]
    image, probs = image[:200, :300].copy(), np.ascontiguousarray(probs[:, :200, :300])
    torch.set_num_threads(1)  # numba's OpenMP layer (the auto backend, used above) may have changed it
    single = _operator_for([torch.from_numpy(image)], LARGEFOV, torch.device("cpu"))
    assert isinstance(single, CRFOperator) and single.engine == "scipy" and len(single.blocks) == 1
    unary = unary_from_probs(torch.from_numpy(probs).reshape(probs.shape[0], -1).t().contiguous(), 1.0)
    one = _mean_field(single, unary, 5)
    torch.set_num_threads(3)
    try:
        three = _operator_for([torch.from_numpy(image)], LARGEFOV, torch.device("cpu"))
        assert len(three.blocks) == 3
        split = _mean_field(three, unary, 5)
    finally:
        torch.set_num_threads(1)
    torch.testing.assert_close(split, one, rtol=0, atol=2e-6)


def test_worker_pool_runs_the_crf_and_stops_at_once(samples) -> None:
    (_, im0, p0), (_, im1, p1) = samples[:2]
    im0, p0 = im0[:120, :160].copy(), np.ascontiguousarray(p0[:, :120, :160])
    params = LARGEFOV.replace(iterations=3)
    other = params.replace(bi_w=8.0, bi_rgb_std=3.0)
    with CRFRunner(params, backend="torch", workers=1, threads=1) as pool:
        assert pool.mode == "processes"
        futures = [pool.submit(im0, p0), pool.submit(im1, p1), pool.submit(im0, p0, other)]
        results = [f.result(timeout=120) for f in futures]
        bad = pool.submit(im0, p0[:, :10])
        with pytest.raises(ValueError, match="do not match"):
            bad.result(timeout=60)
        (worker,) = pool.worker_pids()
        os.kill(worker, signal.SIGINT)  # Ctrl-C reaches the whole process group: the parent decides
        np.testing.assert_allclose(pool.refine(im0, p0), results[0], atol=1e-6)
        assert pool.worker_pids() == [worker]
        pending = [pool.submit(im1, p1) for _ in range(2)]
        start = time.perf_counter()
        pool.close(cancel=True)
        assert time.perf_counter() - start < 3
    assert all(f.cancelled() or f.done() for f in pending)
    assert not _alive(worker)
    expected = [(im0, p0, params), (im1, p1, params), (im0, p0, other)]
    for res, (im, p, chosen) in zip(results, expected, strict=True):
        np.testing.assert_allclose(res, refine(im, p, chosen, backend="torch"), atol=1e-6)
    assert not np.allclose(results[0], results[2])  # the per-image parameters were used


def test_worker_pool_takes_any_array_an_inline_call_takes(samples) -> None:
    """Arrays cross to the workers as raw bytes; those that cannot (object arrays hold pointers) go
    pickled, so every input gets the inline call's answer and no worker dies of one."""
    _, image, probs = samples[0]
    image, probs = image[:60, :80].copy(), np.ascontiguousarray(probs[:, :60, :80])
    params = LARGEFOV.replace(iterations=2)
    expected = refine(image, probs, params, backend="numba")
    with CRFRunner(params, backend="numba", workers=2, threads=1) as pool:
        pids = pool.worker_pids()
        for _ in range(2):  # each worker gets each bad input
            with pytest.raises(ValueError, match="floating point, got object"):
                pool.refine(image, probs.astype(object))
            with pytest.raises(ValueError, match=">= 0"):
                pool.refine(image, -probs)
        np.testing.assert_array_equal(pool.refine(image, probs.astype(np.float64)), expected)
        mirrored = refine(image[:, ::-1], probs[:, :, ::-1], params, backend="numba")
        np.testing.assert_array_equal(pool.refine(image[:, ::-1], probs[:, :, ::-1]), mirrored)  # views
        assert [pool.refine(image, probs) for _ in range(4)][-1].tobytes() == expected.tobytes()
        assert pool.worker_pids() == pids and all(_alive(pid) for pid in pids)


def test_workers_refine_logits_as_the_caller_would(samples) -> None:
    """``refine_logits`` (what ``segment --crf`` sends: the small logits and their grid, not C x H x W
    probabilities) gives in a worker exactly what it gives inline, for numba and for pydensecrf (whose
    worker resamples and softmaxes as the caller used to)."""
    from deeplab_cli.crf.core import refine_logits
    from deeplab_cli.geometry import Resampler

    _, image, _ = samples[0]
    image = image[:60, :80].copy()
    logits = np.random.default_rng(5).normal(0, 4, (6, 9, 11)).astype(np.float32)
    grid = Resampler.between((9, 11), (60, 80), corners=False)
    params = LARGEFOV.replace(iterations=3)
    backends = ["numba"] + (["pydensecrf"] if "pydensecrf" in available_backends() else [])
    for backend in backends:
        inline = refine_logits(image, logits, grid, params, backend=backend)
        with CRFRunner(params, backend=backend, workers=1, threads=1) as pool:
            np.testing.assert_array_equal(pool.refine_logits(image, logits, grid), inline)
            with pytest.raises(ValueError, match="NaN"):
                pool.refine_logits(image, logits * np.nan, grid)
        reference = refine(image, grid.dense_probs(logits), params, backend=backend)
        np.testing.assert_allclose(inline, reference, atol=1e-5)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_workers_exit_when_their_parent_is_killed(tmp_path) -> None:
    script = (
        "import time\n"
        "from deeplab_cli.crf import CRFParams\n"
        "from deeplab_cli.crf.runner import CRFRunner\n"
        "runner = CRFRunner(CRFParams(), backend='torch', workers=1)\n"
        "runner.wait_ready()\n"
        "print(runner.worker_pids()[0], flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker)
    finally:
        parent.kill()
        parent.wait()


def test_inline_runner_and_per_image_parameters(samples) -> None:
    _, image, probs = samples[1]
    params = LARGEFOV.replace(iterations=2)
    with CRFRunner(params, backend="torch") as runner:
        assert (runner.mode, runner.workers) == ("inline", 0)
        np.testing.assert_array_equal(
            runner.refine(image, probs), refine(image, probs, params, backend="torch")
        )
        softer = params.replace(unary_scale=0.5)
        future = runner.submit(image, probs, softer)
        assert future.done()
        np.testing.assert_array_equal(future.result(), refine(image, probs, softer, backend="torch"))
        assert isinstance(runner.submit(image, probs[:, :5]).exception(), ValueError)
    with pytest.raises(RuntimeError, match="closed"):
        runner.refine(image, probs)


def test_gpu_batcher_groups_by_parameters(samples) -> None:
    """The CUDA path's batching thread, run on the CPU device (no GPU here): results in order, per
    parameter set, equal to single refines; cancelled work is dropped."""
    from deeplab_cli.crf.runner import _GPUBatcher

    (_, im0, p0), (_, im1, p1) = samples[:2]
    params = LARGEFOV.replace(iterations=2)
    other = params.replace(bi_xy_std=40.0)
    batcher = _GPUBatcher(params, "cpu")
    futures = [batcher.submit(im0, p0, None), batcher.submit(im1, p1, other), batcher.submit(im1, p1, None)]
    results = [f.result(timeout=120) for f in futures]
    batcher.close(cancel=False)
    for res, (im, p, chosen) in zip(
        results, [(im0, p0, params), (im1, p1, other), (im1, p1, params)], strict=True
    ):
        np.testing.assert_allclose(res, refine(im, p, chosen, backend="torch"), atol=2e-6)


def test_cuda_index_reaches_the_crf(monkeypatch) -> None:
    """``--device cuda:1`` runs the CRF on GPU 1 (torch sees two GPUs here by monkeypatching)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    runner = CRFRunner(CRFParams(), backend="auto", device="cuda:1", workers=2)
    try:
        assert (runner.torch_device, runner.backend, runner.mode, runner.workers) == (
            "cuda:1",
            "torch",
            "gpu",
            0,
        )
        assert runner._gpu is not None and runner._gpu.device == "cuda:1"
    finally:
        runner.close()
    cpu_only = (
        CRFRunner(CRFParams(), backend="pydensecrf", device="cuda:1")
        if "pydensecrf" in available_backends()
        else None
    )
    if cpu_only is not None:
        assert (cpu_only.torch_device, cpu_only.mode) == (
            "cpu",
            "inline",
        )  # CPU-only backends stay on the CPU
    from deeplab_cli.errors import DeviceError

    with pytest.raises(DeviceError, match="2 GPU"):
        CRFRunner(CRFParams(), device="cuda:2")


def test_backend_is_checked_when_the_runner_is_made(monkeypatch) -> None:
    from deeplab_cli.crf import backends

    monkeypatch.setattr(backends, "is_installed", lambda name: name == "torch")
    with pytest.raises(BackendUnavailableError, match=r"pip install \"deeplab-cli\[crf\]\""):
        CRFRunner(CRFParams(), backend="pydensecrf", workers=1)
    with pytest.raises(BackendUnavailableError, match="unknown CRF backend"):
        CRFRunner(CRFParams(), backend="densecrf")
    assert CRFRunner(CRFParams(), backend="auto").backend == "torch"  # auto without numba
    monkeypatch.setattr(backends, "is_installed", lambda name: True)
    assert CRFRunner(CRFParams(), backend="auto").backend == "numba"  # auto with numba, on the CPU


@pytest.mark.parametrize(
    ("cores", "gpu", "expected"),
    [
        (1, False, (0, 1)),
        (2, False, (2, 1)),
        (3, False, (3, 1)),
        (4, False, (3, 1)),
        (8, False, (6, 1)),
        (16, False, (8, 1)),
        (64, False, (8, 6)),
        (2, True, (1, 1)),
        (16, True, (8, 1)),
    ],
)
def test_core_split(cores: int, gpu: bool, expected: tuple[int, int]) -> None:
    from deeplab_cli.crf.runner import MAX_CRF_WORKERS, default_crf_workers, network_threads

    workers, threads = default_crf_workers(cores, gpu)
    assert (workers, threads) == expected
    network = network_threads(cores, workers, threads)
    if workers:  # a CPU network keeps what the CRF workers leave, at least one thread
        assert network == max(1, cores - workers * threads)
    else:
        assert network is None  # inline: no split, the CRF runs between network calls
    used = max(workers, 1) * threads
    assert workers <= MAX_CRF_WORKERS and used <= cores
    if gpu and cores > 1:
        assert used <= cores - 1  # the GPU's feeder keeps a core
    elif cores > 1:
        assert used >= 3 * cores / 4 or workers == MAX_CRF_WORKERS  # the CRF is most of the CPU work


def _one_bad_value(value: float) -> np.ndarray:
    probs = np.full((2, 4, 5), 0.5, np.float32)
    probs[1, 2, 3] = value
    return probs


@pytest.mark.parametrize(
    ("image", "probs", "message"),
    [
        (np.zeros((4, 5, 3), np.float32), np.full((2, 4, 5), 0.5, np.float32), "uint8"),
        (np.zeros((4, 5), np.uint8), np.full((2, 4, 5), 0.5, np.float32), "H x W x 3"),
        (np.zeros((4, 5, 4), np.uint8), np.full((2, 4, 5), 0.5, np.float32), "H x W x 3"),
        (np.zeros((4, 5, 3), np.uint8), np.full((2, 5, 4), 0.5, np.float32), "do not match"),
        (np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 0.5, np.float32), "C x H x W"),
        (np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), np.nan, np.float32), "NaN"),
        (np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), -0.5, np.float32), ">= 0"),
        # one bad value among good ones, wherever it is (the check reduces to the minimum and maximum)
        (np.zeros((4, 5, 3), np.uint8), _one_bad_value(np.nan), "NaN"),
        (np.zeros((4, 5, 3), np.uint8), _one_bad_value(np.inf), "infinite"),
        (np.zeros((4, 5, 3), np.uint8), _one_bad_value(-np.inf), "infinite"),
        (np.zeros((4, 5, 3), np.uint8), _one_bad_value(-1e-30), ">= 0"),
        (np.zeros((4, 5, 3), np.uint8), np.full((2, 4, 5), 1, np.int64), "floating"),
        ([[0]], np.full((2, 4, 5), 0.5, np.float32), "numpy arrays"),
    ],
)
def test_bad_inputs_raise_value_error(image, probs, message) -> None:
    with pytest.raises(ValueError, match=message):
        refine(image, probs)


def test_params_validation_and_round_trip() -> None:
    p = CRFParams()
    assert p.to_dict() == {
        "iterations": 10,
        "pos_w": 3.0,
        "pos_xy_std": 3.0,
        "bi_w": 4.0,
        "bi_xy_std": 121.0,
        "bi_rgb_std": 5.0,
        "unary_scale": 1.0,
    }
    assert CRFParams.from_dict(p.to_dict()) == p
    assert CRFParams.from_dict({"bi_xy_std": 67, "iterations": 5}).bi_xy_std == 67.0
    with pytest.raises(ValueError, match="iterations must be >= 0"):
        CRFParams(iterations=-1)
    with pytest.raises(ValueError, match="integer"):
        CRFParams(iterations=2.5)
    for name in ("pos_xy_std", "bi_xy_std", "bi_rgb_std", "unary_scale"):
        with pytest.raises(ValueError, match=name):
            CRFParams(**{name: 0})
    with pytest.raises(ValueError, match="pos_w"):
        CRFParams(pos_w=-1)
    with pytest.raises(ValueError, match="finite"):
        CRFParams(bi_w=float("nan"))
    with pytest.raises(ValueError, match="unknown CRF parameter"):
        CRFParams.from_dict({"bi_std": 3})
    with pytest.raises(BackendUnavailableError, match="unknown CRF backend"):
        refine(np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 2), 0.5, np.float32), backend="densecrf")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_device_error() -> None:
    from deeplab_cli.errors import DeviceError

    with pytest.raises(DeviceError, match="CUDA is not available"):
        refine(np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 2), 0.5, np.float32), device="cuda")


def test_missing_pydensecrf_says_how_to_install(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] == "pydensecrf":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert "pydensecrf" not in available_backends()
    with pytest.raises(BackendUnavailableError, match=r"deeplab-cli\[crf\]"):
        refine(np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 2), 0.5, np.float32), backend="pydensecrf")
