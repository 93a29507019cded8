"""``deeplab eval``: score a model on a dataset split, without and with the dense CRF, in one pass."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

from deeplab_cli.datasets import DATASETS

CRF_BACKENDS = ("auto", "torch", "pydensecrf")
CRF_OPTIONS = (
    ("iterations", int, "Mean-field iterations."),
    ("pos_w", float, "Smoothness kernel weight (w2)."),
    ("pos_xy_std", float, "Smoothness kernel spatial std (sigma_gamma, px)."),
    ("bi_w", float, "Appearance kernel weight (w1)."),
    ("bi_xy_std", float, "Appearance kernel spatial std (sigma_alpha, px)."),
    ("bi_rgb_std", float, "Appearance kernel colour std (sigma_beta)."),
    ("unary_scale", float, "Scale of the unary (log-probabilities), a softmax temperature."),
)


def crf_options(function: Any) -> Any:
    """Add ``--crf-params FILE`` and one option per CRF parameter (shared by eval and crf tune)."""
    for name, kind, help_text in reversed(CRF_OPTIONS):
        flag = "--crf-" + name.replace("_", "-")
        function = click.option(flag, name, type=kind, default=None, help=help_text)(function)
    return click.option(
        "--crf-params",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="CRF parameters from a JSON file (e.g. written by `deeplab crf tune`).",
    )(function)


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint="--scales"
        ) from None
    if not scales or any(not math.isfinite(s) or s <= 0 or s > 4 for s in scales):
        raise click.BadParameter("scales must be numbers in (0, 4]", param_hint="--scales")
    return scales


def default_model_for(dataset: str) -> str:
    """The registry's default model if it fits the dataset, else the first model trained on it."""
    from deeplab_cli.errors import UsageError
    from deeplab_cli.zoo import registry_models

    models = [spec for spec in registry_models() if spec.dataset == dataset]
    if not models:
        raise UsageError(f"no model in the registry is trained on {dataset}; pass --model")
    return next((spec.name for spec in models if spec.default), models[0].name)


