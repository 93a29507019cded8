"""``deeplab eval``: score a model on a dataset split, without and with the dense CRF, in one pass."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from deeplab_cli.commands.options import (
    CRFChoice,
    DatasetChoice,
    crf_options,
    dataset_options,
    device_option,
    resize_option,
    scales_options,
)
from deeplab_cli.commands.progress import ProgressBar

if TYPE_CHECKING:
    from deeplab_cli.crf.runner import CRFRunner
    from deeplab_cli.runtime import Segmenter


@click.command("eval")
@dataset_options
@crf_options
@scales_options
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
@resize_option
@device_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def evaluate(
    data: DatasetChoice,
    crf: CRFChoice,
    scales: tuple[float, ...],
    flip: bool,
    limit: int | None,
    json_path: Path | None,
    plot: Path | None,
    save_masks: Path | None,
    resize: str | int,
    device: str,
    quiet: bool,
) -> None:
    """Evaluate a model on a dataset split: per-class IoU, mIoU, accuracies, trimap bands.

    With --crf, the same network probabilities are also refined by the dense CRF and both results are
    reported side by side. Output paths are checked before the network runs.

    \b
    Example:
      deeplab eval --dataset voc --split val --data-root ~/data --crf --json val.json --plot trimap.png

    Exit status: 0 done, 1 failed (e.g. a broken image or ground truth), 2 usage error, 130 interrupted.
    """
    from deeplab_cli.evaluate import EvalOptions, check_writable
    from deeplab_cli.evaluate import evaluate as run_evaluation

    check_writable(json_path, plot, save_masks / "crf" / "probe.png" if save_masks else None)
    dataset = data.open(limit)
    segmenter, runner = open_model_and_crf(data.model_name(), device, crf, resize)
    options = EvalOptions(scales=scales, flip=flip, save_masks=save_masks)
    with ProgressBar("eval", quiet=quiet, total=len(dataset)) as bar, _closing(runner):
        result = run_evaluation(segmenter, dataset, options, crf=runner, progress=lambda _id: bar.advance())
    document = result.to_dict()
    print_report(document)
    if json_path is not None:
        from deeplab_cli.files import write_json

        write_json(json_path, document)
    if plot is not None:
        from deeplab_cli.plots import write_trimap_plot

        write_trimap_plot(plot, document)


def open_model_and_crf(
    model: str, device: str, crf: CRFChoice, resize: str | int = "protocol"
) -> tuple[Segmenter, CRFRunner | None]:
    """The network, then (with --crf) the CRF runner on the same device with the model's defaults.

    On the CPU the cores are split (``crf.runner.default_crf_workers``): the CRF workers get most of them
    and the network what is left, at least one thread.
    """
    import os

    from deeplab_cli.commands.options import resolve_crf
    from deeplab_cli.crf.runner import CRFRunner, default_crf_workers, network_threads
    from deeplab_cli.runtime import Segmenter

    cores = os.cpu_count() or 1
    on_gpu = crf.enabled and _network_on_gpu(device)
    workers, threads = default_crf_workers(cores, on_gpu)
    workers = workers if crf.workers is None else crf.workers
    split = network_threads(cores, workers, threads) if crf.enabled and not on_gpu else None
    segmenter = Segmenter(model, device=device, threads=split, resize=resize)
    params, backend, _ = resolve_crf(crf, segmenter.spec.crf)
    if params is None:
        return segmenter, None
    network_gpu = "CUDAExecutionProvider" in segmenter.providers
    per_worker = threads if workers else None  # inline, the CRF runs between network calls: all cores
    return segmenter, CRFRunner(params, backend, device, workers, per_worker, network_on_gpu=network_gpu)


def _network_on_gpu(device: str) -> bool:
    """Whether ONNX Runtime will run the network on a GPU for ``--device`` (before making a session)."""
    from deeplab_cli.device import CUDA_PROVIDER, parse_device

    chosen = parse_device(device)
    if chosen.kind == "cpu":
        return False
    import onnxruntime as ort

    return CUDA_PROVIDER in ort.get_available_providers()


class _closing:
    """Close the CRF runner at the end (cancelled, workers killed, if the block raised)."""

    def __init__(self, runner: CRFRunner | None):
        self.runner = runner

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if self.runner is not None:
            self.runner.close(cancel=exc_type is not None)


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
    protocol = document.get("protocol") or {}
    if protocol.get("text"):
        console.print(f"protocol: {protocol['text']}")
    if document.get("crf_backend"):
        console.print(f"CRF: {document['crf_backend']}")
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
