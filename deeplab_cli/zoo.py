"""The model registry: one row of data per pretrained model (``weights/registry.toml``).

A :class:`ModelSpec` carries everything the tool needs to build, convert, run and describe a model:
architecture and its options, classes, palette, input normalisation, output stride, inference protocol,
the upstream file (format, URL, sha256), licence, default CRF parameters and reported accuracy.
Models a user imports with an explicit architecture are stored in the cache as the same kind of row.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from deeplab_cli import paths
from deeplab_cli.errors import ModelNotFoundError, UsageError, WeightsError

_PACKAGED = Path(__file__).with_name("registry.toml")
_SOURCE_TREE = Path(__file__).resolve().parent.parent / "weights" / "registry.toml"


@dataclass(frozen=True)
class Protocol:
    """How an image is prepared for the network, as upstream evaluated the model.

    First the image is resized (``resize``: ``none`` = native size; ``range`` = TF DeepLab's
    ``resize_to_range(resize_min, resize_max, resize_factor)``; ``longer_side`` = the longer side brought
    into ``[resize_min, resize_max]``, 0 = unbounded) by ``resize_method`` (``bilinear_align_corners`` as
    TF, or ``pillow_bilinear``). Then it is padded bottom/right with ``pad_value`` (the mean) to at least
    ``min_size`` on each side, and to a size ``size_step * k + 1`` (8k+1 for an output-stride-8 network),
    so that every stride-2 layer pads symmetrically and logits land on pixels 0, s, 2s, ...
    (align-corners geometry). See ``deeplab_cli.geometry``.
    """

    min_size: int = 513
    size_step: int = 8
    align_corners: bool = True
    resize: str = "none"
    resize_min: int = 0
    resize_max: int = 0
    resize_factor: int = 1
    resize_method: str = "bilinear_align_corners"
    pad_value: str = "mean"

    def describe(self) -> str:
        """One line for reports and JSON: the resize rule, then the padding rule."""
        if self.resize == "range":
            rule = f"resize_to_range({self.resize_min}, {self.resize_max}, factor {self.resize_factor})"
        elif self.resize == "longer_side":
            rule = f"longer side into [{self.resize_min}, {self.resize_max or 'inf'}]"
        else:
            rule = "native size"
        method = f" ({self.resize_method})" if self.resize != "none" else ""
        return f"{rule}{method}, pad with the {self.pad_value} to >= {self.min_size}, {self.size_step}k+1"


@dataclass(frozen=True)
class Source:
    """The released weight file a model is converted from."""

    format: str
    file: str
    sha256: str | None = None
    url: str | None = None
    size: int | None = None
    weights: str | None = None
    archive_member: str | None = None
    # TFLite dynamic-range files: emulate the runtime's per-pixel int8 activation rounding in the
    # converted graph (closer to the original file, about 1.8x slower); see README "Fidelity".
    int8_emulation: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """One registry row (see the header of ``weights/registry.toml`` for the meaning of each field)."""

    name: str
    arch: str
    dataset: str
    class_names: tuple[str, ...]
    palette: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output_stride: int
    protocol: Protocol
    source: Source | None
    arch_options: dict[str, Any] = field(default_factory=dict)
    channel_order: str = "RGB"
    description: str = ""
    licence: str = ""
    crf: dict[str, float] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    default: bool = False
    user: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        """Serialise to JSON (used for ONNX metadata and for user-imported models in the cache)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        data = json.loads(text)
        data["class_names"] = tuple(data["class_names"])
        data["mean"] = tuple(data["mean"])
        data["std"] = tuple(data["std"])
        data["protocol"] = Protocol(**data["protocol"])
        data["source"] = Source(**data["source"]) if data.get("source") else None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _registry_path() -> Path:
    return _PACKAGED if _PACKAGED.exists() else _SOURCE_TREE


@cache
def _load_registry() -> tuple[dict[str, list[str]], tuple[ModelSpec, ...]]:
    with _registry_path().open("rb") as handle:
        data = tomllib.load(handle)
    class_lists = {key: list(value) for key, value in data["classes"].items()}
    specs = tuple(_row_to_spec(row, class_lists) for row in data["model"])
    return class_lists, specs


def _row_to_spec(row: dict[str, Any], class_lists: dict[str, list[str]]) -> ModelSpec:
    row = dict(row)
    classes_key = row.pop("classes")
    row["class_names"] = tuple(class_lists[classes_key])
    row["mean"] = tuple(row["mean"])
    row["std"] = tuple(row["std"])
    row["protocol"] = Protocol(**row.get("protocol", {}))
    row["source"] = Source(**row["source"]) if "source" in row else None
    return ModelSpec(**row)


def class_list(key: str) -> list[str]:
    """A named class list from the registry (``voc``, ``cityscapes``, ``ade20k``)."""
    return list(_load_registry()[0][key])


def registry_models() -> list[ModelSpec]:
    """All rows of the registry, in file order."""
    return list(_load_registry()[1])


def user_record_path(name: str) -> Path:
    """Where the row of a model the user imported with ``--arch`` is kept (``models/<name>.json``)."""
    return paths.models_dir() / f"{name}.json"


def user_models() -> list[ModelSpec]:
    """Rows of models the user imported with an explicit architecture, read from the cache folder.

    The registry reads these records itself (they are plain rows) so that it needs nothing from the
    weight cache, which sits above it.
    """
    folder = paths.models_dir()
    if not folder.is_dir():
        return []
    specs = []
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(".onnx.json"):  # conversion records, not rows
            continue
        try:
            specs.append(ModelSpec.from_json(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            message = f"corrupt model record {path}: {exc}; delete it or import the model again"
            raise WeightsError(message) from exc
    return specs


def list_models() -> list[ModelSpec]:
    """Registry rows followed by models the user imported into the cache."""
    return registry_models() + user_models()


def default_model_for(dataset: str) -> str:
    """The registry's default model if it fits ``dataset``, else the first registry model trained on it."""
    models = [spec for spec in registry_models() if spec.dataset == dataset]
    if not models:
        raise UsageError(f"no model in the registry is trained on {dataset}; pass --model")
    return next((spec.name for spec in models if spec.default), models[0].name)


def default_model() -> ModelSpec:
    return next(spec for spec in registry_models() if spec.default)


def get_model(name: str | None) -> ModelSpec:
    """The spec for ``name`` (registry first, then user-imported models); ``None`` gives the default."""
    if name is None:
        return default_model()
    for spec in list_models():
        if spec.name == name:
            return spec
    known = ", ".join(spec.name for spec in list_models())
    raise ModelNotFoundError(f"unknown model {name!r}; known models: {known}")


def find_by_sha256(sha256: str) -> ModelSpec | None:
    """The registry row whose released file has this checksum, if any."""
    return next((s for s in registry_models() if s.source and s.source.sha256 == sha256), None)
