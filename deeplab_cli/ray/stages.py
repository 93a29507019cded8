"""The Ray Data stages: decode (CPU tasks), inference (an actor pool), finish = upsample + CRF + write;
with CPU inference, all three in one actor (:class:`Segment`).

Rows carry one pickled payload (``blob``) next to their input position (``index``): the job, then the
decoded image, the prepared input and its logits, and at the end the :class:`Record`. A row that failed
carries its record from the stage that failed onwards, so one bad file never stops the dataset.

The per-image work is the local engine's own (``Segmenter.prepare/run/finish`` and the batch scheduler's
finish-and-write step), so both engines write byte-identical files. Each actor loads the ONNX model
once; the model's bytes travel through Ray's object store, so worker nodes need no weight cache.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from deeplab_cli.batch import Record, Scheduler, SegmentOptions
from deeplab_cli.batch.scheduler import Decoded
from deeplab_cli.crf import CRFParams
from deeplab_cli.errors import DeeplabError
from deeplab_cli.files import read_image
from deeplab_cli.runtime import Prepared, Segmenter
from deeplab_cli.zoo import ModelSpec


@dataclass(frozen=True)
class ModelShipment:
    """An ONNX model as the actors receive it: its spec, digest and a reference to its bytes."""

    spec: ModelSpec
    digest: str
    data: list  # [ObjectRef]: wrapped so Ray hands the reference, not the bytes, to the constructor
    max_size: int | None
    batch_size: int
    protocol: Any  # the driver's effective resize protocol (the model's, or a --resize override)

    @classmethod
    def from_segmenter(cls, segmenter: Any) -> ModelShipment:
        import ray

        data = Path(segmenter.onnx_path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        settings = (segmenter.max_size, segmenter.batch_size, segmenter.protocol)
        return cls(segmenter.spec, digest, [ray.put(data)], *settings)

    def load(self, device: str, threads: int | None) -> Segmenter:
        """A Segmenter on this node, from a node-local copy of the model written once per digest."""
        path = self._local_path()
        segmenter = Segmenter(
            path, device=device, batch_size=self.batch_size, max_size=self.max_size, threads=threads
        )
        # the driver's spec (registry row) and protocol, not those derived from the file's metadata
        segmenter.spec, segmenter.protocol = self.spec, self.protocol
        return segmenter

    def _local_path(self) -> Path:
        import ray

        folder = Path(tempfile.gettempdir()) / "deeplab-ray-models"
        path = folder / f"{self.spec.name}-{self.digest}.onnx"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=folder, suffix=".part")
            with os.fdopen(handle, "wb") as stream:
                stream.write(ray.get(self.data[0]))
            os.replace(temporary, path)
        return path


def failure(path: str, exc: BaseException) -> Record:
    """The record of an input that could not be read or prepared (the local engine's wording)."""
    message = str(exc) if isinstance(exc, DeeplabError) else f"{path}: {type(exc).__name__}: {exc}"
    return Record(input=path, status="failed", error=message)


def pack(index: int, **payload: Any) -> dict[str, Any]:
    return {"index": index, "blob": pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)}


def unpack(row: dict[str, Any]) -> dict[str, Any]:
    return pickle.loads(row["blob"])


