"""The weight cache and its commands: mirror, offline errors, import by checksum or architecture, export."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import IMAGES, WEIGHTS_MIRROR
from PIL import Image

from deeplab_cli import weights, zoo
from deeplab_cli.errors import WeightsError
from deeplab_cli.zoo import get_model

SMALL = "deeplabv3-mnv2-dm05-voc"  # the smallest float model: cheapest to convert
SMALL_FILE = WEIGHTS_MIRROR / SMALL / "deeplabv3_257_mv_gpu.tflite"


def run_cli(
    *args: str, home: Path, mirror: str = "", stdin: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``deeplab`` in a subprocess with its own cache, offline."""
    env = {
        "DEEPLAB_HOME": str(home),
        "DEEPLAB_MIRROR": mirror,
        "DEEPLAB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [sys.executable, "-m", "deeplab_cli", *args], capture_output=True, text=True, env=env, input=stdin
    )


def session_home() -> Path:
    """The test session's shared cache (conftest), where converted models are reused."""
    return Path(os.environ["DEEPLAB_HOME"])


def models_json(home: Path) -> dict[str, dict]:
    result = run_cli("models", "--json", home=home)
    assert result.returncode == 0, result.stderr
    return {record["name"]: record for record in map(json.loads, result.stdout.splitlines())}


def test_offline_without_file_says_where_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPLAB_HOME", str(tmp_path))
    monkeypatch.setenv("DEEPLAB_MIRROR", "")
    spec = get_model(SMALL)
    with pytest.raises(
        WeightsError, match="deeplabv3_257_mv_gpu.tflite.*download.tensorflow.org.*weights import"
    ):
        weights.source_path(spec)


