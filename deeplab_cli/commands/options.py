"""Click options shared by ``segment``, ``eval`` and ``crf tune``, declared once so they cannot drift.

- :func:`crf_options` adds ``--crf`` and every CRF option and hands the command one ``crf``
  argument, a :class:`CRFChoice`; :func:`resolve_crf` turns it into ``(CRFParams | None, backend, workers)``.
- :func:`dataset_options` adds ``--dataset/--split/--data-root/--ids/--allow-missing/--model`` and hands one
  ``data`` argument, a :class:`DatasetChoice`.
- :func:`model_option` and :func:`device_option` are the single ``--model`` and ``--device``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from deeplab_cli.crf.backends import BACKENDS
from deeplab_cli.datasets import DATASETS
from deeplab_cli.errors import UsageError

if TYPE_CHECKING:
    from deeplab_cli.crf.params import CRFParams
    from deeplab_cli.datasets import Dataset

__all__ = [
    "CRFChoice",
    "DatasetChoice",
    "crf_backend_option",
    "crf_options",
    "dataset_options",
    "device_option",
    "model_option",
    "resolve_crf",
    "scales_options",
]

F = TypeVar("F", bound=Callable[..., Any])

# (parameter name, type, help): one --crf-<name> option each, in CRFParams's names.
CRF_PARAM_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("iterations", int, "Mean-field iterations."),
    ("pos_w", float, "Smoothness kernel weight (w2)."),
    ("pos_xy_std", float, "Smoothness kernel spatial std (sigma_gamma, px)."),
    ("bi_w", float, "Appearance kernel weight (w1)."),
    ("bi_xy_std", float, "Appearance kernel spatial std (sigma_alpha, px)."),
    ("bi_rgb_std", float, "Appearance kernel colour std (sigma_beta)."),
    ("unary_scale", float, "Scale of the unary (log-probabilities), a softmax temperature."),
)
_CRF_KEYS = ("crf_params_file", "crf_backend", "crf_workers") + tuple(
    "crf_" + name for name, _, _ in CRF_PARAM_OPTIONS
)


@dataclass(frozen=True)
class CRFChoice:
    """The CRF options as parsed: ``enabled`` is ``--crf``; ``given`` lists the CRF flags typed explicitly."""

    enabled: bool = False
    backend: str = "auto"
    params_file: Path | None = None
    overrides: Mapping[str, float | int | None] = field(default_factory=dict)
    workers: int | None = None
    given: tuple[str, ...] = ()


def resolve_crf(
    choice: CRFChoice, defaults: CRFParams | Mapping[str, Any] | None = None
) -> tuple[CRFParams | None, str, int | None]:
    """``(params or None without --crf, backend, workers)``; ``defaults``: the model's CRF parameters.

    CRF options without ``--crf`` would be silently ignored, so they are a usage error (exit 2).
    Parameters are the model's defaults, then ``--crf-params FILE``, then the ``--crf-*`` values.
    """
    from deeplab_cli.crf.params import CRFParams, resolve

    if not choice.enabled:
        if choice.given:
            raise UsageError(f"{', '.join(choice.given)} given without --crf (add --crf to refine)")
        return None, choice.backend, choice.workers
    base = defaults if isinstance(defaults, CRFParams) or defaults is None else CRFParams.from_dict(defaults)
    return resolve(base, choice.params_file, choice.overrides), choice.backend, choice.workers


def crf_backend_option(function: F) -> F:
    """``--crf-backend``: auto, numba, torch or pydensecrf."""
    return click.option(
        "--crf-backend",
        type=click.Choice(BACKENDS, case_sensitive=False),
        default="auto",
        show_default=True,
        help="CRF implementation: auto = numba on the CPU when installed, else torch; torch on CUDA.",
    )(function)


def crf_options(function: F) -> F:
    """Add ``--crf`` and the CRF options; the command receives them as one ``crf: CRFChoice`` argument."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        context = click.get_current_context()
        values = {key: kwargs.pop(key) for key in _CRF_KEYS}
        enabled = kwargs.pop("use_crf")
        given = tuple(
            "--" + key.replace("_", "-").replace("crf-params-file", "crf-params")
            for key in _CRF_KEYS
            if context.get_parameter_source(key) is click.core.ParameterSource.COMMANDLINE
        )
        if enabled:
            from deeplab_cli.crf.backends import choose_backend

            choose_backend(values["crf_backend"])  # a missing package: one line, before any work
        elif given:
            raise UsageError(f"{', '.join(given)} given without --crf (add --crf to refine)")
        kwargs["crf"] = CRFChoice(
            enabled=enabled,
            backend=values["crf_backend"].lower(),
            params_file=values["crf_params_file"],
            overrides={name: values["crf_" + name] for name, _, _ in CRF_PARAM_OPTIONS},
            workers=values["crf_workers"],
            given=given,
        )
        return function(*args, **kwargs)

    decorated: Callable[..., Any] = wrapper
    decorated = click.option(
        "--crf-workers",
        type=click.IntRange(min=0),
        default=None,
        help="CRF worker processes (0 = in the calling thread) [default: a share of the cores].",
    )(decorated)
    for name, kind, help_text in reversed(CRF_PARAM_OPTIONS):
        flag = "--crf-" + name.replace("_", "-")
        decorated = click.option(flag, "crf_" + name, type=kind, default=None, help=help_text)(decorated)
    decorated = click.option(
        "--crf-params",
        "crf_params_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="CRF parameters from a JSON file (e.g. written by `deeplab crf tune`).",
    )(decorated)
    decorated = crf_backend_option(decorated)
    decorated = click.option(
        "--crf/--no-crf",
        "use_crf",
        default=False,
        help="Refine with the dense CRF (parameters default to the model's).",
    )(decorated)
    return decorated  # type: ignore[return-value]


