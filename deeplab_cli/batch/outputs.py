"""Output names, the output folder's marker and records log, and :func:`write_outputs` (one image's files).

Naming (:func:`plan_outputs`): the input's path relative to the common folder of all inputs (a folder
argument counts as itself, a file as its parent folder) is mirrored under OUT, with the image extension
replaced: ``photos/a/x.jpg -> OUT/a/x.png``. When two inputs in one folder share a stem (``x.jpg``,
``x.png``), or an output would land on an input, those inputs keep their extension: ``x.jpg.png``. An
output never replaces an input of the run nor an existing file deeplab did not write: when every name
is taken that way, the input is refused (one line naming both), never written. Per input: ``<name>.png``
(label mask), ``<name>.overlay.jpg``, ``<name>.logits.npy``, ``<name>.probs.npz``.

The output folder holds :data:`~deeplab_cli.batch.marks.MARKER`: a JSON-lines log, one record per input
written (appended after its files are in place; shards sharing OUT append whole lines). A resumed run with
``--skip-existing`` reports a skipped input with what the earlier run recorded (size, classes, scores).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from deeplab_cli import files
from deeplab_cli.batch import marks
from deeplab_cli.batch._half import to_float16
from deeplab_cli.batch.inputs import InputItem
from deeplab_cli.batch.options import SegmentOptions
from deeplab_cli.batch.records import Record
from deeplab_cli.errors import OutputError, UsageError

if TYPE_CHECKING:
    from deeplab_cli.runtime import Prediction
    from deeplab_cli.zoo import ModelSpec

PROB_BAND_ROWS = 64  # rows of C x rows x W float32 probabilities held at once when writing .probs.npz
_LOG_HEADER = {"deeplab": "segment output folder", "format": 1}


@dataclass
class Job:
    """One input with its planned outputs (kind -> path), or why it was refused."""

    index: int
    item: InputItem
    outputs: dict[str, Path] = field(default_factory=dict)
    root: Path | None = None  # the output folder (its records log); None when writing to stdout
    refusal: str | None = None

    @property
    def error(self) -> str | None:
        return self.item.error or self.refusal


# ------------------------------------------------------------------------------------------- naming


def plan_outputs(items: list[InputItem], out_dir: Path, kinds: list[str]) -> list[Job]:
    """Output paths for every input, mirroring the input folders under ``out_dir`` without collisions.

    Planned over the full (unsharded) input list, so every shard of a job array agrees on the names.
    """
    valid = [item for item in items if item.error is None]
    anchors = [os.path.abspath(item.anchor) for item in valid]
    base = os.path.commonpath(anchors) if anchors else os.path.abspath(".")
    relative = {item.abspath: os.path.relpath(item.abspath, base) for item in valid}
    stems: dict[tuple[str, str], int] = {}
    for rel in relative.values():
        key = (os.path.dirname(rel), os.path.splitext(os.path.basename(rel))[0])
        stems[key] = stems.get(key, 0) + 1
    taken = {os.path.realpath(path) for path in relative}  # inputs, then every output claimed
    jobs = []
    for index, item in enumerate(items):
        job = Job(index=index, item=item, root=out_dir)
        if item.error is None:
            folder, name = os.path.split(relative[item.abspath])
            stem = os.path.splitext(name)[0]
            candidates = [name] if stems[(folder, stem)] > 1 else [stem, name]
            job.outputs, job.refusal = _first_free(out_dir / folder, candidates, kinds, taken, item.path)
        jobs.append(job)
    return jobs


def _first_free(
    folder: Path, stems: list[str], kinds: list[str], taken: set[str], source: str
) -> tuple[dict[str, Path], str | None]:
    """The first candidate whose every output is free (claiming it), else a refusal naming the clash."""
    clash = ""
    for stem in stems:
        outputs = {kind: folder / f"{stem}{marks.OUTPUT_SUFFIXES[kind]}" for kind in kinds}
        real = {kind: os.path.realpath(path) for kind, path in outputs.items()}
        blocked = [outputs[kind] for kind in kinds if real[kind] in taken or _foreign(outputs[kind], kind)]
        if not blocked:
            taken.update(real.values())
            return outputs, None
        clash = str(blocked[0])
    reason = f"{source}: refused: its output {clash} would overwrite an input or a file deeplab did not write"
    return {}, reason + " (choose another -o)"


def _foreign(path: Path, kind: str) -> bool:
    """Whether ``path`` exists and is not ours (a mask without our tag; our other suffixes are ours)."""
    if not os.path.lexists(path):
        return False
    if kind != "mask":
        return not path.is_file()
    return not marks.has_mask_tag(str(path))


def check_output_dir(out_dir: Path) -> None:
    """Create ``out_dir``, fail early (usage error) when it cannot be written, and mark it as ours."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        files.probe_folder(out_dir)
        records_log(out_dir).create()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"cannot write to output folder {out_dir}: {reason}") from None