def rows_of(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    return [{"index": int(i), "blob": b} for i, b in zip(batch["index"], batch["blob"], strict=True)]


def as_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    blobs = np.empty(len(rows), dtype=object)
    blobs[:] = [row["blob"] for row in rows]
    return {"index": np.array([row["index"] for row in rows], dtype=np.int64), "blob": blobs}


def records_batch(rows: list[dict[str, Any]], records: list[Record]) -> dict[str, np.ndarray]:
    """The last stage's output: each row's record, under its input position."""
    return as_batch([pack(row["index"], record=record) for row, record in zip(rows, records, strict=True)])


# ------------------------------------------------------------------------------------------- stage 1: decode


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Read and decode one input file (a CPU task)."""
    payload = unpack(row)
    decode(payload)
    return pack(row["index"], **payload)


def decode(payload: dict[str, Any]) -> None:
    """Add the decoded image (``rgb``) to a job's payload, or its failure ``record``."""
    path = payload["job"].item.path
    start = time.perf_counter()
    try:
        payload["rgb"] = read_image(path)
    except Exception as exc:  # one unreadable input must not stop the dataset
        payload["record"] = failure(path, exc)
        return
    payload["decode"] = time.perf_counter() - start


# ------------------------------------------------------------------------------------------- stage 2: infer


class Infer:
    """Inference actor: one ONNX Runtime session, created once; batches of same-padded-size images."""

    def __init__(self, model: ModelShipment, device: str, threads: int | None) -> None:
        self.segmenter = model.load(device, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = rows_of(batch)
        payloads = [unpack(row) for row in rows]
        self.infer(payloads)
        return as_batch([pack(row["index"], **payload) for row, payload in zip(rows, payloads, strict=True)])

    def infer(self, payloads: list[dict[str, Any]]) -> None:
        """Add ``prepared`` and ``logits`` to each decoded payload (or its failure ``record``)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for position, payload in enumerate(payloads):
            if "record" not in payload:
                self._prepare(payload)
            if "prepared" in payload:
                groups.setdefault(payload["prepared"].padded_size, []).append(position)
        for positions in groups.values():
            size = self.segmenter.batch_size
            for first in range(0, len(positions), size):
                self._infer([payloads[p] for p in positions[first : first + size]])

    def _prepare(self, payload: dict[str, Any]) -> None:
        rgb, path = payload.pop("rgb"), payload["job"].item.path
        try:
            prepared = self.segmenter.prepare(rgb)
        except Exception as exc:
            payload["record"] = failure(path, exc)
            return
        prepared.timings["decode"] += payload.pop("decode")
        payload["prepared"] = prepared  # holds the full-size image too, for overlays and the CRF

    def _infer(self, chunk: list[dict[str, Any]]) -> None:
        start = time.perf_counter()
        try:
            logits = self.segmenter.run([payload["prepared"] for payload in chunk])
        except Exception as exc:
            for payload in chunk:
                path = payload["job"].item.path
                payload["record"] = Record(path, "failed", error=f"{path}: inference failed: {exc}")
            return
        share = (time.perf_counter() - start) / len(chunk)
        for offset, payload in enumerate(chunk):
            prepared = payload["prepared"] = _without_input(payload["prepared"])
            prepared.timings["infer"] = share
            payload["logits"] = logits[offset]


def _without_input(prepared: Prepared) -> Prepared:
    """``prepared`` minus the network input, which finishing does not read (a resized float32 input is
    ~2.4 MB of a VOC image's ~3.5 MB row): an empty array keeps its shape, the geometry ``finish`` needs.
    Kept when no source image is held, for then the input is the image an overlay draws on."""
    if prepared.source is None:
        return prepared
    h, w = prepared.input_size
    return replace(prepared, rgb=np.empty((h, w, 0), dtype=prepared.rgb.dtype))


# ------------------------------------------------------------------------------------------- stage 3: finish


class Finish:
    """CPU actor: upsample, CRF (inline, one thread), write the outputs; one record per row."""

    def __init__(
        self,
        model: ModelShipment,
        options: SegmentOptions,
        crf: CRFParams | None,
        crf_backend: str,
        segmenter: Segmenter | None = None,
    ) -> None:
        # finish() needs the model's geometry, not its session: an actor of its own loads a one-thread one
        segmenter = segmenter or model.load("cpu", threads=1)
        runner = None
        if crf is not None:
            from deeplab_cli.crf.runner import CRFRunner

            runner = CRFRunner(crf, backend=crf_backend, device="cpu", workers=0, threads=1)
        options = replace(options, workers=1)
        self.scheduler = Scheduler(segmenter, options, crf=runner)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = rows_of(batch)
        records = self.finish([unpack(row) for row in rows])
        return records_batch(rows, records)

    def finish(self, payloads: list[dict[str, Any]]) -> list[Record]:
        """Each payload's record: the failure it carries, or the outputs written from its logits."""
        records = []
        for payload in payloads:
            record = payload.get("record")
            if record is None:
                prepared = payload["prepared"]
                decoded = Decoded(payload["job"], prepared, prepared.source)
                record = self.scheduler.finish(decoded, payload["logits"])
            records.append(record)
        return records


# ------------------------------------------------------------------------------------ all three in one actor


class Segment:
    """CPU actor: decode, infer, finish and write each image in one process (CPU inference).

    On CPUs every stage competes for the same cores, so separate stages would only add two trips
    through the object store per image (the decoded image, then the logits: a few MB each); one actor
    per core running the local engine's chain end to end keeps the cores on the work. Only the job goes
    in and the record comes out.
    """

    def __init__(
        self,
        model: ModelShipment,
        options: SegmentOptions,
        crf: CRFParams | None,
        crf_backend: str,
        threads: int | None,
    ) -> None:
        self.inference = Infer(model, "cpu", threads)
        self.finishing = Finish(model, options, crf, crf_backend, segmenter=self.inference.segmenter)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = rows_of(batch)
        payloads = [unpack(row) for row in rows]
        for payload in payloads:
            decode(payload)
        self.inference.infer(payloads)
        records = self.finishing.finish(payloads)
        return records_batch(rows, records)
