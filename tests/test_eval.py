"""``deeplab eval`` on the real VOC sample with the real deeplabv3-mnv2-voc model.

The CLI's mIoU is checked against a separate plain computation from the label PNGs it saved
(--save-masks) and the ground truth; the trimap plot is opened and inspected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, VOC2012, VOC_ROOT, voc_sample_ids
from PIL import Image

MODEL = "deeplabv3-mnv2-voc"
N_PLAIN = 8
N_CRF = 3


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deeplab_cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "120"},
    )


def plain_miou(mask_dir: Path, ids: list[str]) -> tuple[float, dict[int, float]]:
    """mIoU over the classes present, from saved label PNGs and the VOC ground truth (255 ignored)."""
    counts: Counter = Counter()
    for image_id in ids:
        with Image.open(mask_dir / f"{image_id}.png") as saved:
            assert saved.mode == "P"
            pred = np.asarray(saved)
        gt = np.asarray(Image.open(VOC2012 / "SegmentationClass" / f"{image_id}.png"))
        keep = gt != 255
        counts.update(zip(gt[keep].tolist(), pred[keep].tolist(), strict=True))
    iou = {}
    for c in range(21):
        tp = counts[(c, c)]
        fn = sum(v for (g, _), v in counts.items() if g == c) - tp
        fp = sum(v for (_, p), v in counts.items() if p == c) - tp
        if tp + fn + fp:
            iou[c] = tp / (tp + fn + fp)
    return sum(iou.values()) / len(iou), iou


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    args = ["eval", "--dataset", "voc", "--split", "sample", "--data-root", str(VOC_ROOT), "--model", MODEL]
    args += ["--limit", str(N_PLAIN), "--json", str(out / "r.json"), "--plot", str(out / "trimap.png")]
    done = run_cli(*args, "--save-masks", str(out / "masks"), "--no-crf")
    assert done.returncode == 0, done.stderr
    return {"out": out, "stdout": done.stdout, "json": json.loads((out / "r.json").read_text())}


@pytest.fixture(scope="module")
def crf_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval_crf")
    args = [
        "eval",
        "--split",
        "sample",
        "--data-root",
        str(VOC_ROOT),
        "--model",
        MODEL,
        "--limit",
        str(N_CRF),
    ]
    args += [
        "--crf",
        "--crf-iterations",
        "5",
        "--json",
        str(out / "r.json"),
        "--plot",
        str(out / "trimap.png"),
    ]
    done = run_cli(*args, "--save-masks", str(out / "masks"))
    assert done.returncode == 0, done.stderr
    return {"out": out, "stdout": done.stdout, "json": json.loads((out / "r.json").read_text())}


def test_cli_miou_equals_plain_computation_from_saved_masks(plain_run: dict):
    result = plain_run["json"]
    ids = voc_sample_ids(N_PLAIN)
    assert result["images"] == N_PLAIN and result["model"] == MODEL and result["crf"] is None
    assert sorted(p.stem for p in (plain_run["out"] / "masks").glob("*.png")) == sorted(ids)
    miou, per_class = plain_miou(plain_run["out"] / "masks", ids)
    assert result["no_crf"]["miou"] == pytest.approx(miou, abs=1e-12)
    names = result["class_names"]
    for c, name in enumerate(names):
        expected = per_class.get(c)
        got = result["no_crf"]["per_class_iou"][name]
        assert (got is None) if expected is None else got == pytest.approx(expected, abs=1e-12)
    assert set(result["no_crf"]["absent_classes"]) == {names[c] for c in range(21) if c not in per_class}
    # the real model on (training) images it has seen: a sane, high score
    assert 0.6 < miou <= 1.0
    assert f"{100 * miou:.2f}" in plain_run["stdout"] and "mean IoU" in plain_run["stdout"]


def test_trimap_curves_rise_with_band_width(plain_run: dict):
    trimap = plain_run["json"]["no_crf"]["trimap"]
    assert trimap["widths"] == list(range(1, 41))
    pixels = trimap["pixels"]
    assert all(a <= b for a, b in zip(pixels, pixels[1:], strict=False)) and pixels[0] > 0
    acc = trimap["pixel_accuracy"]
    # errors concentrate at object boundaries: accuracy in the narrowest band is the lowest
    assert acc[0] < acc[-1] <= 1.0


def test_plot_is_a_real_png(plain_run: dict, crf_run: dict):
    for run in (plain_run, crf_run):
        with Image.open(run["out"] / "trimap.png") as image:
            assert image.format == "PNG" and image.size == (1000, 400)
            rgb = np.asarray(image.convert("RGB"))
        colours = np.unique(rgb.reshape(-1, 3), axis=0)
        assert len(colours) > 20 and rgb.std() > 10
        blue = np.all(np.abs(rgb.astype(int) - (31, 119, 180)) < 30, axis=2).sum()  # "no CRF" line
        red = np.all(np.abs(rgb.astype(int) - (214, 39, 40)) < 30, axis=2).sum()  # "CRF" line
        assert blue > 200
        assert (red > 200) == (run is crf_run)


def test_crf_run_scores_both_from_saved_masks(crf_run: dict):
    result = crf_run["json"]
    ids = voc_sample_ids(N_CRF)
    assert result["crf_params"]["iterations"] == 5 and result["crf_params"]["bi_xy_std"] > 0
    plain, _ = plain_miou(crf_run["out"] / "masks", ids)
    refined, _ = plain_miou(crf_run["out"] / "masks" / "crf", ids)
    assert result["no_crf"]["miou"] == pytest.approx(plain, abs=1e-12)
    assert result["crf"]["miou"] == pytest.approx(refined, abs=1e-12)
    assert refined != plain  # the CRF changed the labels
    assert "IoU % CRF" in crf_run["stdout"]


def test_missing_ids_are_an_error_or_skipped(tmp_path: Path):
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{voc_sample_ids(1)[0]}\n2099_000001\n")
    base = ["eval", "--split", "sample", "--data-root", str(VOC_ROOT), "--model", MODEL, "--ids", str(ids)]
    failed = run_cli(*base)
    assert failed.returncode == 1 and "2099_000001" in failed.stderr and "deeplab: error:" in failed.stderr
    done = run_cli(*base, "--allow-missing", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["images"] == 1 and result["missing"] == ["2099_000001"]
    assert "skipped 1 ids" in done.stdout


def test_bad_scales_are_a_usage_error():
    done = run_cli("eval", "--split", "sample", "--data-root", str(VOC_ROOT), "--scales", "1,-2")
    assert done.returncode == 2 and "--scales" in done.stderr


# -- library: multi-scale and flip --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter():
    from deeplab_cli.runtime import Segmenter

    return Segmenter(MODEL, device="cpu")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.open(VOC2012 / "JPEGImages" / f"{voc_sample_ids(1)[0]}.jpg").convert("RGB"))


def test_single_scale_matches_the_runtime(segmenter, image):
    from deeplab_cli.geometry import labels_of

    ours = labels_of(segmenter.scores(image)[0])
    runtime = segmenter.predict(image).labels
    assert (ours == runtime).mean() > 0.9999


def test_flip_average_is_mirror_symmetric(segmenter, image):
    mirrored = np.ascontiguousarray(image[:, ::-1])
    a = segmenter.scores(image, flip=True)[0]
    b = segmenter.scores(mirrored, flip=True)[0]
    np.testing.assert_allclose(a, b[:, :, ::-1], rtol=1e-5, atol=1e-4)
    plain = segmenter.scores(image)[0]
    assert not np.allclose(a, plain)  # the mirrored run contributed


def test_multiscale_max_fusion_and_alignment(segmenter, image):
    from deeplab_cli.geometry import labels_of

    half = segmenter.scores(image, scales=(0.5,))[0]
    full = segmenter.scores(image, scales=(1.0,))[0]
    fused = segmenter.scores(image, scales=(0.5, 1.0))[0]
    assert half.shape == full.shape == (21, *image.shape[:2])
    np.testing.assert_allclose(fused, np.maximum(half, full), rtol=1e-6, atol=1e-5)
    # half-scale scores land on the right pixels: labels agree with full scale nearly everywhere
    assert (labels_of(half) == labels_of(full)).mean() > 0.85


# -- bad inputs, unwritable outputs, missing backends, signals (issue 10) -----------------------------------

BLOCK_PYDENSECRF = """
import sys


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pydensecrf":
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, _Blocker())
"""


def without_pydensecrf(tmp_path: Path) -> dict[str, str]:
    """An environment whose interpreters cannot import pydensecrf (a sitecustomize blocks it)."""
    folder = tmp_path / "block"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCK_PYDENSECRF)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


def test_missing_pydensecrf_is_one_line_before_any_work(tmp_path: Path):
    env = without_pydensecrf(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    nowhere = str(tmp_path / "no-data")
    commands = [
        ["eval", "--data-root", nowhere, "--crf", "--crf-backend", "pydensecrf"],
        ["eval", "--data-root", nowhere, "--crf", "--crf-backend", "pydensecrf", "--crf-workers", "0"],
        ["crf", "tune", "--data-root", nowhere, "--crf-backend", "pydensecrf"],
        ["crf", "tune", "--data-root", nowhere, "--crf-backend", "pydensecrf", "--workers", "0"],
        ["segment", str(broken), "-o", str(tmp_path / "out"), "--crf", "--crf-backend", "pydensecrf"],
    ]
    for args in commands:
        done = subprocess.run(
            [sys.executable, "-m", "deeplab_cli", *args], capture_output=True, text=True, cwd=REPO, env=env
        )
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and 'pip install "deeplab-cli[crf]"' in lines[0], (args, done.stderr)
        assert "no PASCAL VOC" not in done.stderr and "broken.jpg" not in done.stderr  # nothing was read


def test_crf_options_without_crf_are_a_usage_error():
    done = run_cli("eval", "--split", "sample", "--data-root", str(VOC_ROOT), "--crf-iterations", "3")
    assert done.returncode == 2
    assert done.stderr.strip() == "deeplab: error: --crf-iterations given without --crf (add --crf to refine)"


def test_unwritable_outputs_fail_before_the_network(tmp_path: Path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for option in ("--json", "--plot"):
        target = a_file / "r.out"  # a path under a regular file can never be written
        done = run_cli(
            "eval", "--split", "sample", "--data-root", str(VOC_ROOT), "--model", MODEL, option, str(target)
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"deeplab: error: cannot write {target}") and done.stdout == ""
    masks = str(a_file / "m")
    done = run_cli("eval", "--split", "sample", "--data-root", str(VOC_ROOT), "--save-masks", masks)
    assert done.returncode == 2 and done.stderr.startswith("deeplab: error: cannot write"), done.stderr
    done = run_cli("eval", "--split", "sample", "--data-root", str(VOC_ROOT), "--json", str(tmp_path))
    assert done.returncode == 2 and "is a directory" in done.stderr


def test_unknown_split_is_a_usage_error():
    done = run_cli("eval", "--split", "vall", "--data-root", str(VOC_ROOT), "--model", MODEL)
    assert done.returncode == 2
    assert "VOC split 'vall' not found" in done.stderr and "Traceback" not in done.stderr


def _voc_copy(root: Path, image_id: str, label_change: int | None) -> Path:
    """A one-image VOC tree (real image and ground truth), optionally with an out-of-range label."""
    base = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "JPEGImages" / f"{image_id}.jpg").write_bytes(
        (VOC2012 / "JPEGImages" / f"{image_id}.jpg").read_bytes()
    )
    with Image.open(VOC2012 / "SegmentationClass" / f"{image_id}.png") as gt:
        palette = gt.getpalette()
        labels = np.array(gt)
    if label_change is not None:
        labels[:4, :4] = label_change
    out = Image.fromarray(labels, mode="P")
    out.putpalette(palette)
    out.save(base / "SegmentationClass" / f"{image_id}.png")
    (base / "ImageSets" / "Segmentation" / "one.txt").write_text(image_id + "\n")
    return root


def test_ground_truth_outside_the_class_range_is_one_line(tmp_path: Path):
    root = _voc_copy(tmp_path / "voc", voc_sample_ids(1)[0], label_change=30)
    done = run_cli("eval", "--split", "one", "--data-root", str(root), "--model", MODEL)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"deeplab: error: {voc_sample_ids(1)[0]}: ground truth has label(s) 30 outside the class range 0..20 "
        "(and not the ignore value 255)"
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), zombies excluded."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def interrupt_after_work_starts(
    args: list[str], sig: int, tmp_path: Path
) -> tuple[int, str, float, set[int]]:
    """Start ``deeplab ARGS``; once its CRF workers run and it has worked a while, send ``sig``.

    Returns the exit status, stderr, the seconds from the signal to the exit, and the processes it had
    started that are still alive a moment after it exited.
    """
    import time

    err = tmp_path / f"stderr-{sig}.txt"
    with err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "deeplab_cli", *args], stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO
        )
        try:
            deadline = time.monotonic() + 120
            children: set[int] = set()
            while time.monotonic() < deadline and process.poll() is None:
                children = _descendants(process.pid)
                if len(children) >= 2:  # the resource tracker and at least one CRF worker
                    break
                time.sleep(0.1)
            assert process.poll() is None, err.read_text()
            time.sleep(3)  # network and CRF at work
            children = _descendants(process.pid)
            start = time.monotonic()
            process.send_signal(sig)
            code = process.wait(timeout=30)
            elapsed = time.monotonic() - start
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    time.sleep(1)
    left = {pid for pid in children if _alive(pid)}
    return code, err.read_text(), elapsed, left


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_eval_crf_interrupted_exits_130_and_leaves_no_process(tmp_path: Path, signame: str):
    import signal as _signal

    out = tmp_path / "r.json"
    args = ["eval", "--split", "sample", "--data-root", str(VOC_ROOT), "--model", MODEL, "--crf"]
    args += ["--crf-backend", "torch", "--crf-workers", "1", "--limit", "40", "--json", str(out), "-q"]
    code, stderr, elapsed, left = interrupt_after_work_starts(args, getattr(_signal, signame), tmp_path)
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == "deeplab: interrupted" and "Traceback" not in stderr, stderr
    assert elapsed < 5, elapsed
    assert not left, left
    assert not out.exists() and not list(tmp_path.glob(".*r.json*"))  # nothing half-written


# -- eval's CRF wiring with a fake segmenter (no ONNX model) ------------------------------------------------


class TruthSegmenter:
    """The Segmenter interface eval uses, scoring from the ground truth plus a fixed smooth disturbance:
    its labels are right on most pixels and wrong in blobs, so the CRF has something to change."""

    def __init__(self, dataset) -> None:
        from dataclasses import dataclass, field

        from deeplab_cli.evaluate import read_rgb
        from deeplab_cli.zoo import get_model

        @dataclass(frozen=True)
        class Spec:
            name: str = "truth-plus-noise"
            num_classes: int = 21
            class_names: tuple[str, ...] = tuple(get_model(MODEL).class_names)
            palette: str = "voc"
            crf: dict = field(default_factory=dict)

        self.spec = Spec()
        self.labels = {read_rgb(s.image_path).tobytes(): dataset.load_label(s) for s in dataset.samples}

    def describe_protocol(self) -> str:
        return "native size (fake)"

    def scores(self, image: np.ndarray, scales=(1.0,), flip: bool = False) -> tuple[np.ndarray, dict]:
        from scipy import ndimage

        label = self.labels[image.tobytes()]
        rng = np.random.default_rng(label.shape[0])
        noise = ndimage.gaussian_filter(rng.normal(size=(21, *label.shape)), (0, 12, 12)).astype(np.float32)
        logits = noise / noise.std()
        truth = np.where(label == 255, 0, label).astype(np.int64)[None]
        np.put_along_axis(logits, truth, np.take_along_axis(logits, truth, 0) + 3.0, 0)
        return logits, {"infer": 0.0, "upsample": 0.0}


def test_eval_refines_the_same_probabilities_it_scores():
    from deeplab_cli.crf import CRFParams, refine
    from deeplab_cli.crf.runner import CRFRunner
    from deeplab_cli.datasets import open_dataset
    from deeplab_cli.evaluate import evaluate, read_rgb
    from deeplab_cli.geometry import labels_of, softmax
    from deeplab_cli.metrics import ConfusionMatrix

    dataset = open_dataset("voc", VOC_ROOT, "sample").limit(2)
    fake = TruthSegmenter(dataset)
    params = CRFParams(iterations=3)
    with CRFRunner(params, backend="torch") as runner:
        result = evaluate(fake, dataset, crf=runner)
    plain, refined = ConfusionMatrix(21), ConfusionMatrix(21)
    for sample in dataset.samples:
        rgb, label = read_rgb(sample.image_path), dataset.load_label(sample)
        logits, _ = fake.scores(rgb)
        plain.update(label, labels_of(logits))
        refined.update(label, labels_of(refine(rgb, softmax(logits), params, backend="torch")))
    np.testing.assert_array_equal(result.plain.matrix.matrix, plain.matrix)
    np.testing.assert_array_equal(result.crf.matrix.matrix, refined.matrix)
    assert not np.array_equal(plain.matrix, refined.matrix)  # the CRF changed labels: the check has teeth
    assert 0.3 < plain.pixel_accuracy() < 0.99, plain.pixel_accuracy()  # right mostly, wrong in blobs
    document = result.to_dict()
    assert document["protocol"] == {"text": "native size (fake)"}
    assert document["crf_params"] == params.to_dict() and document["crf_backend"] == "torch, inline"


def test_segment_takes_the_crf_unary_scale(tmp_path: Path):
    """``crf tune`` writes unary_scale: segment accepts it (one declaration of the CRF options)."""
    image = VOC2012 / "JPEGImages" / f"{voc_sample_ids(1)[0]}.jpg"
    base = ["segment", str(image), "--model", MODEL, "--crf", "--crf-iterations", "2", "--crf-workers", "0"]
    masks = []
    for scale in ("1", "0.05"):
        done = run_cli(*base, "--crf-unary-scale", scale, "-o", str(tmp_path / scale))
        assert done.returncode == 0, done.stderr
        masks.append(np.array(Image.open(tmp_path / scale / f"{image.stem}.png")))
    assert (
        masks[0] != masks[1]
    ).mean() > 0.001  # a flat unary lets the pairwise terms win: it reached the CRF
    done = run_cli(*base, "--crf-unary-scale", "0", "-o", str(tmp_path / "zero"))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(
        "unary_scale must be > 0, got 0.0"
    )
