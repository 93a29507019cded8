"""The batch package with a fake segmenter (no ONNX model): scheduling, names, records, resume, CRF."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from fake_segmenter import FakeSegmenter, expected_labels, softmax
from PIL import Image

from deeplab_cli.batch import (
    MARKER,
    InputItem,
    Record,
    SegmentOptions,
    expand_inputs,
    plan_outputs,
    segment_files,
    write_outputs,
)
from deeplab_cli.batch.inputs import _glob_regex
from deeplab_cli.errors import UsageError
from deeplab_cli.files import TMP_SUFFIX

COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]


def picture(path: Path, seed: int, size: tuple[int, int] = (24, 32)) -> Path:
    """A small image of random colour blocks (so every class appears), saved by suffix."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 3, size=(size[0] // 4, size[1] // 4))
    rgb = np.array(COLOURS, dtype=np.uint8)[blocks].repeat(4, axis=0).repeat(4, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for index, name in enumerate(["a/1.png", "a/2.bmp", "b/3.png", "b/c/4.png", "5.png"]):
        picture(root / name, index, size=(24, 32) if index % 2 else (16, 20))
    return root


def run(inputs: list[str], out: Path | None, **options: object) -> tuple[list[Record], FakeSegmenter]:
    records: list[Record] = []
    fake = FakeSegmenter()
    segment_files(inputs, out, SegmentOptions(**options), fake, on_record=records.append)
    return records, fake


def test_records_in_input_order_and_masks_from_the_segmenter(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    records, fake = run([str(photos)], out, batch_size=2, workers=2)
    assert [os.path.relpath(r.input, photos) for r in records] == [
        "5.png",
        "a/1.png",
        "a/2.bmp",
        "b/3.png",
        "b/c/4.png",
    ]
    assert fake.ran == 5
    for record in records:
        assert record.status == "ok"
        mask = np.array(Image.open(record.outputs["mask"]))
        assert np.array_equal(mask, expected_labels(record.input))
        assert {c["name"] for c in record.classes} <= {"red", "green", "blue"}
    logged = [json.loads(line) for line in (out / MARKER).read_text().splitlines()]
    assert logged[0]["deeplab"] and sorted(entry["key"] for entry in logged[1:]) == [
        "5.png", "a/1.png", "a/2.png", "b/3.png", "b/c/4.png",
    ]  # fmt: skip


def test_resume_reports_the_earlier_records(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first, _ = run([str(photos)], out)
    (out / "b" / "3.png").unlink()
    again, fake = run([str(photos)], out, skip_existing=True)
    assert fake.ran == 1
    assert [r.status for r in again] == ["skipped", "skipped", "skipped", "ok", "skipped"]
    for before, after in zip(first, again, strict=True):
        assert after.classes == before.classes and after.size == before.size


def test_probabilities_are_streamed_into_the_npz(photos: Path, tmp_path: Path) -> None:
    image = photos / "a" / "1.png"
    records, _ = run([str(image)], tmp_path, scores="probs", mask=False)
    with np.load(records[0].outputs["probs"]) as data:
        probs = data["probs"]
    rgb = np.array(Image.open(image).convert("RGB"))
    expected = softmax(rgb.transpose(2, 0, 1).astype(np.float32) / 16)
    assert probs.dtype == np.float16 and probs.shape == (3, *rgb.shape[:2])
    assert np.allclose(probs, expected, atol=1e-3)
    assert records[0].scores["shape"] == [3, *rgb.shape[:2]]


class ReverseRefiner:
    """A CRF double: returns the classes in reverse order, and remembers the image it was given."""

    def __init__(self) -> None:
        self.images: list[tuple[int, int]] = []

    def refine(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        self.images.append(image.shape[:2])
        return probs[::-1].copy()


def test_crf_runs_through_finish(photos: Path, tmp_path: Path) -> None:
    image = photos / "a" / "1.png"
    refiner = ReverseRefiner()
    records: list[Record] = []
    segment_files(
        [str(image)], tmp_path, SegmentOptions(), FakeSegmenter(), crf=refiner, on_record=records.append
    )
    mask = np.array(Image.open(records[0].outputs["mask"]))
    assert np.array_equal(mask, 2 - expected_labels(str(image)))  # the refined scores decide
    assert refiner.images == [mask.shape]


def test_interrupt_reports_every_written_output(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[Record] = []

    def on_record(record: Record) -> None:
        seen.append(record)
        if len(seen) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_files(
            [str(photos)], out, SegmentOptions(workers=2), FakeSegmenter(delay=0.05), on_record=on_record
        )
    written = {str(p) for p in out.rglob("*.png")}
    assert len(written) >= 1
    assert {r.outputs["mask"] for r in seen} == written
    assert not list(out.rglob("*" + TMP_SUFFIX))


def test_write_error_is_a_failed_record_naming_the_output(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("a file where a folder should be\n")
    records, _ = run([str(photos / "a" / "1.png"), str(photos / "5.png")], out)
    failed = next(r for r in records if r.status == "failed")
    assert failed.error.startswith(f"cannot write {out / 'a' / '1.png'}:")
    assert [r.status for r in records].count("ok") == 1


def test_write_outputs_to_stdout_when_there_is_no_folder(photos: Path) -> None:
    image = photos / "5.png"
    stream = io.BytesIO()
    records, _ = run([str(image)], None, stdout_stream=stream)
    assert records[0].outputs == {"mask": "-"}
    assert np.array_equal(np.array(Image.open(io.BytesIO(stream.getvalue()))), expected_labels(str(image)))
    with pytest.raises(UsageError, match="exactly one input"):
        run([str(photos)], None, stdout_stream=io.BytesIO())


def test_write_outputs_alone(photos: Path, tmp_path: Path) -> None:
    """The ray and serve helpers call write_outputs with a job from plan_outputs."""
    image = str(photos / "b" / "3.png")
    fake = FakeSegmenter()
    (job,) = plan_outputs([InputItem(image, anchor=str(photos))], tmp_path, ["mask", "overlay", "logits"])
    prepared = fake.prepare(image)
    prediction = fake.finish(prepared, fake.run([prepared])[0])
    record = write_outputs(
        job, prepared.source, prediction, SegmentOptions(overlay=True, scores="logits"), fake.spec
    )
    assert record.status == "ok" and set(record.outputs) == {"mask", "overlay", "logits"}
    assert Image.open(record.outputs["overlay"]).size == Image.open(image).size
    assert np.load(record.outputs["logits"]).dtype == np.float16


def test_refused_when_every_name_is_an_input(tmp_path: Path) -> None:
    for name in ("a.png", "a.png.png"):
        picture(tmp_path / name, 0)
    jobs = plan_outputs(expand_inputs([str(tmp_path)]), tmp_path, ["mask"])
    by_name = {Path(job.item.path).name: job for job in jobs}
    assert by_name["a.png"].refusal and "would overwrite" in by_name["a.png"].refusal
    assert by_name["a.png.png"].outputs["mask"] == tmp_path / "a.png.png.png"


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("*.png", ["a.png"], ["b/a.png", "a.jpg"]),
        ("**/*.png", ["a.png", "b/a.png", "b/c/a.png"], ["a.jpg"]),
        ("b/**", ["b/a.png", "b/c/a.png"], ["a.png"]),
        ("[ab]?.jp*g", ["a1.jpg", "b2.jpeg"], ["c1.jpg", "a12.jpg"]),
        ("[!a]*.png", ["b.png"], ["a.png"]),
    ],
)
def test_glob_patterns(pattern: str, matches: list[str], misses: list[str]) -> None:
    regex = _glob_regex(pattern)
    assert all(regex.fullmatch(path) for path in matches)
    assert not any(regex.fullmatch(path) for path in misses)


@pytest.mark.parametrize("size", [1000, 1 << 20])  # the numpy form, then the compiled loop
def test_float16_conversion_is_the_cast_bit_for_bit(size: int) -> None:
    from deeplab_cli.batch._half import to_float16

    rng = np.random.default_rng(0)
    edges = [
        0.0,
        -0.0,
        2.0**-14,
        2.0**-25,
        3 * 2.0**-25,
        6.1e-5,
        65504.0,
        65519.0,
        65520.0,
        np.inf,
        -np.inf,
        np.nan,
    ]
    values = np.concatenate(
        [
            rng.random(size, dtype=np.float32) ** 12,  # mostly below float16's normal range
            rng.standard_normal(size).astype(np.float32) * 1e3,
            rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32).view(np.float32),  # any bits
            np.array(edges, np.float32),
        ]
    ).reshape(2, -1)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(np.float16)
    assert np.array_equal(to_float16(values).view(np.uint16), expected.view(np.uint16))