# ------------------------------------------------------------------------------------------- records log


class RecordsLog:
    """The JSON-lines log in an output folder: what each written input's record was (see module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / marks.MARKER
        self._lock = threading.Lock()
        self._known: dict[str, dict[str, Any]] | None = None

    def create(self) -> None:
        if not self.path.exists():
            self._append(_LOG_HEADER)

    def key(self, job: Job) -> str | None:
        if not job.outputs:
            return None
        first = next(iter(job.outputs.values()))
        return os.path.relpath(first, self.root)

    def append(self, job: Job, record: Record) -> None:
        key = self.key(job)
        if key is not None:
            self._append({"key": key, **record.to_dict()})

    def known(self, job: Job) -> dict[str, Any] | None:
        """The last record logged for ``job``'s outputs, if any (read once per run)."""
        with self._lock:
            if self._known is None:
                self._known = self._load()
        key = self.key(job)
        return self._known.get(key) if key is not None else None

    def _load(self) -> dict[str, dict[str, Any]]:
        known: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(OSError), open(self.path, "rb") as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    data = json.loads(line)
                    if isinstance(data, dict) and "key" in data:
                        known[str(data["key"])] = data
        return known

    def _append(self, data: dict[str, Any]) -> None:
        line = (json.dumps(data, ensure_ascii=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line)  # one write per line: shards appending at once never interleave lines
            finally:
                os.close(fd)


@functools.lru_cache(maxsize=64)
def records_log(root: Path) -> RecordsLog:
    """The one log object per output folder in this process (its lock serialises the writer threads)."""
    return RecordsLog(root)


def skipped_record(job: Job) -> Record:
    """The record for an input whose outputs all exist: what the earlier run logged, status skipped."""
    known = records_log(job.root).known(job) if job.root is not None else None
    record = Record.from_dict(known) if known else Record(input=job.item.path)
    record.input, record.status, record.timings, record.error = job.item.path, "skipped", {}, None
    record.outputs = {kind: str(path) for kind, path in job.outputs.items()}
    return record


# ------------------------------------------------------------------------------------------- writing

_STDOUT_LOCK = threading.Lock()


def write_outputs(
    job: Job,
    rgb: np.ndarray | None,
    prediction: Prediction,
    options: SegmentOptions,
    spec: ModelSpec | None = None,
) -> Record:
    """Write one image's outputs (each atomically) and log them; the record says what was written.

    ``rgb``: the full-size image (needed for ``overlay``). ``spec``: the model's palette and class names
    (None: the VOC palette and class ids as names). A write that fails gives a ``failed`` record naming
    the output path (and listing any output already written); it never raises for an I/O error.
    """
    start = time.perf_counter()
    palette = spec.palette if spec is not None else "voc"
    class_names = spec.class_names if spec is not None else None
    written: dict[str, str] = {}
    error = None
    for kind, target in job.outputs.items():
        try:
            _write_one(kind, target, rgb, prediction, palette, class_names, options)
        except OSError as exc:
            error = f"cannot write {target}: {exc.strerror or exc}"
            break
        written[kind] = str(target)
    if not job.outputs and options.stdout_stream is not None:
        data = files.encode_label_png(prediction.labels, palette)
        with _STDOUT_LOCK:
            options.stdout_stream.write(data)
            options.stdout_stream.flush()
        written["mask"] = "-"
    timings = dict(prediction.timings, write=time.perf_counter() - start)
    height, width = prediction.image_size
    record = Record(
        input=job.item.path,
        status="failed" if error else "ok",
        outputs=written,
        size={"width": width, "height": height},
        classes=prediction.class_fractions(class_names),
        timings=timings,
        scores=_scores_info(prediction, options, spec),
        error=error,
    )
    if error is None and job.root is not None and job.outputs:
        with contextlib.suppress(OSError):  # the log is a convenience for resuming; outputs are written
            records_log(job.root).append(job, record)
    return record


def _write_one(
    kind: str,
    target: Path,
    rgb: np.ndarray | None,
    prediction: Prediction,
    palette: str | np.ndarray | None,
    class_names: tuple[str, ...] | None,
    options: SegmentOptions,
) -> None:
    fsync = options.fsync
    if kind == "mask":
        files.write_label_png(target, prediction.labels, palette, fsync=fsync)
    elif kind == "overlay":
        if rgb is None:
            raise OutputError(f"cannot write {target}: the image is needed for an overlay")
        from deeplab_cli.palette import overlay

        background = 0 if class_names and class_names[0] == "background" else None
        picture = overlay(rgb, prediction.labels, palette or "voc", options.overlay_alpha, background)
        files.write_image(target, picture, fsync=fsync)
    elif kind == "logits":
        files.write_npy(target, to_float16(prediction.logits), fsync=fsync)
    elif kind == "probs":
        write_probs_npz(target, prediction, fsync=fsync)


def _scores_info(prediction: Prediction, options: SegmentOptions, spec: ModelSpec | None) -> dict | None:
    if not options.scores:
        return None
    height, width = prediction.image_size
    if options.scores == "logits":
        shape = list(prediction.logits.shape)
    else:
        shape = [int(prediction.logits.shape[0]), height, width]
    return {
        "kind": options.scores,
        "shape": shape,
        "input_size": list(prediction.input_size),
        "padded_size": list(prediction.padded_size),
        "crop_box": list(prediction.crop_box),
        "output_stride": spec.output_stride if spec is not None else None,
    }


# ------------------------------------------------------------------------------------------- probabilities


def prob_bands(prediction: Prediction, rows: int = PROB_BAND_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(top, C x rows x W float32) bands of the full-size probabilities, from the runtime's band
    iterator when it has one (then C x H x W never exists at once), else slices of ``probs``."""
    bands = getattr(prediction, "iter_prob_bands", None)
    if bands is not None:
        yield from bands(rows)
        return
    if prediction.probs is None:
        raise OutputError("probabilities were not computed for this prediction")
    for top in range(0, prediction.probs.shape[1], rows):
        yield top, prediction.probs[:, top : top + rows]


def write_probs_npz(target: Path, prediction: Prediction, fsync: bool = False) -> Path:
    """``.probs.npz`` with one member ``probs`` (C x H x W float16), readable by ``np.load``, streamed:
    the bands go channel by channel into a scratch file (disk, not memory), then into the zip member."""
    channels = int(prediction.logits.shape[0])
    height, width = prediction.image_size
    plane = height * width * 2

    def write(handle: IO[bytes]) -> None:
        with tempfile.TemporaryFile(dir=target.parent) as scratch:
            for top, band in prob_bands(prediction):
                half = to_float16(band)
                for channel in range(channels):
                    scratch.seek(channel * plane + top * width * 2)
                    scratch.write(np.ascontiguousarray(half[channel]).tobytes())
            scratch.seek(0)
            header = {"descr": "<f2", "fortran_order": False, "shape": (channels, height, width)}
            with (
                zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
                archive.open("probs.npy", "w", force_zip64=True) as member,
            ):
                np.lib.format.write_array_header_2_0(member, header)
                while chunk := scratch.read(16 * 2**20):
                    member.write(chunk)

    return files.atomic_write(target, write, fsync=fsync)