@click.command("eval")
@click.option("--dataset", type=click.Choice(DATASETS), default="voc", show_default=True)
@click.option(
    "--split", default="val", show_default=True, help="Split name (VOC: ImageSets/Segmentation/<split>.txt)."
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    help="Dataset folder (default: $DEEPLAB_DATA, else <cache>/data).",
)
@click.option(
    "--ids",
    "ids_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Explicit id list.",
)
@click.option(
    "--allow-missing", is_flag=True, help="Skip (and count) ids whose image or ground truth is missing."
)
@click.option("--model", "-m", default=None, help="Model name (default: the dataset's default model).")
@click.option("--crf/--no-crf", default=False, show_default=True, help="Also score the CRF-refined output.")
@crf_options
@click.option(
    "--crf-backend",
    type=click.Choice(CRF_BACKENDS),
    default="auto",
    show_default=True,
    help="CRF implementation (auto = torch).",
)
@click.option(
    "--crf-workers", type=int, default=None, help="CRF worker processes (default: CPU cores; 0 = inline)."
)
@click.option(
    "--scales", default="1", show_default=True, help="Input scales, fused by max (e.g. 0.5,0.75,1)."
)
@click.option("--flip", is_flag=True, help="Add the left-right mirrored image (scores averaged).")
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Only the first N images of the split."
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write results as JSON."
)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Draw the trimap curves (PNG).")
@click.option(
    "--save-masks",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save label PNGs: DIR/<id>.png (no CRF) and DIR/crf/<id>.png.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def evaluate(
    dataset: str,
    split: str,
    data_root: Path | None,
    ids_file: Path | None,
    allow_missing: bool,
    model: str | None,
    crf: bool,
    crf_params: Path | None,
    crf_backend: str,
    crf_workers: int | None,
    scales: str,
    flip: bool,
    limit: int | None,
    json_path: Path | None,
    plot: Path | None,
    save_masks: Path | None,
    device: str,
    quiet: bool,
    **crf_overrides: Any,
) -> None:
    """Evaluate a model on a dataset split: per-class IoU, mIoU, accuracies, trimap bands.

    With --crf, the same network probabilities are also refined by the dense CRF and both results are
    reported side by side.

    \b
    Example:
      deeplab eval --dataset voc --split val --data-root ~/data --crf --json val.json --plot trimap.png
    """
    from deeplab_cli.datasets import open_dataset
    from deeplab_cli.evaluate import EvalOptions
    from deeplab_cli.evaluate import evaluate as run_evaluation
    from deeplab_cli.runtime import Segmenter
    from deeplab_cli.tuning import resolve_crf_params

    scale_values = parse_scales(scales)
    data = open_dataset(dataset, data_root, split, ids_file, allow_missing).limit(limit)
    segmenter = Segmenter(model or default_model_for(dataset), device=device)
    params = resolve_crf_params(segmenter.spec, crf_params, crf_overrides) if crf else None
    options = EvalOptions(
        scales=scale_values,
        flip=flip,
        crf=params,
        crf_backend=crf_backend,
        crf_device="cuda" if device.startswith("cuda") else "cpu",
        crf_workers=crf_workers,
        save_masks=save_masks,
    )
    with _progress(len(data), quiet) as advance:
        result = run_evaluation(segmenter, data, options, progress=advance)
    document = result.to_dict()
    print_report(document)
    if json_path is not None:
        from deeplab_cli.files import write_json

        write_json(json_path, document)
    if plot is not None:
        from deeplab_cli.plots import write_trimap_plot

        write_trimap_plot(plot, document)


class _progress:
    """A rich progress bar on stderr (only when it is a terminal); yields the per-image callback."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.enabled = total, not quiet and sys.stderr.isatty()
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress(
            "eval", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=Console(stderr=True)
        )
        self.bar.start()
        task = self.bar.add_task("eval", total=self.total)
        return lambda _id: self.bar.update(task, advance=1)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def print_report(document: dict[str, Any]) -> None:
    """The results as rich tables on stdout: per-class IoU (before/after CRF), summary, trimap."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width or 100))
    crf = document.get("crf")
    title = (
        f"{document['model']} on {document['dataset']} {document['split']}: {document['images']} images"
        f" (scales {','.join(f'{s:g}' for s in document['scales'])}{', flip' if document['flip'] else ''})"
    )
    console.print(title)
    table = Table()
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    if crf:
        table.add_column("IoU % CRF", justify="right")
        table.add_column("change", justify="right")
    plain_iou = document["no_crf"]["per_class_iou"]
    for name in document["class_names"]:
        row = [name, _pct(plain_iou[name])]
        if crf:
            after = crf["per_class_iou"][name]
            before = plain_iou[name]
            change = "-" if after is None or before is None else f"{100 * (after - before):+.2f}"
            row += [_pct(after), change]
        table.add_row(*row)
    table.add_section()
    for key, label in (
        ("miou", "mean IoU"),
        ("pixel_accuracy", "pixel accuracy"),
        ("mean_accuracy", "mean accuracy"),
        ("fw_iou", "frequency-weighted IoU"),
    ):
        row = [label, _pct(document["no_crf"][key])]
        if crf:
            before, after = document["no_crf"][key], crf[key]
            change = "-" if after is None or before is None else f"{100 * (after - before):+.2f}"
            row += [_pct(after), change]
        table.add_row(*row, style="bold" if key == "miou" else None)
    console.print(table)
    absent = document["no_crf"]["absent_classes"]
    if absent:
        console.print(
            f"classes absent from ground truth and prediction (not in the mean): {', '.join(absent)}"
        )
    excluded = document["no_crf"]["excluded_classes"]
    if excluded:
        console.print(f"classes not scored (dataset convention): {', '.join(excluded)}")
    if document["missing"]:
        console.print(f"skipped {len(document['missing'])} ids with missing files")
    console.print(_trimap_table(document))
    rate = document.get("images_per_second")
    if rate:
        console.print(f"{rate:.2f} images/s")


def _trimap_table(document: dict[str, Any]) -> Any:
    from rich.table import Table

    crf = document.get("crf")
    table = Table(title="trimap: band of w px (Euclidean) around void", title_justify="left")
    table.add_column("band w", justify="right")
    table.add_column("pixel acc %", justify="right")
    table.add_column("mIoU %", justify="right")
    if crf:
        table.add_column("pixel acc % CRF", justify="right")
        table.add_column("mIoU % CRF", justify="right")
    trimap = document["no_crf"]["trimap"]
    for index, width in enumerate(trimap["widths"]):
        if width not in (1, 2, 5, 10, 20, 30, 40):
            continue
        row = [str(width), _pct(trimap["pixel_accuracy"][index]), _pct(trimap["miou"][index])]
        if crf:
            row += [_pct(crf["trimap"]["pixel_accuracy"][index]), _pct(crf["trimap"]["miou"][index])]
        table.add_row(*row)
    return table
