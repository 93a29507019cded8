"""The batch package on the real model: inputs, output names, shards, overlapped run, interruption."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import IMAGES, VOC2012, voc_sample_ids
from PIL import Image

from deeplab_cli import batch as pipeline
from deeplab_cli.batch import outputs as batch_outputs
from deeplab_cli.errors import UsageError
from deeplab_cli.files import TMP_SUFFIX
from deeplab_cli.runtime import Segmenter

DM05 = "deeplabv3-mnv2-dm05-voc"


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter(DM05, device="cpu", sessions=2)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """photos/{a/x.jpg, b/x.jpg, b/x.png, b/deep/y.jpg, noext (a PNG), notes.txt, .hidden.jpg, bad.jpg}."""
    root = tmp_path / "photos"
    for folder in ("a", "b/deep"):
        (root / folder).mkdir(parents=True)
    ids = voc_sample_ids(3)
    shutil.copy(VOC2012 / "JPEGImages" / f"{ids[0]}.jpg", root / "a" / "x.jpg")
    shutil.copy(VOC2012 / "JPEGImages" / f"{ids[1]}.jpg", root / "b" / "x.jpg")
    Image.open(VOC2012 / "JPEGImages" / f"{ids[1]}.jpg").save(root / "b" / "x.png")
    os.symlink(VOC2012 / "JPEGImages" / f"{ids[2]}.jpg", root / "b" / "deep" / "y.jpg")
    Image.open(IMAGES / "dog_segmentation.bmp").save(root / "noext", format="PNG")
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden.jpg").write_bytes((root / "a" / "x.jpg").read_bytes())
    (root / "bad.jpg").write_text("text in a .jpg\n")
    return root


def rel(paths: list[str], root: Path) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


def test_folder_expansion_by_content_and_extension(tree: Path) -> None:
    items = pipeline.expand_inputs([str(tree)])
    assert rel([i.path for i in items], tree) == [
        "a/x.jpg",
        "b/deep/y.jpg",
        "b/x.jpg",
        "b/x.png",
        "bad.jpg",
        "noext",
    ]
    assert all(i.error is None for i in items)


def test_glob_stdin_dedup_and_missing(tree: Path) -> None:
    stdin = io.StringIO(f"{tree}/a/x.jpg\n\n{tree}/b/x.jpg\n{tree}/missing.jpg\n")
    items = pipeline.expand_inputs([str(tree / "**" / "*.jpg"), "-"], stdin=stdin)
    names = rel([i.path for i in items], tree)
    assert names == ["a/x.jpg", "b/deep/y.jpg", "b/x.jpg", "bad.jpg", "missing.jpg"]
    missing = items[-1]
    assert missing.error == f"{tree}/missing.jpg: no such file"
    nothing = pipeline.expand_inputs([str(tree / "*.gif")])
    assert nothing[0].error and "no files match" in nothing[0].error


def test_output_folder_inside_input_is_not_walked(tree: Path) -> None:
    out = tree / "masks"
    out.mkdir()
    Image.new("L", (4, 4)).save(out / "old.png")
    items = pipeline.expand_inputs([str(tree)], exclude=[out])
    assert not any("masks" in i.path for i in items)


def test_output_names_mirror_folders_without_collisions(tree: Path, tmp_path: Path) -> None:
    items = pipeline.expand_inputs([str(tree)])
    jobs = pipeline.plan_outputs(items, tmp_path / "out", ["mask", "overlay"])
    masks = {
        os.path.relpath(j.item.path, tree): os.path.relpath(j.outputs["mask"], tmp_path / "out") for j in jobs
    }
    assert masks == {
        "a/x.jpg": "a/x.png",
        "b/x.jpg": "b/x.jpg.png",  # b/x.jpg and b/x.png share a stem: both keep their extension
        "b/x.png": "b/x.png.png",
        "b/deep/y.jpg": "b/deep/y.png",
        "bad.jpg": "bad.png",
        "noext": "noext.png",
    }
    assert jobs[0].outputs["overlay"].name == "x.overlay.jpg"
    all_outputs = [p for j in jobs for p in j.outputs.values()]
    assert len(set(all_outputs)) == len(all_outputs)


def test_two_roots_stay_apart_and_outputs_never_overwrite_inputs(tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "a"
    other.mkdir(parents=True)
    shutil.copy(tree / "a" / "x.jpg", other / "x.jpg")
    items = pipeline.expand_inputs([str(tree / "a"), str(other)])
    jobs = pipeline.plan_outputs(items, tmp_path / "out", ["mask"])
    outs = sorted(os.path.relpath(j.outputs["mask"], tmp_path / "out") for j in jobs)
    assert outs == ["other/a/x.png", "photos/a/x.png"]
    # writing into the input folder: a PNG input must not be replaced by its own mask
    png_only = pipeline.expand_inputs([str(tree / "b" / "x.png")])
    (job,) = pipeline.plan_outputs(png_only, tree / "b", ["mask"])
    assert job.outputs["mask"] == tree / "b" / "x.png.png"


def test_shards_partition_the_inputs(tree: Path) -> None:
    items = pipeline.expand_inputs([str(tree)])
    for count in (1, 2, 3, 4, 7):
        parts = [pipeline.select_shard(items, (index, count)) for index in range(count)]
        flat = [item.path for part in parts for item in part]
        assert sorted(flat) == sorted(item.path for item in items)
        assert len(flat) == len(set(flat))
    assert pipeline.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(UsageError):
            pipeline.parse_shard(bad)


def run(segmenter: Segmenter, items: list, out: Path, **options) -> tuple[pipeline.Summary, list]:
    opts = pipeline.SegmentOptions(**options)
    jobs = pipeline.plan_outputs(items, out, opts.kinds)
    records: list[pipeline.Record] = []
    summary = pipeline.Scheduler(segmenter, opts, on_record=records.append).run(jobs)
    return summary, records


def test_run_writes_every_output_in_input_order(segmenter: Segmenter, tree: Path, tmp_path: Path) -> None:
    items = pipeline.expand_inputs([str(tree)])
    out = tmp_path / "out"
    summary, records = run(segmenter, items, out, overlay=True, scores="logits", batch_size=2, workers=2)
    assert (summary.ok, summary.failed, summary.skipped) == (5, 1, 0)
    assert [r.input for r in records] == [i.path for i in items]
    bad = next(r for r in records if r.status == "failed")
    assert bad.input.endswith("bad.jpg") and "not an image" in bad.error
    for record in records:
        if record.status != "ok":
            continue
        mask = Image.open(record.outputs["mask"])
        assert mask.mode == "P" and mask.size == (record.size["width"], record.size["height"])
        direct = segmenter.predict(record.input)
        assert (np.array(mask) == direct.labels).mean() >= 0.999
        logits = np.load(record.outputs["logits"])
        assert logits.dtype == np.float16 and list(logits.shape) == record.scores["shape"]
        overlay = Image.open(record.outputs["overlay"])
        assert overlay.format == "JPEG" and overlay.size == mask.size
        assert abs(sum(c["fraction"] for c in record.classes) - 1) < 1e-3
    assert not list(out.rglob("*" + TMP_SUFFIX))


def test_skip_existing_and_probs(segmenter: Segmenter, tmp_path: Path) -> None:
    items = [pipeline.InputItem(str(IMAGES / "dog_segmentation.bmp"), anchor=str(IMAGES))]
    out = tmp_path / "out"
    summary, records = run(segmenter, items, out, scores="probs")
    assert summary.ok == 1
    with np.load(records[0].outputs["probs"]) as data:
        probs = data["probs"]
    assert probs.dtype == np.float16 and probs.shape == (21, 128, 128)
    assert np.allclose(probs.astype(np.float32).sum(axis=0), 1.0, atol=2e-2)
    summary, records = run(segmenter, items, out, scores="probs", skip_existing=True)
    assert (summary.ok, summary.skipped) == (0, 1) and records[0].status == "skipped"


def test_interrupted_writer_leaves_no_partial_files(
    segmenter: Segmenter, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [i for i in pipeline.expand_inputs([str(tree)]) if not i.path.endswith("bad.jpg")]
    out = tmp_path / "out"
    original = batch_outputs.files.write_label_png
    calls = {"n": 0}

    def flaky(path, labels, palette, fsync=False):
        calls["n"] += 1
        if calls["n"] == 3:  # the third mask write dies half-way, like a killed process

            def half(handle):
                handle.write(b"\x89PNG half")
                raise KeyboardInterrupt

            return batch_outputs.files.atomic_write(path, half)
        return original(path, labels, palette, fsync=fsync)

    monkeypatch.setattr(batch_outputs.files, "write_label_png", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(segmenter, items, out, workers=1)
    monkeypatch.setattr(batch_outputs.files, "write_label_png", original)
    written = sorted(out.rglob("*.png"))
    assert 0 < len(written) < len(items)
    assert not list(out.rglob("*" + TMP_SUFFIX))
    for path in written:
        Image.open(path).load()  # every output present is complete
    summary, _ = run(segmenter, items, out, skip_existing=True)
    assert summary.skipped == len(written) and summary.ok == len(items) - len(written)
    assert len(sorted(out.rglob("*.png"))) == len(items)
