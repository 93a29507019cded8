"""CRF parameter files and the grid search, on a few real VOC images with 1-2 mean-field iterations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, VOC_ROOT

from deeplab_cli.crf.params import CRFParams, load_params, resolve
from deeplab_cli.errors import UsageError
from deeplab_cli.tuning import fine_grid, parse_grid
from deeplab_cli.zoo import get_model


def load_crf_params(path: Path) -> CRFParams:
    return resolve(CRFParams(), path)


MODEL = "deeplabv3-mnv2-voc"


def test_load_flat_and_tune_files(tmp_path: Path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"bi_w": 5, "bi_xy_std": 70, "bi_rgb_std": 4, "iterations": 3}))
    params = load_crf_params(flat)
    assert (params.bi_w, params.bi_xy_std, params.bi_rgb_std, params.iterations) == (5.0, 70.0, 4.0, 3)
    assert params.pos_w == 3.0  # defaults fill the rest
    nested = tmp_path / "tuned.json"
    nested.write_text(json.dumps({"model": MODEL, "crf": {"bi_w": 6, "unary_scale": 0.8}, "miou_crf": 0.7}))
    assert load_crf_params(nested).unary_scale == 0.8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"foo": 1}', "no CRF parameters"),
        ('{"bi_xy_std": -3}', "bi_xy_std"),
    ],
)
def test_bad_parameter_files(tmp_path: Path, text: str, message: str):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_crf_params(path)


def test_unknown_keys_in_a_parameter_file_are_rejected(tmp_path: Path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"bi_w": 5, "bi_colour": 3}))
    assert load_params(path) == {"bi_w": 5, "bi_colour": 3}
    with pytest.raises(UsageError, match="unknown CRF parameter.*bi_colour"):
        load_crf_params(path)


def test_parameter_precedence(tmp_path: Path):
    spec = get_model(MODEL)
    model_defaults = CRFParams.from_dict(spec.crf)
    assert resolve(model_defaults, None, {}).bi_xy_std == spec.crf["bi_xy_std"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"bi_xy_std": 50, "bi_w": 7}))
    params = resolve(model_defaults, path, {"bi_w": 2.5, "iterations": None})
    assert (params.bi_xy_std, params.bi_w, params.iterations) == (50.0, 2.5, spec.crf["iterations"])


def test_grids():
    assert parse_grid("bi_w=3,5; bi-xy-std=30") == {"bi_w": (3.0, 5.0), "bi_xy_std": (30.0,)}
    with pytest.raises(UsageError):
        parse_grid("colour=3")
    best = {"bi_w": 1.0, "bi_xy_std": 60.0, "bi_rgb_std": 3.0, "iterations": 2}
    fine = fine_grid(best, {"bi_w": 1.0, "bi_xy_std": 15.0, "bi_rgb_std": 1.0})
    assert len(fine) == 2 * 3 * 3  # bi_w 0 dropped (not positive)
    assert all(c["iterations"] == 2 for c in fine) and best in fine


@pytest.fixture(scope="module")
def segmenter():
    from deeplab_cli.runtime import Segmenter

    return Segmenter(MODEL, device="cpu")


@pytest.fixture(scope="module")
def dataset():
    from deeplab_cli.datasets import open_dataset

    return open_dataset("voc", VOC_ROOT, "sample").limit(2)


@pytest.fixture(scope="module")
def tuned(segmenter, dataset, tmp_path_factory: pytest.TempPathFactory):
    from deeplab_cli.tuning import tune

    cache = tmp_path_factory.mktemp("crfcache")
    result = tune(
        segmenter,
        dataset,
        iterations=2,
        coarse={"bi_w": (3.0, 6.0), "bi_xy_std": (30.0, 80.0), "bi_rgb_std": (4.0,)},
        fine_steps={},
        unary_scales=(1.0, 0.5),
        backend="torch",
        workers=2,
        cache_root=cache,
    )
    return result, cache


def test_tune_finds_the_best_candidate(tuned):
    result, _ = tuned
    assert result.images == 2
    assert len(result.candidates) == 4 + 1  # coarse grid, then one new unary scale
    assert {c.stage for c in result.candidates} == {"coarse", "unary"}
    assert result.best.miou == max(c.miou for c in result.candidates)
    assert result.best.params["pos_w"] == 3.0 and result.best.params["pos_xy_std"] == 3.0
    assert len({round(c.miou, 9) for c in result.candidates}) > 1  # parameters matter
    document = result.to_dict()
    assert document["crf_helps"] == (result.best.miou > result.baseline_miou)


def test_tune_scores_agree_with_eval(tuned, segmenter, dataset):
    from deeplab_cli.crf.runner import CRFRunner
    from deeplab_cli.evaluate import evaluate

    result, _ = tuned
    best = CRFParams.from_dict(result.best.params)
    with CRFRunner(best, backend="torch", workers=0) as runner:
        evaluated = evaluate(segmenter, dataset, crf=runner)
    assert result.baseline_miou == pytest.approx(evaluated.plain.matrix.miou(), abs=1e-12)
    # the search reads float16 log-probabilities from its cache: allow a few flipped pixels
    assert result.best.miou == pytest.approx(evaluated.crf.matrix.miou(), abs=2e-3)


def test_tune_reuses_its_probability_cache(tuned, segmenter, dataset):
    from deeplab_cli.tuning import tune

    result, cache = tuned
    files = sorted(cache.glob("*/*.npz"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    again = tune(
        segmenter,
        dataset,
        iterations=2,
        coarse={"bi_w": (3.0,), "bi_xy_std": (30.0,), "bi_rgb_std": (4.0,)},
        fine_steps={},
        unary_scales=(),
        backend="torch",
        workers=0,
        cache_root=cache,
    )
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert again.baseline_miou == result.baseline_miou
    first = next(c for c in result.candidates if c.params["bi_w"] == 3.0 and c.params["bi_xy_std"] == 30.0)
    assert again.best.miou == pytest.approx(first.miou, abs=1e-12)  # inline and 2 workers agree


def test_cli_tune_then_eval_with_the_file(tmp_path: Path):
    env = {**os.environ}
    output = tmp_path / "best.json"
    tune = [
        sys.executable,
        "-m",
        "deeplab_cli",
        "crf",
        "tune",
        "--split",
        "sample",
        "--data-root",
        str(VOC_ROOT),
    ]
    tune += [
        "--model",
        MODEL,
        "--n",
        "1",
        "--iterations",
        "1",
        "--grid",
        "bi_w=4;bi_xy_std=40,90;bi_rgb_std=3",
    ]
    tune += ["--no-fine", "--unary-scales", "1", "--workers", "1", "--output", str(output), "-q"]
    done = subprocess.run(tune, capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert "without CRF" in done.stdout and str(output) in done.stdout
    params = load_crf_params(output)
    saved = json.loads(output.read_text())
    assert saved["images"] == 1 and len(saved["candidates"]) == 2
    if not saved["crf_helps"]:
        assert "does not improve" in done.stdout
    run = [sys.executable, "-m", "deeplab_cli", "eval", "--split", "sample", "--data-root", str(VOC_ROOT)]
    run += ["--model", MODEL, "--limit", "1", "--crf", "--crf-params", str(output), "--crf-workers", "0"]
    run += ["--json", str(tmp_path / "eval.json")]
    done = subprocess.run(run, capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["crf_params"] == params.to_dict()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deeplab_cli", *args], capture_output=True, text=True, cwd=REPO
    )


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("bi_w=3;bi_xy_std=-30", "bi_xy_std must be > 0"),
        ("bi_w=3;colour=2", "bad grid axis"),
        ("bi_w=", "bad grid axis"),
        ("bi_w=3;bi_rgb_std=x", "bad grid values"),
    ],
)
def test_bad_grid_is_rejected_before_the_network(tmp_path: Path, grid: str, message: str):
    # the data root does not exist: a grid error that comes first proves nothing was read or run
    done = run_cli("crf", "tune", "--data-root", str(tmp_path / "none"), "--grid", grid)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_bad_unary_scale_is_rejected_before_the_network(tmp_path: Path):
    done = run_cli("crf", "tune", "--data-root", str(tmp_path / "none"), "--unary-scales", "1,0")
    assert done.returncode == 2 and "unary_scale must be > 0" in done.stderr, done.stderr


def test_unwritable_output_is_rejected_before_the_network(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = run_cli("crf", "tune", "--data-root", str(tmp_path / "none"), "-o", str(blocker / "best.json"))
    assert done.returncode == 2 and done.stderr.startswith(f"deeplab: error: cannot write {blocker}"), (
        done.stderr
    )


def test_best_parameters_are_printed_when_saving_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The disk fills up between the check and the save: the search's result still reaches the user."""
    import errno

    from click.testing import CliRunner

    from deeplab_cli import files
    from deeplab_cli.cli import cli

    def disk_full(path: object, data: object, fsync: bool = False) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_json", disk_full)
    output = tmp_path / "best.json"
    args = ["crf", "tune", "--split", "sample", "--data-root", str(VOC_ROOT), "--model", MODEL, "--n", "1"]
    args += [
        "--iterations",
        "1",
        "--grid",
        "bi_w=4;bi_xy_std=40;bi_rgb_std=3",
        "--no-fine",
        "--unary-scales",
        "1",
    ]
    args += ["--workers", "0", "--crf-backend", "torch", "-o", str(output), "-q"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "best CRF: bi_w=4, bi_xy_std=40, bi_rgb_std=3" in result.stdout
    assert f"cannot write {output}: No space left on device" in result.stderr
    assert not output.exists()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_tune_interrupted_exits_130_and_leaves_no_process(tmp_path: Path):
    import signal

    from test_eval import interrupt_after_work_starts

    output = tmp_path / "best.json"
    args = ["crf", "tune", "--split", "sample", "--data-root", str(VOC_ROOT), "--model", MODEL, "--n", "30"]
    args += ["--crf-backend", "torch", "--workers", "1", "-o", str(output), "-q"]
    code, stderr, elapsed, left = interrupt_after_work_starts(args, signal.SIGTERM, tmp_path)
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == "deeplab: interrupted" and "Traceback" not in stderr, stderr
    assert elapsed < 5, elapsed
    assert not left, left
    assert not output.exists()