def _parse_scales(_ctx: click.Context, _param: click.Parameter, text: str) -> tuple[float, ...]:
    from deeplab_cli.tuning import parse_numbers

    try:
        scales = parse_numbers(text)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None
    if not scales or any(not math.isfinite(s) or s <= 0 or s > 4 for s in scales):
        raise click.BadParameter("scales must be numbers in (0, 4]")
    return scales


def scales_options(function: F) -> F:
    """``--scales`` (multi-scale inference, fused by max) and ``--flip`` (mirrored image averaged)."""
    function = click.option(
        "--flip", is_flag=True, help="Add the left-right mirrored image (scores averaged)."
    )(function)
    return click.option(
        "--scales",
        default="1",
        show_default=True,
        callback=_parse_scales,
        help="Input scales, fused by max (e.g. 0.5,0.75,1).",
    )(function)


def model_option(function: F) -> F:
    """``-m/--model``: a registry name or an .onnx file (default: chosen by the command)."""
    return click.option(
        "-m", "--model", default=None, help="Registry name or .onnx file [default: the default model]."
    )(function)


def _check_device(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from deeplab_cli.device import parse_device

    return str(parse_device(value))


def device_option(function: F) -> F:
    """``--device``: auto, cpu, cuda or cuda:N, checked at parse time and normalised (e.g. ``cuda:0``)."""
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        callback=_check_device,
        help="auto, cpu, cuda or cuda:N (the network and the CRF alike).",
    )(function)


def _check_resize(ctx: click.Context, param: click.Parameter, value: str) -> str | int:
    text = value.strip().lower()
    if text in ("protocol", "native"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise click.BadParameter("use protocol, native or a positive number of pixels (the longer side)")


def resize_option(function: F) -> F:
    """``--resize``: the model's upstream resize rule (default), the image's own size, or a longer side."""
    return click.option(
        "--resize",
        default="protocol",
        show_default=True,
        metavar="protocol|native|N",
        callback=_check_resize,
        help="How an image is sized for the network: the model's upstream rule (VOC: longer side to 513, "
        "ADE20K: TF DeepLab's resize_to_range), its own size (native: best for small objects in large "
        "photos), or the longer side set to N pixels. Outputs are always at the image's own size.",
    )(function)


@dataclass(frozen=True)
class DatasetChoice:
    """Which split to read: the values of :func:`dataset_options`."""

    dataset: str = "voc"
    split: str = "val"
    data_root: Path | None = None
    ids_file: Path | None = None
    allow_missing: bool = False
    model: str | None = None

    def open(self, limit: int | None = None) -> Dataset:
        """The dataset split (first ``limit`` ids); a missing folder or unknown split is one line."""
        from deeplab_cli.datasets import open_dataset

        data = open_dataset(self.dataset, self.data_root, self.split, self.ids_file, self.allow_missing)
        return data.limit(limit)

    def model_name(self) -> str:
        """``--model``, else the registry's default model for the dataset."""
        if self.model:
            return self.model
        from deeplab_cli.zoo import default_model_for

        return default_model_for(self.dataset)


_DATASET_KEYS = ("dataset", "split", "data_root", "ids_file", "allow_missing", "model")


def dataset_options(function: F) -> F:
    """Add the split options and ``--model``; the command receives one ``data: DatasetChoice`` argument."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["data"] = DatasetChoice(**{key: kwargs.pop(key) for key in _DATASET_KEYS})
        return function(*args, **kwargs)

    decorated: Callable[..., Any] = click.option(
        "-m",
        "--model",
        default=None,
        help="Registry name or .onnx file [default: the dataset's default model].",
    )(wrapper)
    decorated = click.option(
        "--allow-missing", is_flag=True, help="Skip (and count) ids whose image or ground truth is missing."
    )(decorated)
    decorated = click.option(
        "--ids",
        "ids_file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="Explicit id list (one per line).",
    )(decorated)
    decorated = click.option(
        "--data-root",
        type=click.Path(file_okay=False, path_type=Path),
        help="Dataset folder (default: $DEEPLAB_DATA, else <cache>/data).",
    )(decorated)
    decorated = click.option(
        "--split",
        default="val",
        show_default=True,
        help="Split name (VOC: ImageSets/Segmentation/<split>.txt).",
    )(decorated)
    decorated = click.option("--dataset", type=click.Choice(DATASETS), default="voc", show_default=True)(
        decorated
    )
    return decorated  # type: ignore[return-value]
