"""``deeplab crf``: dense CRF tools (``deeplab crf tune``: grid search of the CRF parameters)."""

from __future__ import annotations

from pathlib import Path

import click

from deeplab_cli.commands.evaluate import CRF_BACKENDS, default_model_for, parse_scales
from deeplab_cli.datasets import DATASETS


@click.group("crf")
def crf() -> None:
    """Dense CRF tools."""


def _parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint=option
        ) from None


@crf.command("tune")
@click.option("--dataset", type=click.Choice(DATASETS), default="voc", show_default=True)
@click.option("--split", default="val", show_default=True)
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), help="Dataset folder.")
@click.option("--ids", "ids_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--allow-missing", is_flag=True, help="Skip ids whose files are missing.")
@click.option(
    "--n", "count", type=click.IntRange(min=1), default=100, show_default=True, help="Images to tune on."
)
@click.option("--model", "-m", default=None, help="Model name (default: the dataset's default model).")
@click.option(
    "--iterations", type=click.IntRange(min=1), default=10, show_default=True, help="Mean-field iterations."
)
@click.option(
    "--grid",
    "grid_text",
    default=None,
    help="Coarse grid, e.g. 'bi_w=3,5;bi_xy_std=30,60,90,120;bi_rgb_std=3,5' (the default).",
)
@click.option(
    "--fine/--no-fine", default=True, show_default=True, help="Refine around the best coarse point."
)
@click.option(
    "--unary-scales",
    default="0.6,0.8,1,1.25",
    show_default=True,
    help="Unary scales tried at the best point.",
)
@click.option("--scales", default="1", show_default=True, help="Network input scales (as in eval).")
@click.option("--flip", is_flag=True, help="Add the mirrored image (as in eval).")
@click.option(
    "--crf-backend",
    type=click.Choice(CRF_BACKENDS),
    default="auto",
    show_default=True,
    help="CRF implementation (auto = torch).",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Worker processes (default: CPU cores)."
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the best parameters (default: <cache>/crf/<model>.json).",
)
@click.option("--device", default="auto", show_default=True, help="Device for the network.")
@click.option("--quiet", "-q", is_flag=True, help="No progress messages.")
def tune(
    dataset: str,
    split: str,
    data_root: Path | None,
    ids_file: Path | None,
    allow_missing: bool,
    count: int,
    model: str | None,
    iterations: int,
    grid_text: str | None,
    fine: bool,
    unary_scales: str,
    scales: str,
    flip: bool,
    crf_backend: str,
    workers: int | None,
    output: Path | None,
    device: str,
    quiet: bool,
) -> None:
    """Grid-search the CRF's appearance kernel and unary scale on N images of a split.

    The smoothness kernel stays at pos_w = 3, pos_xy_std = 3 as in the DeepLab papers. The network runs
    once per image (probabilities cached on disk); candidates run in parallel processes. The best
    parameters go to --output, for `deeplab eval --crf --crf-params FILE` and `deeplab segment`.

    \b
    Example:
      deeplab crf tune --dataset voc --split val --n 100 --data-root ~/data
    """
    from deeplab_cli.datasets import open_dataset
    from deeplab_cli.runtime import Segmenter
    from deeplab_cli.tuning import FINE_STEPS, default_output, parse_grid, save_result
    from deeplab_cli.tuning import tune as run_tune

    data = open_dataset(dataset, data_root, split, ids_file, allow_missing).limit(count)
    segmenter = Segmenter(model or default_model_for(dataset), device=device)
    log = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    result = run_tune(
        segmenter,
        data,
        iterations=iterations,
        coarse=parse_grid(grid_text) if grid_text else None,
        fine_steps=FINE_STEPS if fine else {},
        unary_scales=_parse_floats(unary_scales, "--unary-scales"),
        scales=parse_scales(scales),
        flip=flip,
        backend=crf_backend,
        workers=workers,
        log=log,
    )
    target = output or default_output(segmenter.spec.name)
    save_result(target, result)
    best = result.best.params
    click.echo(
        f"{segmenter.spec.name} on {dataset} {split}: {result.images} images, "
        f"{len(result.candidates)} candidates"
    )
    click.echo(
        "best CRF: "
        + ", ".join(f"{k}={best[k]:g}" for k in ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std"))
        + f", unary_scale={best['unary_scale']:g}, iterations={best['iterations']}"
    )
    click.echo(f"mIoU with CRF: {100 * result.best.miou:.2f}   without CRF: {100 * result.baseline_miou:.2f}")
    if not result.crf_helps:
        click.echo(
            "The CRF does not improve mIoU on these images with any parameters tried: "
            "evaluate and segment without --crf for this model."
        )
    click.echo(f"parameters written to {target}")