def test_mirror_file_with_wrong_checksum_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror" / "sub"
    mirror.mkdir(parents=True)
    (mirror / SMALL_FILE.name).write_bytes(b"not the model")
    monkeypatch.setenv("DEEPLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DEEPLAB_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(WeightsError, match="not in the cache or a mirror"):
        weights.source_path(get_model(SMALL))


def test_fetch_from_mirror_converts_once_and_marks_ready(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert models_json(home)[SMALL]["ready"] is False
    result = run_cli("weights", "fetch", SMALL, "--mirror", str(WEIGHTS_MIRROR), "-q", home=home)
    assert result.returncode == 0, result.stderr
    onnx_file = home / "models" / f"{SMALL}.onnx"
    assert result.stdout.strip() == f"{SMALL}: {onnx_file}"
    assert models_json(home)[SMALL]["ready"] is True
    metadata = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    assert json.loads(metadata["deeplab.spec"])["name"] == SMALL
    stamp = onnx_file.stat().st_mtime_ns
    again = run_cli("weights", "fetch", SMALL, "--mirror", str(WEIGHTS_MIRROR), "-q", home=home)
    assert again.returncode == 0 and onnx_file.stat().st_mtime_ns == stamp  # no second conversion


def test_import_identifies_a_renamed_file_by_sha256(tmp_path: Path) -> None:
    renamed = tmp_path / "downloaded.bin"
    shutil.copyfile(SMALL_FILE, renamed)
    home = tmp_path / "home"
    result = run_cli("weights", "import", str(renamed), home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{SMALL}: ")
    assert (home / "sources" / SMALL_FILE.name).read_bytes() == SMALL_FILE.read_bytes()
    assert models_json(home)[SMALL]["ready"] is True


def test_import_of_unknown_file_asks_for_arch(tmp_path: Path) -> None:
    stranger = tmp_path / "finetuned.tflite"
    stranger.write_bytes(b"\x00" * 1000)
    result = run_cli("weights", "import", str(stranger), home=tmp_path / "home")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("deeplab: error: finetuned.tflite")
    assert "--arch and --name" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_import_with_wrong_arch_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli(
        "weights",
        "import",
        str(SMALL_FILE),
        "--arch",
        "deeplabv3plus-mnv2-ade20k",
        "--name",
        "x",
        "-q",
        home=tmp_path / "home",
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("deeplab: error:") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "models" / "x.onnx").exists()


def test_import_with_arch_makes_a_user_model(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    names = ["bg"] + [f"thing{i}" for i in range(1, 21)]
    classes.write_text("\n".join(names) + "\n")
    home = tmp_path / "home"
    result = run_cli(
        "weights",
        "import",
        str(SMALL_FILE),
        "--arch",
        SMALL,
        "--name",
        "my-model",
        "--classes",
        str(classes),
        home=home,
    )
    assert result.returncode == 0, result.stderr
    record = models_json(home)["my-model"]
    assert record["user"] is True and record["ready"] is True and record["num_classes"] == 21
    session = ort.InferenceSession(str(home / "models" / "my-model.onnx"), providers=["CPUExecutionProvider"])
    spec = json.loads(session.get_modelmeta().custom_metadata_map["deeplab.spec"])
    assert spec["class_names"] == names


def test_unknown_model_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("weights", "fetch", "no-such-model", home=tmp_path)
    assert result.returncode == 2
    assert "unknown model 'no-such-model'" in result.stderr


def _labels(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    return session.run(["logits"], {"image": batch})[0].argmax(axis=1)


def test_export_has_dynamic_batch_height_width(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    result = run_cli("export", SMALL, "-o", str(out), home=session_home(), mirror=str(WEIGHTS_MIRROR))
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "image"
    image = np.asarray(Image.open(IMAGES / "dog_segmentation.bmp").convert("RGB"), dtype=np.float32)
    one = image.transpose(2, 0, 1)[None, :, :121, :121]
    for height, width in ((121, 121), (57, 97)):
        batch = np.concatenate([one[:, :, :height, :width], one[:, :, :height, :width][..., ::-1]]).copy()
        logits = session.run(["logits"], {"image": batch})[0]
        stride = get_model(SMALL).output_stride
        assert logits.shape == (2, 21, (height - 1) // stride + 1, (width - 1) // stride + 1)
        single = session.run(["logits"], {"image": batch[1:]})[0]
        np.testing.assert_allclose(logits[1:], single, atol=1e-4)


def test_export_fp16_agrees_with_float32(tmp_path: Path) -> None:
    home, mirror = session_home(), str(WEIGHTS_MIRROR)
    assert run_cli("export", SMALL, "-o", str(tmp_path / "a.onnx"), home=home, mirror=mirror).returncode == 0
    result = run_cli("export", SMALL, "-o", str(tmp_path / "b.onnx"), "--fp16", home=home, mirror=mirror)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "b.onnx").stat().st_size < 0.7 * (tmp_path / "a.onnx").stat().st_size
    image = np.asarray(Image.open(IMAGES / "bird_segmentation.bmp").convert("RGB"), dtype=np.float32)
    batch = image.transpose(2, 0, 1)[None].copy()
    full = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    half = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    assert np.mean(_labels(full, batch) == _labels(half, batch)) >= 0.99


# --------------------------------------------------------------- every released file, into a fresh cache

RELEASED = sorted(WEIGHTS_MIRROR.glob("*/*.tflite"))
DOG = IMAGES / "dog_segmentation.bmp"


@pytest.fixture(scope="module")
def released_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A fresh cache into which every released file under ../shared/weights was imported in ONE command."""
    home = tmp_path_factory.mktemp("released") / "home"
    return home, run_cli("weights", "import", *map(str, RELEASED), home=home)


def registry_name_of(path: Path) -> str:
    return next(s.name for s in zoo.registry_models() if s.source and s.source.file == path.name)


def test_every_released_file_imports_offline_in_one_command(released_home) -> None:
    home, result = released_home
    assert len(RELEASED) == 6
    assert result.returncode == 0, result.stderr
    names = [registry_name_of(path) for path in RELEASED]
    assert sorted(result.stdout.splitlines()) == sorted(
        f"{n}: {home / 'models' / f'{n}.onnx'}" for n in names
    )
    for name in names:  # the first use says what it does and how long it took (issue 9 item 3)
        assert f"deeplab: converting {name} to ONNX (once; about " in result.stderr
    assert result.stderr.count("deeplab: done in ") == len(names)
    ready = models_json(home)
    assert all(ready[name]["ready"] for name in names)
    # the default model's file is a TFLite flatbuffer that is also a zip (labels.txt appended)
    assert zipfile.is_zipfile(
        WEIGHTS_MIRROR / "deeplabv3-mnv2-voc" / "lite-model_mobilenetv2-coco_dr_1.tflite"
    )


def test_importing_again_converts_nothing_and_a_folder_is_reported(released_home) -> None:
    home, _ = released_home
    stamps = {p: p.stat().st_mtime_ns for p in (home / "models").glob("*.onnx")}
    folder = WEIGHTS_MIRROR / "deeplabv3-mnv2-voc"
    result = run_cli("weights", "import", str(folder), *map(str, RELEASED), home=home)
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == len(RELEASED) and "converting" not in result.stderr
    assert result.stderr.splitlines()[0] == (
        f"deeplab: error: {folder} is a folder; give the files in it (e.g. {folder / '*.tflite'})"
    )
    assert {p: p.stat().st_mtime_ns for p in (home / "models").glob("*.onnx")} == stamps


def test_export_never_overwrites_an_existing_file(released_home, tmp_path: Path) -> None:
    home, _ = released_home
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"the user's own file")
    result = run_cli("export", SMALL, "-o", str(mine), home=home)
    assert result.returncode == 2
    assert result.stderr.strip() == f"deeplab: error: {mine} exists; pass --force to replace it"
    assert mine.read_bytes() == b"the user's own file"
    forced = run_cli("export", SMALL, "-o", str(mine), "--force", home=home)
    assert forced.returncode == 0, forced.stderr
    assert onnx.load(str(mine)).graph.output[0].name == "logits"


@pytest.mark.parametrize("model", [registry_name_of(path) for path in RELEASED])
def test_each_imported_model_segments_offline(released_home, tmp_path: Path, model: str) -> None:
    home, _ = released_home
    result = run_cli("segment", str(DOG), "-o", str(tmp_path), "--model", model, home=home)
    assert result.returncode == 0, result.stderr
    assert "converting" not in result.stderr  # the import converted it already
    mask = np.asarray(Image.open(tmp_path / "dog_segmentation.png"))
    assert mask.shape == (128, 128) and mask.max() < get_model(model).num_classes


def test_fetch_all_offline_tries_every_model_and_reports_each_failure(released_home) -> None:
    home, _ = released_home
    result = run_cli("weights", "fetch", "--all", "-q", home=home)
    assert result.returncode == 1
    assert sorted(line.split(":")[0] for line in result.stdout.splitlines()) == sorted(
        registry_name_of(path) for path in RELEASED
    )
    caffe = [s.name for s in zoo.registry_models() if s.source and s.source.format == "caffe"]
    errors = result.stderr.strip().splitlines()
    assert [line.split(":")[2].strip() for line in errors[:-1]] == caffe
    assert all("downloads are off" in line for line in errors[:-1])
    assert errors[
        -1
    ] == f"deeplab: error: {len(caffe)} of {len(RELEASED) + len(caffe)} models failed: " + ", ".join(caffe)


def test_truncated_or_corrupt_cached_onnx_is_repaired(
    released_home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10.9: a damaged cached model was used (or reported ready) as is, and fetch changed nothing."""
    home = tmp_path / "home"
    shutil.copytree(released_home[0], home)
    onnx_file = home / "models" / f"{SMALL}.onnx"
    good = onnx_file.read_bytes()
    onnx_file.write_bytes(good[: len(good) // 2])  # truncated: caught by the size check at every use
    assert models_json(home)[SMALL]["ready"] is False
    path = run_cli("weights", "path", SMALL, home=home)
    assert path.returncode == 1 and "not converted yet" in path.stderr and "weights fetch" in path.stderr
    segment = run_cli("segment", str(DOG), "-o", str(tmp_path / "a"), "--model", SMALL, home=home)
    assert segment.returncode == 0, segment.stderr
    assert f"converting {SMALL}" in segment.stderr and onnx_file.stat().st_size == len(good)
    # same size, broken header: only the sha256 that fetch checks sees it; loading names the remedy
    onnx_file.write_bytes(b"\xff" * 64 + onnx_file.read_bytes()[64:])
    broken = run_cli("segment", str(DOG), "-o", str(tmp_path / "b"), "--model", SMALL, home=home)
    assert broken.returncode == 1
    assert f"run: deeplab weights fetch {SMALL}" in broken.stderr and len(broken.stderr.splitlines()) <= 2
    fetch = run_cli("weights", "fetch", SMALL, "-q", home=home)
    assert fetch.returncode == 0, fetch.stderr
    assert fetch.stdout.strip() == f"{SMALL}: {onnx_file} (repaired)"
    assert onnx.load(str(onnx_file)).graph.input[0].name == "image"
    again = run_cli("weights", "fetch", SMALL, "-q", home=home)
    assert again.stdout.strip() == f"{SMALL}: {onnx_file}"  # verified, nothing to do
    monkeypatch.setenv("DEEPLAB_HOME", str(home))
    assert weights.is_ready(get_model(SMALL)) and not weights._is_stale(get_model(SMALL))
    record_file = home / "models" / f"{SMALL}.onnx.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "converter": weights.CONVERTER_VERSION - 1}))
    assert not weights.is_ready(get_model(SMALL)) and weights._is_stale(get_model(SMALL))  # fetch: "updated"


# --------------------------------------------------------------- cache defects (issue 10 item 9)


def test_failed_import_leaves_nothing_in_the_cache_and_the_rest_go_on(released_home, tmp_path: Path) -> None:
    """A file that fails to convert was copied into the cache first (hundreds of MB for Caffe files)."""
    bad = tmp_path / "train2_iter_20000.caffemodel"  # the trainval DeepLab v2 file's name, corrupt content
    bad.write_bytes(np.random.default_rng(0).bytes(50_000))
    home = released_home[0]
    before = sorted(p.name for p in (home / "sources").iterdir())
    renamed = tmp_path / "downloaded.bin"  # identified by its sha256 whatever its name
    shutil.copyfile(SMALL_FILE, renamed)
    result = run_cli("weights", "import", str(bad), str(renamed), "-q", home=home)
    assert result.returncode == 1
    assert result.stdout.strip() == f"{SMALL}: {home / 'models' / f'{SMALL}.onnx'}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("deeplab: error: corrupt .caffemodel train2_iter_20000.caffemodel")
    assert "(importing it as deeplab-v2-resnet101-trainval)" in lines[0]
    assert lines[1] == f"deeplab: error: 1 of 2 files failed to import: {bad}"
    assert sorted(p.name for p in (home / "sources").iterdir()) == before
    assert not (home / "models" / "deeplab-v2-resnet101-trainval.onnx").exists()


def test_failed_user_import_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run_cli(
        "weights", "import", str(SMALL_FILE), "--arch", "deeplabv3plus-mnv2-ade20k", "--name", "x", home=home
    )
    assert result.returncode == 1, result.stderr
    leftovers = [p for p in home.rglob("*") if p.is_file() and p.parent.name != "locks"]
    assert leftovers == []


def test_weights_path_of_a_model_not_converted_says_so(tmp_path: Path) -> None:
    result = run_cli("weights", "path", SMALL, home=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    where = tmp_path / "models" / f"{SMALL}.onnx"
    assert result.stderr.strip() == (
        f"deeplab: error: model '{SMALL}' is not converted yet (it will be {where}); "
        f"run: deeplab weights fetch {SMALL}"
    )
    assert run_cli("weights", "path", home=tmp_path).stdout.strip() == str(tmp_path)


def test_corrupt_and_missing_onnx_model_files_are_both_usage_errors(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07" + b"\xff" * 300)
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(foreign))
    expected = {
        tmp_path / "missing.onnx": "model file not found",
        corrupt: "is not a valid ONNX file (truncated or corrupt)",
        foreign: "has no 'deeplab.spec' metadata",
    }
    for model, message in expected.items():
        result = run_cli(
            "segment", str(DOG), "-o", str(tmp_path / "out"), "--model", str(model), home=tmp_path
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("deeplab: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "dog_segmentation.png").exists()


def test_unwritable_cache_folder_is_one_line_naming_deeplab_home(tmp_path: Path) -> None:
    """A cache that cannot be written (here /sys, where nobody may create folders) gave a raw errno."""
    home = Path("/sys/deeplab-cache-test")
    if home.exists() or not Path("/sys").is_dir():
        pytest.skip("needs a folder in which nothing can be created")
    for args in (
        ("weights", "import", str(SMALL_FILE)),
        ("segment", str(DOG), "-o", str(tmp_path), "--model", SMALL),
    ):
        result = run_cli(*args, home=home)
        assert result.returncode == 1, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"deeplab: error: cannot write to the weight cache {home} (")
        assert "DEEPLAB_HOME" in line and "Errno" not in line


def test_zoo_reads_user_rows_itself_and_picks_dataset_defaults(tmp_path: Path, monkeypatch) -> None:
    """zoo imports nothing from the cache (issue 11): user rows are plain records in paths.models_dir()."""
    monkeypatch.setenv("DEEPLAB_HOME", str(tmp_path))
    row = dataclasses.replace(get_model(SMALL), name="mine", user=True, default=False)
    zoo.user_record_path("mine").parent.mkdir(parents=True)
    zoo.user_record_path("mine").write_text(row.to_json())
    (tmp_path / "models" / "mine.onnx.json").write_text("{}")  # a conversion record, not a row
    assert [s.name for s in zoo.user_models()] == ["mine"] and get_model("mine") == row
    assert zoo.default_model_for("voc") == "deeplabv3-mnv2-voc"
    assert zoo.default_model_for("ade20k") == "deeplabv3plus-mnv2-ade20k"
    assert zoo.default_model_for("cityscapes") == "deeplabv3plus-mnv3-cityscapes"
    zoo.user_record_path("mine").write_text("{not json")
    with pytest.raises(WeightsError, match="corrupt model record .*mine.json"):
        zoo.list_models()


def test_models_table_lists_the_trainval_v2_row_with_its_crf_score(tmp_path: Path) -> None:
    result = run_cli("models", home=tmp_path)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "deeplab-v2-resnet101-trainval" in line)
    assert "79.70 with CRF (VOC 2012 test)" in row
