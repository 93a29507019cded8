"""``segment_dataset``: DeepLab as two stages of a user's own Ray Data pipeline.

    import ray
    from deeplab_cli.ray import segment_dataset

    ds = ray.data.read_images("s3://bucket/photos/", include_paths=True, mode="RGB")
    ds = segment_dataset(ds, model="deeplabv3-mnv2-voc", crf=True)
    ds.write_parquet("s3://bucket/masks/")   # columns: image, path, label (H x W uint8)

Inference runs in an actor pool (one ONNX Runtime session per actor); the upsampling and the CRF in
CPU actors of their own, so GPU actors never wait on the CRF.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from deeplab_cli.crf import CRFParams
from deeplab_cli.errors import UsageError
from deeplab_cli.ray.cluster import quiet_ray_data, require_ray
from deeplab_cli.ray.stages import ModelShipment

HIDDEN = "_deeplab"  # the column carrying geometry and logits from inference to the finish stage


def segment_dataset(
    ds: Any,
    model: str | None = None,
    crf: bool | CRFParams | Mapping[str, float] | None = None,
    *,
    image_column: str = "image",
    scores: bool = False,
    batch_size: int = 1,
    max_size: int | None = 2048,
    concurrency: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 0.5,
    finish_concurrency: int = 1,
    crf_backend: str = "auto",
) -> Any:
    """Add a ``label`` column (H x W class indices at each image's size) to a dataset of RGB images.

    ``crf``: True for the model's CRF defaults, a mapping of overrides, or :class:`CRFParams`.
    ``scores``: also add ``score``, the C x H x W float32 probabilities (after the CRF, when on).
    The actors reserve half a CPU each by default (``cpus_per_worker``, and the finishing actors): whole
    CPUs would let the two actor pools hold every CPU of a 2-CPU node while the dataset's own read tasks
    (e.g. ``ray.data.read_images``) wait for one, and the pipeline would never start.
    """
    ray = require_ray()
    quiet_ray_data()
    from deeplab_cli.runtime import Segmenter

    segmenter = Segmenter(model, device="cpu", batch_size=batch_size, max_size=max_size)
    params = _crf_params(segmenter.spec, crf)
    shipment = ModelShipment.from_segmenter(segmenter)
    gpu = gpus_per_worker > 0
    ds = ds.map_batches(
        DatasetInfer,
        fn_constructor_kwargs={
            "model": shipment,
            "device": "cuda" if gpu else "cpu",
            "threads": max(1, int(cpus_per_worker)),
            "image_column": image_column,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=0 if gpu else cpus_per_worker,
        num_gpus=gpus_per_worker if gpu else None,
        batch_format="numpy",
    )
    return ds.map_batches(
        DatasetFinish,
        fn_constructor_kwargs={
            "model": shipment,
            "crf": params,
            "crf_backend": crf_backend,
            "scores": scores,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=finish_concurrency),
        num_cpus=FINISH_CPUS,
        batch_format="numpy",
    ).drop_columns([HIDDEN])


def _crf_params(spec: Any, crf: bool | CRFParams | Mapping[str, float] | None) -> CRFParams | None:
    """The model's CRF defaults, overridden by ``crf`` when it is a mapping (unknown keys: exit 2)."""
    if crf is None or crf is False:
        return None
    if isinstance(crf, CRFParams):
        return crf
    from deeplab_cli.crf.params import resolve

    return resolve(CRFParams.from_dict(spec.crf), None, {} if crf is True else crf)


def _images(batch: dict[str, np.ndarray], column: str) -> list[np.ndarray]:
    if column not in batch:
        raise UsageError(f"segment_dataset: no column {column!r} (columns: {', '.join(batch)})")
    return [np.asarray(image) for image in batch[column]]


def _objects(values: list[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


# CPUs reserved by each finishing actor (upsampling and the CRF, one thread): see segment_dataset.
FINISH_CPUS = 0.5


class DatasetInfer:
    """Actor: prepare + one ONNX Runtime run per same-padded-size group; logits to the next stage."""

    def __init__(self, model: ModelShipment, device: str, threads: int, image_column: str) -> None:
        self.segmenter = model.load(device, threads)
        self.image_column = image_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = [self.segmenter.prepare(image) for image in _images(batch, self.image_column)]
        logits: list[np.ndarray | None] = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for position, item in enumerate(prepared):
            groups.setdefault(item.padded_size, []).append(position)
        for positions in groups.values():
            outputs = self.segmenter.run([prepared[p] for p in positions])
            for position, scores in zip(positions, outputs, strict=True):
                logits[position] = scores
        hidden = [
            pickle.dumps(pair, protocol=pickle.HIGHEST_PROTOCOL)
            for pair in zip(prepared, logits, strict=True)
        ]
        return {**batch, HIDDEN: _objects(hidden)}


class DatasetFinish:
    """CPU actor: upsample to each image's size, the CRF when asked (inline, one thread), the columns."""

    def __init__(self, model: ModelShipment, crf: CRFParams | None, crf_backend: str, scores: bool) -> None:
        self.segmenter = model.load("cpu", threads=1)  # finish() needs the model's geometry, not its session
        self.runner = None
        if crf is not None:
            from deeplab_cli.crf.runner import CRFRunner

            self.runner = CRFRunner(crf, backend=crf_backend, device="cpu", workers=0, threads=1)
        self.scores = scores

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels, probs = [], []
        for hidden in batch[HIDDEN]:
            prepared, logits = pickle.loads(hidden)
            prediction = self.segmenter.finish(prepared, logits, return_probs=self.scores, crf=self.runner)
            labels.append(prediction.labels)
            probs.append(prediction.probs)
        out = {**batch, "label": _objects(labels)}
        if self.scores:
            out["score"] = _objects(probs)
        return out
