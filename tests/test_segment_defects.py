"""Issue 10's ``deeplab segment`` defects, one case each, on real files and the real CLI.

Each case failed before the fix it names. Cases needing ``cli.main`` (exit codes, warnings, broken pipes,
signals) run ``python -m deeplab_cli`` as a subprocess; the others use click's runner in-process.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGES, VOC2012, voc_sample_ids
from PIL import Image
from segment_helpers import DM05, command, invoke, run_process

from deeplab_cli.files import TMP_SUFFIX

DOG = IMAGES / "dog_segmentation.bmp"  # 128 x 128: fast on the small model


def segment(*args: object) -> list[object]:
    return ["segment", *args, "--model", DM05]


def photo(path: Path, fmt: str | None = None) -> Path:
    """A copy of the dog image at ``path`` (PNG, JPEG... by suffix, or ``fmt``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(DOG).convert("RGB").save(path, format=fmt or Image.registered_extensions()[path.suffix])
    return path


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def json_lines(data: bytes | str) -> list[dict]:
    text = data.decode("utf-8") if isinstance(data, bytes) else data  # strict: must be valid UTF-8
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------- 1. never write over an input


def case_fallback_name_is_an_input(tmp_path: Path) -> None:
    """``a.png`` + ``a.png.png`` with ``-o DIR``: a.png's fallback output would be the photo a.png.png."""
    folder = tmp_path / "dir"
    photo(folder / "a.png")
    second = photo(folder / "a.png.png", "PNG")
    before = second.read_bytes()
    result = invoke(segment(folder, "-o", folder))
    assert second.read_bytes() == before  # the photo is intact
    assert result.code == 1
    (line,) = [x for x in result.stderr.splitlines() if "refused" in x]
    assert str(folder / "a.png") in line and "a.png.png" in line


def case_rerun_into_the_input_folder_does_not_snowball(tmp_path: Path) -> None:
    folder = tmp_path / "same"
    photo(folder / "x.jpg")
    photo(folder / "y.png")
    for _ in range(3):
        result = invoke(segment(folder, "-o", folder))
        assert result.code == 0, result.stderr
    assert listing(folder) == [".deeplab-output", "x.jpg", "x.png", "y.png", "y.png.png"]
    again = invoke(segment(folder, "-o", folder, "--skip-existing", "--json"))
    assert [r["status"] for r in json_lines(again.stdout)] == ["skipped", "skipped"]
    assert "skipped 2 entries: output of an earlier deeplab run" in again.stderr


def case_old_output_folder_inside_the_input_is_not_segmented(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photo(photos / "x.jpg")
    assert invoke(segment(photos, "-o", photos / "masks", "--overlay")).code == 0
    result = invoke(segment(photos, "-o", tmp_path / "elsewhere", "--json"))
    assert [Path(r["input"]).name for r in json_lines(result.stdout)] == ["x.jpg"]
    assert "output of an earlier deeplab run" in result.stderr


def case_existing_foreign_file_is_never_replaced(tmp_path: Path) -> None:
    """OUT/x.png exists and is the user's picture (no deeplab tag): x.jpg's mask goes to x.jpg.png."""
    source = photo(tmp_path / "in" / "x.jpg")
    theirs = photo(tmp_path / "out" / "x.png")
    before = theirs.read_bytes()
    result = invoke(segment(source, "-o", tmp_path / "out", "--json"))
    assert result.code == 0 and theirs.read_bytes() == before
    assert json_lines(result.stdout)[0]["outputs"]["mask"] == str(tmp_path / "out" / "x.jpg.png")


# ------------------------------------------------------------------- 5. CRF backend checked up front


def case_missing_crf_backend_is_one_usage_line_before_any_image(tmp_path: Path) -> None:
    hidden = tmp_path / "hide" / "pydensecrf"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('pydensecrf hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'hide'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = command(segment(DOG, "-o", tmp_path / "out", "--crf", "--crf-backend", "pydensecrf"))
    result = subprocess.run(args, capture_output=True, env=env, timeout=120)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    (line,) = stderr.splitlines()
    assert line.startswith("deeplab: error:") and "pip install" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- 6. symlink loops


def case_glob_with_symlink_loops_finishes(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    photo(loop / "a.png")
    os.symlink("..", loop / "up")
    os.symlink(".", loop / "here")
    result = invoke(segment(f"{loop}/**/*.png", "-o", tmp_path / "out", "--json"))
    assert result.code == 0, result.stderr
    assert [r["input"] for r in json_lines(result.stdout)] == [str(loop / "a.png")]
    assert "symlink loop" in result.stderr


def case_folder_walk_follows_a_linked_folder_once_and_says_what_it_skipped(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photo(photos / "a.png")
    photo(tmp_path / "linked" / "b.png")
    os.symlink(tmp_path / "linked", photos / "more")
    os.symlink(photos, photos / "more" / "back")  # a loop through the linked folder
    result = invoke(segment(photos, "-o", tmp_path / "out", "--json"))
    assert sorted(Path(r["input"]).name for r in json_lines(result.stdout)) == ["a.png", "b.png"]
    assert "symlink loop" in result.stderr and str(photos / "more" / "back") in result.stderr


# ------------------------------------------------------------------- 7. write errors, broken pipes


def case_write_error_names_the_output(tmp_path: Path) -> None:
    """A file-size limit makes the mask write fail (like a full disk): the message names the output."""
    source = photo(tmp_path / "x.bmp", "BMP")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))  # the folder marker fits, a mask not

    out = tmp_path / "out"
    result = subprocess.run(command(segment(source, "-o", out)), capture_output=True, preexec_fn=limit)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert f"cannot write {out / 'x.png'}: File too large" in stderr
    assert "Traceback" not in stderr and not list(out.glob("*" + TMP_SUFFIX))


def case_json_into_head_exits_quietly(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    for index in range(8):
        photo(folder / f"{index}.png")
    line = " ".join(f"'{part}'" for part in command(segment(folder, "-o", tmp_path / "out", "--json", "-q")))
    result = subprocess.run(
        ["bash", "-c", f"{line} | head -1; echo status=${{PIPESTATUS[0]}} >&2"], capture_output=True
    )
    stderr = result.stderr.decode()
    assert len(json_lines(result.stdout)) == 1
    assert stderr.strip() in ("status=0", "status=141"), stderr


# ------------------------------------------------------------------- 8. interrupted runs keep records


def case_resumed_run_reports_what_the_earlier_run_knew(tmp_path: Path) -> None:
    source = tmp_path / "in"
    photo(source / "a.png")
    photo(source / "b.jpg")
    out = tmp_path / "out"
    first = json_lines(invoke(segment(source, "-o", out, "--json")).stdout)
    again = json_lines(invoke(segment(source, "-o", out, "--json", "--skip-existing")).stdout)
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    for before, after in zip(first, again, strict=True):
        assert after["classes"] == before["classes"] and after["size"] == before["size"]
        assert after["outputs"] == before["outputs"]


def case_readme_resume_pattern(tmp_path: Path) -> None:
    """The README's pattern: rerunning after an interrupt gives a complete results file."""
    photos = tmp_path / "my photos"
    for name in ("a.jpg", "b c.jpg", "d.jpg"):
        photo(photos / name, "JPEG")
    deeplab = " ".join(f"'{part}'" for part in command([]))
    pattern = (
        f"cd '{tmp_path}' && find 'my photos' -name '*.jpg' -print0 | "
        f"{deeplab} segment - -0 -o masks/ --model {DM05} --json --skip-existing > results.jsonl"
    )
    assert subprocess.run(["bash", "-c", pattern], capture_output=True).returncode == 0
    (tmp_path / "masks" / "d.png").unlink()  # as if the first run had been interrupted before d.jpg
    result = subprocess.run(["bash", "-c", pattern], capture_output=True)
    assert result.returncode == 0, result.stderr
    records = json_lines((tmp_path / "results.jsonl").read_bytes())
    assert sorted(Path(r["input"]).name for r in records) == ["a.jpg", "b c.jpg", "d.jpg"]
    assert sorted(r["status"] for r in records) == ["ok", "skipped", "skipped"]
    assert all(r["classes"] and r["size"] == {"width": 128, "height": 128} for r in records)


# ------------------------------------------------------------------- 9. smaller ones


def case_output_names_of_250_bytes(tmp_path: Path) -> None:
    source = photo(tmp_path / ("x" * 246 + ".jpg"), "JPEG")
    result = invoke(segment(source, "-o", tmp_path / "out"))
    assert result.code == 0, result.stderr
    assert (tmp_path / "out" / ("x" * 246 + ".png")).is_file()


def case_fifo_in_a_folder_is_skipped_not_opened(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    photo(folder / "a.png")
    os.mkfifo(folder / "pipe.jpg")
    result = run_process(segment(folder, "-o", tmp_path / "out", "--json"), timeout=60)
    assert result.code == 0, result.stderr
    assert [Path(r["input"]).name for r in json_lines(result.stdout)] == ["a.png"]
    assert f"skipped {folder / 'pipe.jpg'}: not a regular file (FIFO)" in result.stderr


def case_stdin_lists_keep_spaces_and_accept_nul(tmp_path: Path) -> None:
    spaced = photo(tmp_path / " lead and trail .png", "PNG")
    newline = photo(tmp_path / "two\nlines.png", "PNG")
    result = invoke(segment("-", "-o", tmp_path / "out", "--json"), stdin=f"{spaced}\n".encode())
    assert result.code == 0, result.stderr
    assert [r["input"] for r in json_lines(result.stdout)] == [str(spaced)]
    listed = f"{spaced}\0{newline}\0".encode()
    result = invoke(segment("-", "-0", "-o", tmp_path / "out", "--json"), stdin=listed)
    assert result.code == 0, result.stderr
    assert sorted(r["input"] for r in json_lines(result.stdout)) == sorted([str(spaced), str(newline)])


def case_non_utf8_names_give_valid_json(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    photo(Path(os.fsdecode(raw)), "PNG")
    result = run_process(segment(tmp_path, "-o", tmp_path / "out", "--json", "-q"))
    assert result.code == 0, result.stderr
    (record,) = json_lines(result.stdout)  # raises on invalid UTF-8 or lone surrogates
    assert record["input"].endswith("caf\ufffd.png")
    assert record["input_bytes"].endswith("caf\\xe9.png")
    assert os.path.exists(os.fsencode(tmp_path) + b"/out/caf\xe9.png")


def case_pillow_warnings_stay_off_stderr(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    tiff = data.find(b"Exif\x00\x00") + 6
    data[tiff + 8 : tiff + 10] = b"\x00\x50" if data[tiff : tiff + 2] == b"MM" else b"\x50\x00"
    bad = tmp_path / "bad-exif.jpg"
    bad.write_bytes(bytes(data))  # Pillow warns "Corrupt EXIF data" while reading it
    result = run_process(segment(bad, "-o", tmp_path / "out", "-q"))
    assert result.code == 0 and result.stderr == ""


def case_help_texts(tmp_path: Path) -> None:
    assert "130" in invoke(["segment", "-h"]).text
    top = invoke(["--help"]).text
    assert "crf" in top and "refine" not in top


# ------------------------------------------------------------------- 10. signals


def left_in_group(group: int, wait: float) -> list[str]:
    """The processes still in process group ``group`` after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        ps = subprocess.run(["ps", "-eo", "pgid=,pid=,args="], capture_output=True, text=True).stdout
        left = [line.strip() for line in ps.splitlines() if line.split(None, 1)[0] == str(group)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def run_and_signal(tmp_path: Path, sig: signal.Signals, extra: list[str]) -> None:
    source = tmp_path / "in"
    source.mkdir()
    for image_id in voc_sample_ids(8):
        shutil.copy(VOC2012 / "JPEGImages" / f"{image_id}.jpg", source / f"{image_id}.jpg")
    out = tmp_path / "out"
    args = command(segment(source, "-o", out, "--json", "-q", "--workers", "1", *extra))
    # bufsize=0: readline() must not read ahead into a buffer that communicate() (raw fd reads) never sees
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, bufsize=0
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()  # one image is done
    sent = time.monotonic()
    process.send_signal(sig)
    rest, stderr = process.communicate(timeout=60)
    elapsed = time.monotonic() - sent
    assert process.returncode == 130, stderr.decode()
    assert elapsed < 3, f"took {elapsed:.1f} s to stop"
    assert stderr.decode().strip() == "deeplab: interrupted"
    assert left_in_group(process.pid, wait=2.0) == []  # no worker left behind
    reported = {r["outputs"]["mask"] for r in json_lines(first + rest)}
    assert reported == {str(p) for p in out.glob("*.png")}  # every output written is reported
    assert not list(out.glob("*" + TMP_SUFFIX))
    for path in reported:
        Image.open(path).load()


def case_sigint_stops_cleanly(tmp_path: Path) -> None:
    run_and_signal(tmp_path, signal.SIGINT, [])


def case_sigterm_with_crf_stops_cleanly(tmp_path: Path) -> None:
    run_and_signal(tmp_path, signal.SIGTERM, ["--crf", "--crf-iterations", "3"])


CASES: dict[str, Callable[[Path], None]] = {
    name.removeprefix("case_"): function for name, function in globals().items() if name.startswith("case_")
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_defect(name: str, tmp_path: Path) -> None:
    CASES[name](tmp_path)


def test_expected_mask_matches_the_model(tmp_path: Path) -> None:
    """The images above are real: the dog is found, so the cases test real outputs."""
    result = invoke(segment(DOG, "-o", tmp_path))
    assert result.code == 0
    assert (np.array(Image.open(tmp_path / "dog_segmentation.png")) == 12).mean() > 0.2
